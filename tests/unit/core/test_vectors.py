"""Every vector in tests/vectors/ appraises as it says it must.

The vectors are real swtpm quotes (some altered afterwards, as each one's
description says), made by tests/vectors/generate.py, which also documents
the file format. One loader feeds one parametrized test, as pyca's
Wycheproof tests do.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from attestd.core.errors import MalformedError
from attestd.core.policy import policy_from_document
from attestd.core.quote import ClockState, appraise_quote, parse_evidence
from attestd.core.tpm import parse_public

REPO = Path(__file__).resolve().parents[3]
VECTOR_DIR = REPO / "tests" / "vectors"
VECTORS = sorted(VECTOR_DIR.glob("*.json"))
EXPECTATION_KEYS = ("expect", "status", "codes", "warnings", "field", "allow_sha1")

# Defects the suite must always carry: deleting one of these files fails here.
REQUIRED = {
    "quote_valid_rsa",
    "quote_valid_ecc",
    "quote_nonce_mismatch",
    "quote_signature_flipped",
    "quote_attest_flipped",
    "quote_signed_by_another_ak",
    "quote_pcr_digest_mismatch",
    "quote_pcr_values_missing",
    "quote_selection_short_of_policy",
    "quote_pcr4_tampered_boot",
    "quote_reset_count_rollback",
    "quote_restart_count_rollback",
    "quote_clock_replay",
    "quote_firmware_downgrade",
    "quote_sha1_signature",
    "quote_truncated",
}


def check(vector: dict[str, Any]) -> None:
    """Appraise one vector and compare with what it declares."""
    b64 = base64.b64decode
    ak = parse_public(b64(vector["ak_public"]))
    pcrs = {
        bank: {int(i): bytes.fromhex(d) for i, d in values.items()}
        for bank, values in vector["pcrs"].items()
    }
    try:
        evidence = parse_evidence(b64(vector["quote"]), b64(vector["signature"]), pcrs)
    except MalformedError as e:
        assert vector["expect"] == "malformed", f"unexpectedly malformed: {e}"
        assert e.field == vector["field"], str(e)
        return
    assert vector["expect"] != "malformed", "parsed, but the vector expects MalformedError"

    nonce = None if vector["nonce"] is None else bytes.fromhex(vector["nonce"])
    policy = policy_from_document(vector["policy"]) if vector["policy"] else None
    previous = ClockState(**vector["previous"]) if vector["previous"] else None
    appraisal = appraise_quote(
        evidence,
        ak,
        nonce=nonce,
        policy=policy,
        previous=previous,
        now_ms=0,
        allow_sha1=vector["allow_sha1"],
    )
    verdict = appraisal.verdict
    assert verdict.status.value == vector["status"]
    assert verdict.codes() == vector["codes"]
    assert [w.code.value for w in verdict.warnings] == vector["warnings"]
    if vector["expect"] == "valid":
        assert not vector["codes"]
        assert appraisal.accepted_clock == ClockState.of(evidence.attest)
    else:
        assert vector["codes"]
        assert appraisal.accepted_clock is None


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_vector(path: Path) -> None:
    vector = json.loads(path.read_text())
    assert vector["expect"] in ("valid", "invalid", "malformed")
    assert vector["description"]
    check(vector)


def test_required_defects_are_present() -> None:
    assert {p.stem for p in VECTORS} >= REQUIRED


def test_generator_still_makes_these_vectors(tmp_path: Path) -> None:
    """The committed generator reproduces the committed set: same names, same
    expectations, and its fresh evidence appraises as declared."""
    proc = subprocess.run(
        [sys.executable, str(VECTOR_DIR / "generate.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    fresh = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    committed = {p.stem: json.loads(p.read_text()) for p in VECTORS}
    assert sorted(fresh) == sorted(committed)
    for name, vector in fresh.items():
        for key in EXPECTATION_KEYS:
            assert vector.get(key) == committed[name].get(key), (name, key)
        check(vector)
