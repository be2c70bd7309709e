"""attestd.core.audit: the hash-chained audit log names each tampering once."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from attestd.core.audit import (
    GENESIS,
    MAX_DETAIL_BYTES,
    AuditRecord,
    Checkpoint,
    Finding,
    canonical_detail,
    checkpoint_message,
    checkpoint_to_json,
    make_record,
    parse_export_line,
    record_hash,
    record_to_json,
    sign_checkpoint,
    verify_log,
)

T0 = 1_700_000_000_000
KID = "audit-key-1"
KEY = ec.generate_private_key(ec.SECP256R1())
KEYS = {KID: KEY.public_key()}
CHECKPOINT_SEQS = (5, 10, 15, 20)

KINDS = ("device.enrolled", "attestation.verdict", "policy.put", "auth.failed")
ACTORS = (
    "device:dev-01",
    "token:3 (ci-bot, policy-author)",
    "local-admin",
    "anonymous 127.0.0.1:5555",
)


def build_chain(n: int = 20, start: list[AuditRecord] | None = None) -> list[AuditRecord]:
    """``n`` records in all, continuing ``start`` (whose last record is kept as is)."""
    records = list(start or [])
    while len(records) < n:
        i = len(records) + 1
        prev = records[-1] if records else None
        detail: dict[str, Any] = {"i": i, "ok": i % 2 == 0, "note": f"é {i}", "list": [i, None]}
        records.append(
            make_record(prev, T0 + 1000 * i, KINDS[i % 4], ACTORS[i % 4], f"subj-{i}", detail)
        )
    return records


def checkpoints_for(
    records: list[AuditRecord], seqs: tuple[int, ...] = CHECKPOINT_SEQS
) -> list[Checkpoint]:
    return [sign_checkpoint(KEY, KID, records[s - 1], T0 + 1000 * s + 500) for s in seqs]


CHAIN = build_chain()
CHECKPOINTS = checkpoints_for(CHAIN)


def codes(findings: list[Finding]) -> list[tuple[str, int]]:
    return [(f.code, f.seq) for f in findings]


def verify(
    records: list[AuditRecord], checkpoints: list[Checkpoint] | None = None, **kw: Any
) -> list[Finding]:
    return verify_log(records, CHECKPOINTS if checkpoints is None else checkpoints, KEYS, **kw)


def rehash(r: AuditRecord, **changes: Any) -> AuditRecord:
    """``r`` with ``changes`` and a hash recomputed to match (what a careful editor does)."""
    r = replace(r, **changes)
    digest = record_hash(
        r.prev_hash, r.seq, r.at_ms, r.kind, r.actor, r.subject, canonical_detail(r.detail)
    )
    return replace(r, hash=digest)


# -- a good log --------------------------------------------------------------------------------


def test_good_log_has_no_findings() -> None:
    assert verify(CHAIN) == []


def test_empty_log_is_good() -> None:
    assert verify_log([], [], KEYS) == []


def test_chain_shape() -> None:
    assert CHAIN[0].seq == 1 and CHAIN[0].prev_hash == GENESIS
    for a, b in itertools.pairwise(CHAIN):
        assert b.seq == a.seq + 1 and b.prev_hash == a.hash
        assert len(b.hash) == 32


def test_record_hash_is_the_documented_bytes() -> None:
    r = CHAIN[6]
    body = json.dumps(
        [r.seq, r.at_ms, r.kind, r.actor, r.subject, canonical_detail(r.detail)],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    assert r.hash == hashlib.sha256(b"attestd-audit-v1\0" + r.prev_hash + body).digest()


def test_record_hash_fields_cannot_shift() -> None:
    # The same characters split differently between fields give different hashes.
    a = record_hash(GENESIS, 1, 0, "a", "bc", "", "{}")
    b = record_hash(GENESIS, 1, 0, "ab", "c", "", "{}")
    assert a != b


def test_checkpoint_message_is_the_documented_bytes() -> None:
    h = CHAIN[9].hash
    assert checkpoint_message(10, h, 123) == b"attestd-audit-checkpoint-v1\0" + h + b"[10,123]"


def test_record_hash_refuses_wrong_types() -> None:
    with pytest.raises(ValueError, match="prev_hash"):
        record_hash(b"short", 1, 0, "k", "a", "", "{}")
    with pytest.raises(ValueError, match="seq"):
        record_hash(GENESIS, True, 0, "k", "a", "", "{}")
    with pytest.raises(ValueError, match="seq"):
        record_hash(GENESIS, 0, 0, "k", "a", "", "{}")
    with pytest.raises(ValueError, match="actor"):
        record_hash(GENESIS, 1, 0, "k", 5, "", "{}")  # type: ignore[arg-type]


# -- tampering with records ----------------------------------------------------------------------


def test_edited_detail_without_rehash() -> None:
    log = list(CHAIN)
    log[6] = replace(log[6], detail={**log[6].detail, "ok": True, "i": 99})
    findings = verify(log)
    assert codes(findings) == [("RECORD_EDITED", 7)]
    assert "record 7" in findings[0].message


@pytest.mark.parametrize("field", ["kind", "actor", "subject", "at_ms"])
def test_edited_field_without_rehash(field: str) -> None:
    log = list(CHAIN)
    value: Any = T0 if field == "at_ms" else "forged"
    log[11] = replace(log[11], **{field: value})
    assert codes(verify(log)) == [("RECORD_EDITED", 12)]


def test_edited_prev_hash_without_rehash() -> None:
    log = list(CHAIN)
    log[11] = replace(log[11], prev_hash=bytes(range(32)))
    assert codes(verify(log)) == [("RECORD_EDITED", 12)]


def test_edited_with_rehash() -> None:
    log = list(CHAIN)
    log[6] = rehash(log[6], detail={"i": 7, "ok": True})
    findings = verify(log)
    assert codes(findings) == [("RECORD_EDITED", 7)]
    assert "hash recomputed" in findings[0].message and "record 8" in findings[0].message


def test_edited_with_rehash_at_a_checkpoint_is_one_finding() -> None:
    log = list(CHAIN)
    log[9] = rehash(log[9], actor="someone-else")
    assert codes(verify(log)) == [("RECORD_EDITED", 10)]


def test_edited_last_record_with_rehash_is_caught_by_its_checkpoint() -> None:
    log = list(CHAIN)
    log[19] = rehash(log[19], subject="other")
    assert codes(verify(log)) == [("CHECKPOINT_MISMATCH", 20)]


def test_deleted_middle_record() -> None:
    log = CHAIN[:6] + CHAIN[7:]
    findings = verify(log)
    assert codes(findings) == [("RECORD_DELETED", 7)]
    assert findings[0].message == "record 7 is missing (between 6 and 8)"


def test_deleted_several_middle_records() -> None:
    log = CHAIN[:6] + CHAIN[9:]
    findings = verify(log)
    assert codes(findings) == [("RECORD_DELETED", 7)]
    assert findings[0].message == "records 7 to 9 are missing (between 6 and 10)"


def test_deleted_first_records() -> None:
    findings = verify(CHAIN[2:])
    assert codes(findings) == [("RECORD_DELETED", 1)]
    assert findings[0].message == "records 1 to 2 are missing (before 3)"


def test_deleted_middle_record_and_renumbered() -> None:
    log = CHAIN[:6] + [replace(r, seq=r.seq - 1) for r in CHAIN[7:]]
    findings = verify(log)
    # The checkpoints vouch for the records under their written seqs: no mismatch.
    assert codes(findings) == [("RECORD_DELETED", 7)]
    assert "renumbered" in findings[0].message


def test_deleted_last_records_beyond_a_checkpoint() -> None:
    findings = verify(CHAIN[:17])
    assert codes(findings) == [("RECORDS_TRUNCATED", 18)]
    assert "18 to 20" in findings[0].message and "checkpoint 20" in findings[0].message


def test_deleted_last_records_without_a_checkpoint_goes_unseen() -> None:
    # Documented limit: only a checkpoint can show the newest records are gone.
    assert verify(CHAIN[:17], checkpoints_for(CHAIN, (5, 10, 15))) == []


def test_deleted_everything() -> None:
    assert codes(verify([])) == [("RECORDS_TRUNCATED", 1)]


def forged(prev: AuditRecord, seq: int) -> AuditRecord:
    """A record someone without the key adds after ``prev`` (it links properly)."""
    r = make_record(prev, prev.at_ms + 1, "policy.put", "local-admin", "default", {"x": 1})
    return rehash(r, seq=seq)


def test_inserted_linking_record_without_renumbering() -> None:
    x = forged(CHAIN[9], 11)
    findings = verify([*CHAIN[:10], x, *CHAIN[10:]])
    assert codes(findings) == [("RECORD_INSERTED", 11)]


def test_inserted_linking_record_after_its_duplicate() -> None:
    x = forged(CHAIN[9], 11)
    assert codes(verify([*CHAIN[:11], x, *CHAIN[11:]])) == [("RECORD_INSERTED", 11)]


def test_inserted_unlinked_record_without_renumbering() -> None:
    x = replace(forged(CHAIN[9], 11), prev_hash=bytes(range(32)))
    x = rehash(x)
    assert codes(verify([*CHAIN[:10], x, *CHAIN[10:]])) == [("RECORD_INSERTED", 11)]


def test_inserted_record_with_renumbering() -> None:
    x = forged(CHAIN[9], 11)
    later = [replace(r, seq=r.seq + 1) for r in CHAIN[10:]]
    findings = verify([*CHAIN[:10], x, *later])
    assert codes(findings) == [("RECORD_INSERTED", 11)]


def test_inserted_unlinked_record_with_renumbering() -> None:
    x = rehash(forged(CHAIN[9], 11), prev_hash=bytes(32 * [7]))
    later = [replace(r, seq=r.seq + 1) for r in CHAIN[10:]]
    assert codes(verify([*CHAIN[:10], x, *later])) == [("RECORD_INSERTED", 11)]


def test_inserted_exact_duplicate() -> None:
    assert codes(verify([*CHAIN[:10], CHAIN[9], *CHAIN[10:]])) == [("RECORD_INSERTED", 10)]


def test_inserted_before_the_last_record_is_settled_by_the_checkpoint() -> None:
    x = forged(CHAIN[18], 20)
    assert codes(verify([*CHAIN[:19], x, CHAIN[19]])) == [("RECORD_INSERTED", 20)]


def test_swapped_records() -> None:
    log = list(CHAIN)
    log[6], log[7] = log[7], log[6]
    findings = verify(log)
    assert codes(findings) == [("RECORDS_REORDERED", 7)]
    assert "7 and 8" in findings[0].message


def test_swapped_distant_records() -> None:
    log = list(CHAIN)
    log[3], log[15] = log[15], log[3]
    findings = verify(log)
    assert codes(findings) == [("RECORDS_REORDERED", 4)]
    assert "4 and 16" in findings[0].message


def test_swapped_records_with_renumbered_seqs() -> None:
    log = list(CHAIN)
    log[6], log[7] = replace(log[7], seq=7), replace(log[6], seq=8)
    findings = verify(log)
    assert codes(findings) == [("RECORDS_REORDERED", 7)]
    assert "7 and 8" in findings[0].message


def test_renumbered_single_record() -> None:
    log = list(CHAIN)
    log[7] = replace(log[7], seq=9)  # two records numbered 9 now, no 8
    findings = verify(log)
    assert codes(findings) == [("RECORD_EDITED", 9)]
    assert "written as record 8" in findings[0].message


def test_rehashed_record_and_renumbered_successor_are_both_named() -> None:
    log = list(CHAIN)
    log[11] = replace(log[11], seq=11)
    log[10] = rehash(log[10], subject="y")
    assert codes(verify(log)) == [("RECORD_EDITED", 11), ("RECORD_EDITED", 11)]


def test_malformed_record_fields_are_findings_not_errors() -> None:
    log = list(CHAIN)
    log[4] = replace(log[4], detail={"x": 1.5}, prev_hash=b"short")
    assert codes(verify(log)) == [("RECORD_EDITED", 5)]


def test_rewritten_chain_is_caught_by_an_old_checkpoint() -> None:
    old_checkpoint = checkpoints_for(CHAIN, (10,))
    rewritten = list(CHAIN[:4])
    for r in CHAIN[4:]:
        detail = {**r.detail, "ok": True}
        rewritten.append(make_record(rewritten[-1], r.at_ms, r.kind, r.actor, r.subject, detail))
    assert verify(rewritten, []) == []
    findings = verify(rewritten, old_checkpoint)
    assert codes(findings) == [("CHECKPOINT_MISMATCH", 10)]
    assert codes(verify(rewritten, checkpoints_for(CHAIN, (3, 10)))) == [
        ("CHECKPOINT_MISMATCH", 10)
    ]
    # All four checkpoints disagree, but that is one rewrite: one finding, at the first.
    findings = verify(rewritten)
    assert codes(findings) == [("CHECKPOINT_MISMATCH", 5)]
    assert "3 later checkpoint(s)" in findings[0].message


def test_two_separate_tamperings_give_two_findings() -> None:
    log = list(CHAIN)
    log[2] = replace(log[2], kind="forged")
    del log[12]
    assert codes(verify(log)) == [("RECORD_EDITED", 3), ("RECORD_DELETED", 13)]


# -- tampering with checkpoints ------------------------------------------------------------------


def test_forged_checkpoint_signature() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    cps = list(CHECKPOINTS)
    cps[1] = sign_checkpoint(other, KID, CHAIN[9], T0)
    assert codes(verify(CHAIN, cps)) == [("CHECKPOINT_BAD_SIGNATURE", 10)]


def test_checkpoint_with_altered_fields_fails_its_signature() -> None:
    cps = list(CHECKPOINTS)
    cps[2] = replace(cps[2], at_ms=cps[2].at_ms + 1)
    cps[3] = replace(cps[3], signature=b"\x30\x00")
    assert codes(verify(CHAIN, cps)) == [
        ("CHECKPOINT_BAD_SIGNATURE", 15),
        ("CHECKPOINT_BAD_SIGNATURE", 20),
    ]


def test_checkpoint_with_unknown_kid() -> None:
    cps = list(CHECKPOINTS)
    cps[0] = replace(cps[0], kid="who-knows")
    findings = verify(CHAIN, cps)
    assert codes(findings) == [("CHECKPOINT_UNKNOWN_KEY", 5)]
    assert "who-knows" in findings[0].message


def test_forged_checkpoint_beyond_the_log_is_not_a_truncation() -> None:
    cps = [*CHECKPOINTS, replace(CHECKPOINTS[-1], seq=30)]
    assert codes(verify(CHAIN, cps)) == [("CHECKPOINT_BAD_SIGNATURE", 30)]


# -- suffix verification -------------------------------------------------------------------------


def test_suffix_is_good_with_first_prev_hash_none() -> None:
    assert verify(CHAIN[7:], first_prev_hash=None) == []
    # The same records as a whole log: the first seven are missing.
    assert codes(verify(CHAIN[7:])) == [("RECORD_DELETED", 1)]


def test_suffix_given_the_hash_before_it() -> None:
    assert verify(CHAIN[7:], first_prev_hash=CHAIN[6].hash) == []
    assert codes(verify(CHAIN[7:], first_prev_hash=CHAIN[5].hash)) == [("CHAIN_BROKEN", 8)]


def test_suffix_first_record_is_still_checked() -> None:
    log = CHAIN[7:]
    log[0] = replace(log[0], subject="forged")
    assert codes(verify(log, first_prev_hash=None)) == [("RECORD_EDITED", 8)]


def test_suffix_ignores_checkpoints_before_it() -> None:
    cps = [replace(CHECKPOINTS[0], signature=b"bad"), *CHECKPOINTS[1:]]
    assert verify(CHAIN[7:], cps, first_prev_hash=None) == []
    assert codes(verify(CHAIN[7:15], first_prev_hash=None)) == [("RECORDS_TRUNCATED", 16)]


def test_empty_suffix() -> None:
    assert verify([], first_prev_hash=None) == []


# -- checkpoints and signing ---------------------------------------------------------------------


def test_sign_checkpoint_fields() -> None:
    cp = CHECKPOINTS[1]
    assert (cp.seq, cp.hash, cp.kid) == (10, CHAIN[9].hash, KID)
    KEY.public_key().verify(
        cp.signature,
        checkpoint_message(cp.seq, cp.hash, cp.at_ms),
        ec.ECDSA(hashes.SHA256()),
    )


def test_sign_checkpoint_refuses_other_curves() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="P-256"):
        sign_checkpoint(p384, KID, CHAIN[0], T0)


# -- canonical detail ----------------------------------------------------------------------------


def test_canonical_detail_is_sorted_and_compact() -> None:
    assert canonical_detail({"b": [1, None], "a": "é", "c": {"z": True, "y": 0}}) == (
        '{"a":"é","b":[1,null],"c":{"y":0,"z":true}}'
    )


@pytest.mark.parametrize(
    "detail",
    [
        {"x": float("nan")},
        {"x": 1.5},
        {"x": b"bytes"},
        {"x": (1, 2)},
        {"x": {1: "int key"}},
        {"x": object()},
        {"x": "\ud800"},
    ],
)
def test_canonical_detail_refuses_non_json(detail: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="detail"):
        canonical_detail(detail)


def test_canonical_detail_refuses_deep_nesting() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(100):
        node["n"] = {}
        node = node["n"]
    with pytest.raises(ValueError, match="deeper"):
        canonical_detail(deep)


def test_canonical_detail_size_limit_counts_utf8_bytes() -> None:
    overhead = len('{"s":""}')
    canonical_detail({"s": "a" * (MAX_DETAIL_BYTES - overhead)})
    with pytest.raises(ValueError, match="more than"):
        canonical_detail({"s": "a" * (MAX_DETAIL_BYTES - overhead + 1)})
    with pytest.raises(ValueError, match="more than"):
        canonical_detail({"s": "é" * (MAX_DETAIL_BYTES // 2)})


def test_make_record_refuses_bad_detail() -> None:
    with pytest.raises(ValueError):
        make_record(None, T0, "policy.put", "local-admin", "", {"big": "x" * MAX_DETAIL_BYTES})
    with pytest.raises(ValueError, match="kind"):
        make_record(None, T0, "", "local-admin", "", {})


# -- JSON lines export ---------------------------------------------------------------------------


def test_record_json_round_trip() -> None:
    for r in CHAIN:
        obj = record_to_json(r)
        line = json.dumps(obj, ensure_ascii=False)
        assert parse_export_line(line) == r
        assert parse_export_line(line.encode()) == r
    obj = record_to_json(CHAIN[0])
    assert obj["type"] == "record" and obj["time"] == "2023-11-14T22:13:21.000Z"
    assert obj["prev_hash"] == "00" * 32 and obj["hash"] == CHAIN[0].hash.hex()


def test_checkpoint_json_round_trip() -> None:
    for c in CHECKPOINTS:
        obj = checkpoint_to_json(c)
        assert "=" not in obj["signature"]
        assert parse_export_line(json.dumps(obj) + "\n") == c
    obj = checkpoint_to_json(CHECKPOINTS[0])
    assert obj["type"] == "checkpoint" and obj["time"] == "2023-11-14T22:13:25.500Z"


def test_exported_log_verifies_after_round_trip() -> None:
    lines = [json.dumps(record_to_json(r)) for r in CHAIN]
    lines += [json.dumps(checkpoint_to_json(c)) for c in CHECKPOINTS]
    parsed = [parse_export_line(line) for line in lines]
    records = [p for p in parsed if isinstance(p, AuditRecord)]
    cps = [p for p in parsed if isinstance(p, Checkpoint)]
    assert verify_log(records, cps, KEYS) == []


def test_time_is_ignored_on_parse() -> None:
    obj = record_to_json(CHAIN[3])
    obj["time"] = "whenever"
    assert parse_export_line(json.dumps(obj)) == CHAIN[3]


def record_line(**changes: Any) -> str:
    obj = record_to_json(CHAIN[4])
    for k, v in changes.items():
        if v is KeyError:
            del obj[k]
        else:
            obj[k] = v
    return json.dumps(obj)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"hash": "zz" * 32}, "hash"),
        ({"hash": "AB" * 32}, "hash"),
        ({"prev_hash": "00" * 31}, "prev_hash"),
        ({"seq": "5"}, "seq"),
        ({"seq": 5.0}, "seq"),
        ({"seq": True}, "seq"),
        ({"seq": 0}, "seq"),
        ({"at_ms": None}, "at_ms"),
        ({"kind": 3}, "kind"),
        ({"kind": ""}, "kind"),
        ({"actor": ["a"]}, "actor"),
        ({"detail": "{}"}, "detail"),
        ({"detail": {"x": 1.5}}, "detail"),
        ({"subject": KeyError}, "subject"),
        ({"hash": KeyError}, "hash"),
        ({"extra": 1}, "extra"),
        ({"type": "other"}, "type"),
        ({"type": KeyError}, "type"),
    ],
)
def test_malformed_record_lines(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        parse_export_line(record_line(**changes))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"signature": "not base64!"}, "signature"),
        ({"signature": base64.urlsafe_b64encode(b"sig").decode() + "="}, "signature"),
        ({"signature": ""}, "signature"),
        ({"kid": 7}, "kid"),
        ({"hash": "0"}, "hash"),
        ({"at_ms": KeyError}, "at_ms"),
        ({"kind": "record"}, "kind"),
    ],
)
def test_malformed_checkpoint_lines(changes: dict[str, Any], field: str) -> None:
    obj = checkpoint_to_json(CHECKPOINTS[0])
    for k, v in changes.items():
        if v is KeyError:
            del obj[k]
        else:
            obj[k] = v
    with pytest.raises(ValueError, match=field):
        parse_export_line(json.dumps(obj))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"type":"record","seq":NaN}', "NaN"),
        (record_line().replace('"i": 5', '"i": Infinity'), "Infinity"),
        (record_line().replace('"i": 5', '"i": -Infinity'), "Infinity"),
        ('{"type":"record","type":"record"}', "duplicate"),
        ("[1, 2]", "object"),
        ("not json", "not JSON"),
        ("", "not JSON"),
        ("[" * 100_000 + "]" * 100_000, "longer than"),
        ("[" * 30_000 + "]" * 30_000, "line"),
    ],
)
def test_malformed_lines(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_export_line(line)


def test_too_long_line() -> None:
    obj = record_to_json(CHAIN[0])
    obj["detail"] = {"pad": "x" * 70_000}
    with pytest.raises(ValueError, match="longer than"):
        parse_export_line(json.dumps(obj))
    with pytest.raises(ValueError, match="longer than"):
        parse_export_line(json.dumps(obj).encode())


def test_bad_utf8_line() -> None:
    with pytest.raises(ValueError, match="UTF-8"):
        parse_export_line(b'{"type":"record","kind":"\xff"}')


def test_oversize_detail_in_line() -> None:
    with pytest.raises(ValueError, match="detail"):
        parse_export_line(record_line(detail={"pad": "x" * (MAX_DETAIL_BYTES + 1)}))


@pytest.mark.parametrize(
    ("detail", "message"),
    [
        ({"a": [{"b": 1.5}]}, r"detail\.a\[0\]\.b: float is not allowed"),
        ({"a": {"b": {2: "x"}}}, r"detail\.a\.b: object key 2 is not a string"),
        ({"ok": [1, "two", None, True], "bad": [b"x"]}, r"detail\.bad\[0\]: bytes"),
    ],
)
def test_canonical_detail_names_where_a_value_is_refused(
    detail: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        canonical_detail(detail)
