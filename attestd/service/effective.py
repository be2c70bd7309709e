"""Which group a device is in and which policy version applies to it (store look-ups
around the pure rules of core/groups.py)."""

from __future__ import annotations

from collections.abc import Sequence

from attestd.core.groups import GroupChoice, resolve_group
from attestd.service.state import ServiceState
from attestd.store.base import Device, NotFound, PolicyRecord


async def group_choices(state: ServiceState, devices: Sequence[Device]) -> dict[str, GroupChoice]:
    """The group of each device, reading the group list once."""
    store = state.store.store
    groups = [(g.name, g.rules) for g in await state.store(store.list_groups)]
    out = {}
    for device in devices:
        assigned = await state.store(store.assigned_group, device.device_id)
        out[device.device_id] = resolve_group(
            assigned, groups, device.facts, state.config.default_group
        )
    return out


async def effective_policy(
    state: ServiceState, device: Device, choice: GroupChoice | None = None
) -> tuple[GroupChoice, PolicyRecord | None]:
    """(group choice, the policy version its next attestation uses, or None if there is none).

    A group uses its policy pinned to a version or, with version 0, the latest; a
    device in no group uses the server's default policy (latest version).
    """
    store = state.store.store
    if choice is None:
        choice = (await group_choices(state, [device]))[device.device_id]
    try:
        if choice.group is None:
            return choice, await state.store(store.get_policy, state.config.default_policy)
        group = await state.store(store.get_group, choice.group)
        version = group.policy_version or None
        return choice, await state.store(store.get_policy, group.policy_name, version)
    except NotFound:
        return choice, None
