"""attestd.core.policy.diff_policies: digests added/removed per bank and PCR, then settings."""

from __future__ import annotations

from typing import Any

from attestd.core.policy import (
    PcrChange,
    Policy,
    SettingChange,
    diff_policies,
    policy_from_document,
)
from attestd.core.tpm import Bank

A, B, C, D, E = ("aa" * 32, "bb" * 32, "cc" * 32, "dd" * 32, "ee" * 32)
S1, S2 = "11" * 20, "22" * 20
L1 = "44" * 48


def pol(pcrs: dict[str, Any], **extra: Any) -> Policy:
    return policy_from_document({"name": "p", "pcrs": pcrs, **extra})


def b(*hexes: str) -> tuple[bytes, ...]:
    return tuple(sorted(bytes.fromhex(h) for h in hexes))


def test_identical_policies_have_no_differences() -> None:
    one = pol({"sha256": {0: [A, B], 7: C}}, eventlog={"require_secure_boot": True})
    # Listing order and hex case make no difference.
    two = pol({"sha256": {7: C.upper(), 0: [B, A]}}, eventlog={"require_secure_boot": True})
    assert diff_policies(one, two) == ([], [])


def test_digests_added_and_removed_within_one_pcr() -> None:
    old = pol({"sha256": {0: [A, B], 1: D}})
    new = pol({"sha256": {0: [B, C, E], 1: D}})
    pcrs, settings = diff_policies(old, new)
    assert pcrs == [PcrChange(Bank.SHA256, 0, b(C, E), b(A))]
    assert settings == []


def test_a_pcr_on_one_side_only_shows_all_its_digests() -> None:
    old = pol({"sha256": {0: A, 4: [B, C]}})
    new = pol({"sha256": {0: A, 9: [D, E]}})
    pcrs, _ = diff_policies(old, new)
    assert pcrs == [
        PcrChange(Bank.SHA256, 4, (), b(B, C)),
        PcrChange(Bank.SHA256, 9, b(D, E), ()),
    ]


def test_a_bank_on_one_side_only_and_the_order_is_bank_then_index() -> None:
    old = pol({"sha384": {2: L1}, "sha256": {5: A, 1: B}})
    new = pol(
        {"sha256": {1: C, 5: A}, "sha1": {3: S1, 0: S2}},
        allow_sha1=True,
    )
    pcrs, settings = diff_policies(old, new)
    # sha1 (0x0004) < sha256 (0x000b) < sha384 (0x000c); indices ascending within a bank.
    assert pcrs == [
        PcrChange(Bank.SHA1, 0, b(S2), ()),
        PcrChange(Bank.SHA1, 3, b(S1), ()),
        PcrChange(Bank.SHA256, 1, b(C), b(B)),
        PcrChange(Bank.SHA384, 2, (), b(L1)),
    ]
    assert settings == [SettingChange("allow_sha1", False, True)]


def test_the_reverse_diff_swaps_added_and_removed_and_before_and_after() -> None:
    old = pol({"sha256": {0: [A, B], 3: D}}, description="v1")
    new = pol(
        {"sha256": {0: [B, C]}, "sha1": {0: S1}},
        allow_sha1=True,
        description="v2",
        eventlog={"require_secure_boot": True},
    )
    fwd_pcrs, fwd_settings = diff_policies(old, new)
    back_pcrs, back_settings = diff_policies(new, old)
    assert back_pcrs == [PcrChange(c.bank, c.index, c.removed, c.added) for c in fwd_pcrs]
    assert back_settings == [SettingChange(s.field, s.after, s.before) for s in fwd_settings]


def test_settings_description_allow_sha1_and_eventlog_rules() -> None:
    old = pol(
        {"sha256": {0: A}},
        description="lab fleet",
        eventlog={
            "require_secure_boot": True,
            "kernel_cmdline": {"regex": ["ro .*"]},
            "dbx_contains": [D],
            "boot_applications": [B, A],
        },
    )
    new = pol(
        {"sha256": {0: A}},
        description="lab fleet, new kernels",
        allow_sha1=True,
        eventlog={
            "kernel_cmdline": {"regex": ["ro quiet .*"], "exact": ["ro"]},
            "boot_applications": [A, C],
            "forbidden_authorities": [E],
        },
    )
    pcrs, settings = diff_policies(old, new)
    assert pcrs == []
    # One entry per changed field, sorted by field; None where a rule is absent.
    assert settings == [
        SettingChange("allow_sha1", False, True),
        SettingChange("description", "lab fleet", "lab fleet, new kernels"),
        SettingChange("eventlog.boot_applications", [A, B], [A, C]),
        SettingChange("eventlog.dbx_contains", [D], None),
        SettingChange("eventlog.forbidden_authorities", None, [E]),
        SettingChange("eventlog.kernel_cmdline.exact", None, ["ro"]),
        SettingChange("eventlog.kernel_cmdline.regex", ["ro .*"], ["ro quiet .*"]),
        SettingChange("eventlog.require_secure_boot", True, None),
    ]


def test_unchanged_rules_are_not_listed() -> None:
    rules = {"require_secure_boot": True, "kernel_cmdline": {"exact": ["ro quiet"]}}
    old = pol({"sha256": {0: A}}, eventlog=rules)
    new = pol({"sha256": {0: [A, B]}}, eventlog=rules)
    pcrs, settings = diff_policies(old, new)
    assert pcrs == [PcrChange(Bank.SHA256, 0, b(B), ())]
    assert settings == []


def test_a_policy_without_rules_against_one_with_rules() -> None:
    old = pol({"sha256": {0: A}})
    new = pol({"sha256": {0: A}}, eventlog={"require_secure_boot": True})
    assert diff_policies(old, new) == (
        [],
        [SettingChange("eventlog.require_secure_boot", None, True)],
    )


def test_policies_of_different_names_compare_on_content_only() -> None:
    one = policy_from_document({"name": "lab", "pcrs": {"sha256": {0: A}}})
    two = policy_from_document({"name": "prod", "pcrs": {"sha256": {0: A}}})
    assert diff_policies(one, two) == ([], [])
