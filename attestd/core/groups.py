"""Which device group a device belongs to, and so which policy applies to it.

Precedence, most specific first: an assignment by device id; else the first
group (by name) with a rule matching the device's enrollment facts; else the
configured default group. A rule matches when every non-empty field equals
the corresponding fact (EK certificate issuer, TPM manufacturer, TPM model,
as read from the EK certificate at enrollment).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

RULE_FIELDS = ("ek_cert_issuer", "tpm_manufacturer", "tpm_model")


@dataclass(frozen=True)
class GroupChoice:
    group: str | None
    source: str  # "assigned", "rule", "default" or "none"


def rule_matches(rule: Mapping[str, str], facts: Mapping[str, str]) -> bool:
    wanted = {k: v for k, v in rule.items() if k in RULE_FIELDS and v}
    return bool(wanted) and all(facts.get(k, "") == v for k, v in wanted.items())


def resolve_group(
    assigned: str | None,
    groups: Sequence[tuple[str, Sequence[Mapping[str, str]]]],
    facts: Mapping[str, str],
    default_group: str,
) -> GroupChoice:
    """``groups``: (name, rules) of every group; ``assigned``: the device's group by id."""
    if assigned is not None:
        return GroupChoice(assigned, "assigned")
    for name, rules in sorted(groups):
        if any(rule_matches(rule, facts) for rule in rules):
            return GroupChoice(name, "rule")
    if any(name == default_group for name, _ in groups):
        return GroupChoice(default_group, "default")
    return GroupChoice(None, "none")
