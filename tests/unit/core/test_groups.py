"""attestd.core.groups: which group a device is in (assigned > rule > default > none)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from attestd.core.groups import RULE_FIELDS, GroupChoice, resolve_group, rule_matches

ISSUER = "CN=swtpm-localca"
FACTS = {
    "ek_cert_issuer": ISSUER,
    "ek_cert_serial": "1f",
    "tpm_manufacturer": "id:00001014",
    "tpm_model": "swtpm",
    "tpm_version": "id:20191023",
}
MATCH = {"tpm_model": "swtpm"}
MISS = {"tpm_model": "other"}

Groups = Sequence[tuple[str, Sequence[Mapping[str, str]]]]


def test_rule_fields_are_the_three_enrollment_facts() -> None:
    assert RULE_FIELDS == ("ek_cert_issuer", "tpm_manufacturer", "tpm_model")


# --- rule_matches -------------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [
        {"ek_cert_issuer": ISSUER},
        {"tpm_manufacturer": "id:00001014"},
        {"tpm_model": "swtpm"},
        {"ek_cert_issuer": ISSUER, "tpm_model": "swtpm"},
        {"ek_cert_issuer": ISSUER, "tpm_manufacturer": "id:00001014", "tpm_model": "swtpm"},
        # Empty fields impose nothing: only the non-empty ones must match.
        {"ek_cert_issuer": "", "tpm_manufacturer": "", "tpm_model": "swtpm"},
    ],
    ids=["issuer", "manufacturer", "model", "issuer+model", "all-three", "empty-fields-ignored"],
)
def test_a_rule_matches_when_every_non_empty_field_equals_the_fact(
    rule: dict[str, str],
) -> None:
    assert rule_matches(rule, FACTS)


@pytest.mark.parametrize(
    "rule",
    [
        # One field right, another wrong: a partial match is no match.
        {"ek_cert_issuer": ISSUER, "tpm_model": "other"},
        {"tpm_manufacturer": "id:00001014", "tpm_model": "swtpm2"},
        # Exact equality only: no case folding, no substrings, no prefixes.
        {"tpm_model": "SWTPM"},
        {"tpm_model": "sw"},
        {"ek_cert_issuer": "CN=swtpm"},
        {"ek_cert_issuer": ISSUER + ",O=x"},
    ],
    ids=["one-wrong", "model-wrong", "case", "substring", "issuer-prefix", "issuer-longer"],
)
def test_a_rule_with_any_field_that_differs_does_not_match(rule: dict[str, str]) -> None:
    assert not rule_matches(rule, FACTS)


@pytest.mark.parametrize(
    "rule",
    [{}, {"ek_cert_issuer": "", "tpm_manufacturer": "", "tpm_model": ""}, {"colour": "red"}],
    ids=["no-fields", "all-empty", "only-unknown-keys"],
)
def test_a_rule_that_requires_nothing_matches_nothing(rule: dict[str, str]) -> None:
    # Otherwise an empty rule would sweep every device of the fleet into its group.
    assert not rule_matches(rule, FACTS)
    assert not rule_matches(rule, {})


def test_unknown_keys_in_a_rule_are_ignored_beside_known_ones() -> None:
    assert rule_matches({"colour": "red", "tpm_model": "swtpm"}, FACTS)
    assert rule_matches({"ek_cert_serial": "nope", "tpm_model": "swtpm"}, FACTS)


def test_a_fact_the_certificate_did_not_carry_never_matches_a_value() -> None:
    facts = {**FACTS, "tpm_model": ""}
    assert not rule_matches({"tpm_model": "swtpm"}, facts)
    no_model = {k: v for k, v in FACTS.items() if k != "tpm_model"}
    assert not rule_matches({"tpm_model": "swtpm"}, no_model)
    # ... while a rule on the facts it did carry still matches.
    assert rule_matches({"ek_cert_issuer": ISSUER}, no_model)


# --- resolve_group ------------------------------------------------------------


def test_assignment_by_id_beats_rules_and_default() -> None:
    groups: Groups = [("a-rule", [MATCH]), ("default", []), ("pinned", [])]
    assert resolve_group("pinned", groups, FACTS, "default") == GroupChoice("pinned", "assigned")


def test_assignment_counts_even_into_the_default_group() -> None:
    groups: Groups = [("a-rule", [MATCH]), ("default", [])]
    assert resolve_group("default", groups, FACTS, "default") == GroupChoice("default", "assigned")


def test_a_matching_rule_beats_the_default_group() -> None:
    # The default group's name sorting first does not matter.
    groups: Groups = [("aaa-default", []), ("lab", [MATCH])]
    assert resolve_group(None, groups, FACTS, "aaa-default") == GroupChoice("lab", "rule")


def test_among_matching_rules_the_first_group_by_name_wins() -> None:
    groups: Groups = [("zeta", [MATCH]), ("mid", [MISS]), ("beta", [MATCH]), ("alpha", [MISS])]
    assert resolve_group(None, groups, FACTS, "default") == GroupChoice("beta", "rule")
    # Order of the input does not matter, only the names.
    assert resolve_group(None, list(reversed(groups)), FACTS, "default") == GroupChoice(
        "beta", "rule"
    )


def test_any_rule_of_a_group_is_enough() -> None:
    groups: Groups = [("lab", [MISS, {"ek_cert_issuer": "CN=other"}, MATCH])]
    assert resolve_group(None, groups, FACTS, "default") == GroupChoice("lab", "rule")


def test_the_default_group_has_rules_of_its_own() -> None:
    groups: Groups = [("default", [MATCH])]
    assert resolve_group(None, groups, FACTS, "default") == GroupChoice("default", "rule")


def test_no_assignment_and_no_matching_rule_lands_in_the_default_group() -> None:
    groups: Groups = [("a", [MISS]), ("lab", []), ("z", [{}])]
    assert resolve_group(None, groups, FACTS, "lab") == GroupChoice("lab", "default")


def test_no_group_at_all_when_the_default_group_does_not_exist() -> None:
    groups: Groups = [("a", [MISS]), ("z", [])]
    assert resolve_group(None, groups, FACTS, "default") == GroupChoice(None, "none")
    assert resolve_group(None, [], FACTS, "default") == GroupChoice(None, "none")


def test_a_group_without_rules_claims_no_device_by_rule() -> None:
    groups: Groups = [("a-empty", []), ("b", [MATCH])]
    assert resolve_group(None, groups, FACTS, "default") == GroupChoice("b", "rule")


def test_a_device_without_facts_only_lands_by_id_or_default() -> None:
    groups: Groups = [("lab", [MATCH]), ("default", [])]
    assert resolve_group(None, groups, {}, "default") == GroupChoice("default", "default")
    assert resolve_group("lab", groups, {}, "default") == GroupChoice("lab", "assigned")
