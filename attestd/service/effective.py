"""Which group a device is in and which policy version applies to it (store look-ups
around the pure rules of core/groups.py).

The look-ups run together on the store thread (``*_in_store``): one hand-off per
question, and only the groups' rules are read, never their member lists.
"""

from __future__ import annotations

from collections.abc import Sequence

from attestd.core.groups import GroupChoice, resolve_group
from attestd.service.config import ServerConfig
from attestd.service.state import ServiceState
from attestd.store.base import Device, NotFound, PolicyRecord, Store


def group_choices_in_store(
    store: Store, config: ServerConfig, devices: Sequence[Device]
) -> dict[str, GroupChoice]:
    """The group of each device, reading the group rules once (on the store thread)."""
    groups = store.group_rules()
    return {
        d.device_id: resolve_group(
            store.assigned_group(d.device_id), groups, d.facts, config.default_group
        )
        for d in devices
    }


def effective_policy_in_store(
    store: Store, config: ServerConfig, device: Device, choice: GroupChoice | None = None
) -> tuple[GroupChoice, PolicyRecord | None]:
    """(group choice, the policy version its next attestation uses, or None if there is none).

    A group uses its policy pinned to a version or, with version 0, the latest; a
    device in no group uses the server's default policy (latest version).
    """
    if choice is None:
        choice = group_choices_in_store(store, config, [device])[device.device_id]
    try:
        if choice.group is None:
            return choice, store.get_policy(config.default_policy)
        group = store.get_group_policy(choice.group)
        return choice, store.get_policy(group[0], group[1] or None)
    except NotFound:
        return choice, None


async def group_choices(state: ServiceState, devices: Sequence[Device]) -> dict[str, GroupChoice]:
    return await state.store(group_choices_in_store, state.store.store, state.config, devices)


async def effective_policy(
    state: ServiceState, device: Device, choice: GroupChoice | None = None
) -> tuple[GroupChoice, PolicyRecord | None]:
    return await state.store(
        effective_policy_in_store, state.store.store, state.config, device, choice
    )
