"""attestd.core.policy: reference-value documents, and refusals that name the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from attestd.core.errors import PolicyError
from attestd.core.limits import DEFAULT_LIMITS, Limits
from attestd.core.policy import Policy, load_policy_text, policy_from_document
from attestd.core.tpm import Alg, Bank

D0 = "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969"
D7A = "aa" * 32
D7B = "bb" * 32
SHA1_D = "11" * 20

EXAMPLE_YAML = f"""\
name: default
description: golden values of the lab fleet
allow_sha1: false          # SHA-1 banks and signatures only when true
pcrs:
  sha256:
    0: {D0}
    7: [ "{D7A}", "{D7B}" ]     # several allowed values
"""


def test_the_documented_example_loads() -> None:
    p = load_policy_text(EXAMPLE_YAML)
    assert p.name == "default"
    assert p.description == "golden values of the lab fleet"
    assert p.allow_sha1 is False
    assert p.pcrs == {
        Bank.SHA256: {
            0: frozenset({bytes.fromhex(D0)}),
            7: frozenset({bytes.fromhex(D7A), bytes.fromhex(D7B)}),
        }
    }
    assert p.selection() == ((Alg.SHA256.value, frozenset({0, 7})),)


def test_json_document_loads_the_same() -> None:
    doc = {
        "name": "default",
        "description": "golden values of the lab fleet",
        "allow_sha1": False,
        "pcrs": {"sha256": {"0": D0, "7": [D7A, D7B]}},
    }
    assert load_policy_text(json.dumps(doc)) == load_policy_text(EXAMPLE_YAML)


def test_sha1_bank_with_allow_sha1_and_selection_order() -> None:
    p = load_policy_text(
        f"name: both\nallow_sha1: true\n"
        f"pcrs:\n  sha256:\n    1: '{D7A}'\n  sha1:\n    0: '{SHA1_D}'\n"
    )
    # Canonical order is by bank algorithm id: sha1 (0x0004) before sha256 (0x000b).
    assert p.selection() == (
        (Alg.SHA1.value, frozenset({0})),
        (Alg.SHA256.value, frozenset({1})),
    )


def test_optional_fields_default() -> None:
    p = load_policy_text(f"name: minimal\npcrs: {{sha256: {{0: '{D0}'}}}}")
    assert (p.description, p.allow_sha1) == ("", False)


def test_digest_spellings_are_normalised() -> None:
    p = load_policy_text(f"name: n\npcrs:\n  sha256:\n    0: ' 0x{D0.upper()} '\n")
    assert p.pcrs[Bank.SHA256][0] == frozenset({bytes.fromhex(D0)})


# --- refusals ---------------------------------------------------------------


def _doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": "lab", "pcrs": {"sha256": {0: D0}}}
    doc.update(changes)
    return doc


def refusal(doc: object) -> PolicyError:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(PolicyError) as info:
        load_policy_text(text)
    assert info.value.code == "POLICY_INVALID"
    return info.value


@pytest.mark.parametrize(
    "doc, field",
    [
        (_doc(pcrs={"sha3": {0: D0}}), "pcrs.sha3"),
        (_doc(pcrs={"md5": {0: D0}}), "pcrs.md5"),
        (_doc(pcrs={"sha256": {0: D0[:-2]}}), "pcrs.sha256.0"),
        (_doc(pcrs={"sha256": {0: D0 + "00"}}), "pcrs.sha256.0"),
        (_doc(pcrs={"sha256": {7: [D7A, D7B[:-1]]}}), "pcrs.sha256.7[1]"),
        (_doc(pcrs={"sha384": {0: D0}}), "pcrs.sha384.0"),
        (_doc(pcrs={"sha256": {24: D0}}), "pcrs.sha256.24"),
        (_doc(pcrs={"sha256": {-1: D0}}), "pcrs.sha256.-1"),
        (_doc(pcrs={"sha256": {"x": D0}}), "pcrs.sha256.x"),
        (_doc(pcrs={"sha256": {"1.5": D0}}), "pcrs.sha256.1.5"),
        (_doc(pcrs={}), "pcrs"),
        (_doc(pcrs=[]), "pcrs"),
        (_doc(pcrs=None), "pcrs"),
        ({"name": "lab"}, "pcrs"),
        (_doc(pcrs={"sha256": {}}), "pcrs.sha256"),
        (_doc(pcrs={"sha256": [D0]}), "pcrs.sha256"),
        (_doc(pcrs={"sha256": {0: []}}), "pcrs.sha256.0"),
        (_doc(pcrs={"sha1": {0: SHA1_D}}), "pcrs.sha1"),
        (_doc(pcrs={"sha1": {0: SHA1_D}}, allow_sha1="yes"), "allow_sha1"),
        (_doc(pcr={"sha256": {0: D0}}), "pcr"),
        (_doc(version=2), "version"),
        (_doc(name=""), "name"),
        (_doc(name="has space"), "name"),
        (_doc(name="-leading-dash"), "name"),
        (_doc(name="x" * 65), "name"),
        (_doc(name=7), "name"),
        ({"pcrs": {"sha256": {0: D0}}}, "name"),
        (_doc(description=["not", "a", "string"]), "description"),
        (_doc(pcrs={"sha256": {0: "zz" * 32}}), "pcrs.sha256.0"),
        (_doc(pcrs={"sha256": {0: "0x"}}), "pcrs.sha256.0"),
        (_doc(pcrs={"sha256": {0: "a-" * 32}}), "pcrs.sha256.0"),
        (_doc(pcrs={"sha256": {0: 1234}}), "pcrs.sha256.0"),
        (_doc(pcrs={"sha256": {0: {"digest": D0}}}), "pcrs.sha256.0"),
        (
            _doc(pcrs={"sha256": {0: [D0] * (DEFAULT_LIMITS.max_digests_per_pcr + 1)}}),
            "pcrs.sha256.0",
        ),
        ([], "document"),
        ("just a string", "document"),
        (42, "document"),
    ],
)
def test_refusal_names_the_field(doc: object, field: str) -> None:
    err = refusal(doc if not isinstance(doc, str) else json.dumps(doc))
    assert err.field == field, str(err)
    assert field in str(err)


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "null", "~"])
def test_empty_policy_is_refused(text: str) -> None:
    assert refusal(text).field == "document"


def test_pcr_index_as_boolean_is_refused() -> None:
    err = refusal(f"name: n\npcrs:\n  sha256:\n    true: '{D0}'\n")
    assert err.field == "pcrs.sha256.True"


def test_unquoted_all_digit_digest_is_refused_with_advice() -> None:
    # YAML reads this as an integer (and a leading-zero one as octal): refuse the guess.
    digits = "1234567890" * 6 + "1234"
    for text in (digits, "01234567" * 8):
        err = refusal(f"name: n\npcrs:\n  sha256:\n    0: {text}\n")
        assert err.field == "pcrs.sha256.0"
        assert "quote it in YAML" in str(err)
    # Quoted, the same digits are fine.
    ok = load_policy_text(f"name: n\npcrs:\n  sha256:\n    0: '{digits}'\n")
    assert ok.pcrs[Bank.SHA256][0] == frozenset({bytes.fromhex(digits)})


def test_pcr_listed_twice_is_refused() -> None:
    err = refusal(f"name: n\npcrs:\n  sha256:\n    7: '{D7A}'\n    '7': '{D7B}'\n")
    assert err.field == "pcrs.sha256.7"


def test_bank_listed_twice_under_two_spellings_is_refused() -> None:
    err = refusal(f"name: n\npcrs:\n  sha256:\n    7: '{D7A}'\n  SHA256:\n    8: '{D7B}'\n")
    assert err.field == "pcrs.SHA256"


def test_pcr_index_that_isdigit_but_is_no_number_is_a_policy_error() -> None:
    err = refusal(f"name: n\npcrs:\n  sha256:\n    '\u00b2': '{D0}'\n")
    assert err.field.startswith("pcrs.sha256.")


def test_name_with_a_trailing_newline_is_refused() -> None:
    assert refusal(_doc(name="lab\n")).field == "name"


def test_invalid_yaml_names_the_line() -> None:
    err = refusal("name: n\npcrs: [unclosed\n")
    assert err.field == "document"
    assert "line" in str(err)


def test_oversize_document_is_refused_before_parsing() -> None:
    pad = "#" * DEFAULT_LIMITS.max_policy_size + "\n"
    err = refusal(pad + f"name: n\npcrs: {{sha256: {{0: '{D0}'}}}}\n")
    assert err.field == "document"
    # The limit is the caller's to set.
    small = Limits(max_policy_size=64)
    with pytest.raises(PolicyError) as info:
        load_policy_text(EXAMPLE_YAML, small)
    assert info.value.field == "document"


def test_yaml_cannot_build_objects() -> None:
    err = refusal("!!python/object/apply:os.system ['true']\n")
    assert err.field == "document"


def test_policy_from_document_takes_parsed_documents() -> None:
    p = policy_from_document({"name": "lab", "pcrs": {"sha256": {0: D0}}})
    assert isinstance(p, Policy)
    with pytest.raises(PolicyError) as info:
        policy_from_document("name: lab")
    assert info.value.field == "document"


# --- canonical form and digest --------------------------------------------


def test_equivalent_documents_have_one_digest() -> None:
    spellings = [
        EXAMPLE_YAML,
        json.dumps(
            {
                "pcrs": {"sha256": {"7": [D7B, D7A], "0": D0}},
                "allow_sha1": False,
                "description": "golden values of the lab fleet",
                "name": "default",
            }
        ),
        yaml.safe_dump(
            {
                "name": "default",
                "description": "golden values of the lab fleet",
                "pcrs": {"SHA256": {7: [D7A.upper(), "0x" + D7B, D7A], 0: [D0]}},
            }
        ),
    ]
    policies = [load_policy_text(t) for t in spellings]
    assert len({p.digest() for p in policies}) == 1
    assert len({p.canonical_json() for p in policies}) == 1
    assert policies[0].to_document() == {
        "name": "default",
        "description": "golden values of the lab fleet",
        "allow_sha1": False,
        "pcrs": {"sha256": {"0": [D0], "7": [D7A, D7B]}},
    }


def test_canonical_json_round_trips() -> None:
    p = load_policy_text(EXAMPLE_YAML)
    again = load_policy_text(p.canonical_json())
    assert again == p
    assert again.digest() == p.digest()
    assert len(p.digest()) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"description": "other"},
        {"name": "other"},
        {"pcrs": {"sha256": {"0": D0, "7": [D7A]}}},
        {"pcrs": {"sha256": {"0": D0, "7": [D7A, D7B], "8": D7A}}},
    ],
)
def test_a_different_policy_has_a_different_digest(change: dict[str, Any]) -> None:
    base = load_policy_text(EXAMPLE_YAML)
    doc = {**base.to_document(), **change}
    assert policy_from_document(doc).digest() != base.digest()


def test_allow_sha1_is_part_of_the_digest() -> None:
    doc = load_policy_text(EXAMPLE_YAML).to_document()
    assert (
        policy_from_document({**doc, "allow_sha1": True}).digest()
        != policy_from_document(doc).digest()
    )
