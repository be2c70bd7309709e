"""The tamper-evident audit log: a hash chain of records and signed checkpoints.

Pure: no I/O, no store, no clock. The store appends what ``make_record``
returns and, now and then, what ``sign_checkpoint`` returns; ``verify_log``
reads them back and names what was changed.

Why a chain and checkpoints: each record carries the hash of the one before
it, so editing, deleting, inserting or reordering records breaks a link
somewhere. The hash is unkeyed (anyone may recompute it, which is the point of
an audit log), so someone with write access to the store could rewrite the
chain from some record on and recompute every hash. A checkpoint is the
verifier key's ECDSA signature over one record's hash: a rewritten chain no
longer matches the hash an old checkpoint vouches for, and deleting the newest
records leaves a checkpoint that names a record that is no longer there.

Exact bytes, so an auditor can recompute both with any tool
(``canonical JSON`` below is ``json.dumps(value, sort_keys=True,
separators=(",", ":"), ensure_ascii=False, allow_nan=False)`` encoded as UTF-8):

- ``detail_json`` = canonical JSON of the record's detail object.
- record hash = ``SHA-256( b"attestd-audit-v1" || 0x00 || prev_hash ||
  canonical JSON of [seq, at_ms, kind, actor, subject, detail_json] )``,
  ``prev_hash`` being the 32 raw bytes of the previous record's hash (32 zero
  bytes for record 1). ``detail_json`` goes in as a JSON *string*, so the
  array is e.g. ``[7,1700000000123,"policy.put","local-admin","default",
  "{\\"version\\":3}"]``.
- checkpoint message = ``b"attestd-audit-checkpoint-v1" || 0x00 || hash ||
  canonical JSON of [seq, at_ms]``, ``hash`` being the 32 raw bytes of record
  ``seq``'s hash and ``at_ms`` the checkpoint's own time. The signature is
  ECDSA P-256 with SHA-256, DER-encoded.

For example, checking each record of an export on its own, in Python::

    c = lambda v: json.dumps(v, sort_keys=True, separators=(",", ":"),
                             ensure_ascii=False, allow_nan=False)
    body = c([r["seq"], r["at_ms"], r["kind"], r["actor"], r["subject"], c(r["detail"])])
    ok = hashlib.sha256(b"attestd-audit-v1\\0" + bytes.fromhex(r["prev_hash"])
                        + body.encode()).hexdigest() == r["hash"]

The fixed-length hash sits between the prefix and the JSON, and JSON strings
are quoted and escaped, so no two different records encode to the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

GENESIS: bytes = bytes(32)
MAX_DETAIL_BYTES = 8192
MAX_LINE_BYTES = 64 * 1024
MAX_DETAIL_DEPTH = 32

RECORD_DOMAIN = b"attestd-audit-v1\0"
CHECKPOINT_DOMAIN = b"attestd-audit-checkpoint-v1\0"

# Finding codes: stable, callers and docs match on them.
RECORD_EDITED = "RECORD_EDITED"
RECORD_DELETED = "RECORD_DELETED"
RECORDS_TRUNCATED = "RECORDS_TRUNCATED"
RECORD_INSERTED = "RECORD_INSERTED"
RECORDS_REORDERED = "RECORDS_REORDERED"
CHAIN_BROKEN = "CHAIN_BROKEN"
CHECKPOINT_BAD_SIGNATURE = "CHECKPOINT_BAD_SIGNATURE"
CHECKPOINT_UNKNOWN_KEY = "CHECKPOINT_UNKNOWN_KEY"
CHECKPOINT_MISMATCH = "CHECKPOINT_MISMATCH"

# How many records a deletion followed by renumbering may have removed and
# still be recognised as such (each extra record costs one hash, once per break).
_RENUMBER_PROBE = 8

_HEX32 = re.compile(r"[0-9a-f]{64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True)
class AuditRecord:
    """One entry of the chain; ``hash`` is ``record_hash`` of the other fields."""

    seq: int
    at_ms: int
    kind: str
    actor: str
    subject: str
    detail: dict[str, Any]
    prev_hash: bytes
    hash: bytes


@dataclass(frozen=True)
class Checkpoint:
    """A signature by key ``kid`` vouching for the chain up to record ``seq``."""

    seq: int
    hash: bytes
    at_ms: int
    kid: str
    signature: bytes


@dataclass(frozen=True)
class Finding:
    """One piece of tampering ``verify_log`` found; ``seq`` is 0 when no record applies."""

    seq: int
    code: str
    message: str


# -- canonical encoding -----------------------------------------------------------------------


def _canonical(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


_JSON_SCALARS = (str, bool, int)


def _check_json_value(value: Any) -> None:
    """Only str/int/bool/None/list/dict (str keys), bounded depth; iterative, no recursion.

    Floats are refused: their text form differs between JSON libraries, so a
    hash over them would not be recomputable everywhere. (One pass without paths; a
    value that fails is walked again by _explain_json_value to name where.)
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    push = stack.append
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DETAIL_DEPTH:
            break
        if item is None or isinstance(item, _JSON_SCALARS):
            continue
        if isinstance(item, list):
            stack.extend([(v, depth + 1) for v in item])
        elif isinstance(item, dict):
            for k, v in item.items():
                if not isinstance(k, str):
                    break
                push((v, depth + 1))
            else:
                continue
            break
        else:
            break
    else:
        return
    _explain_json_value(value)
    raise ValueError("detail: not a JSON value attestd can hash")  # unreachable


def _explain_json_value(value: Any) -> None:
    """The same rules as _check_json_value, raising ValueError that names the path."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "detail")]
    while stack:
        item, depth, where = stack.pop()
        if depth > MAX_DETAIL_DEPTH:
            raise ValueError(f"{where}: nested deeper than {MAX_DETAIL_DEPTH}")
        if item is None or isinstance(item, _JSON_SCALARS):
            continue
        if isinstance(item, list):
            stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(item))
        elif isinstance(item, dict):
            for k, v in item.items():
                if not isinstance(k, str):
                    raise ValueError(f"{where}: object key {k!r} is not a string")
                stack.append((v, depth + 1, f"{where}.{k}"))
        else:
            raise ValueError(f"{where}: {type(item).__name__} is not allowed in an audit detail")


def canonical_detail(detail: Mapping[str, Any]) -> str:
    """The canonical JSON of a detail object; ValueError if not JSON-able or too long."""
    if not isinstance(detail, Mapping):
        raise ValueError("detail: must be an object")
    _check_json_value(dict(detail))
    text = _canonical(dict(detail))
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError("detail: contains a string that is not valid Unicode") from exc
    if size > MAX_DETAIL_BYTES:
        raise ValueError(f"detail: {size} bytes of canonical JSON, more than {MAX_DETAIL_BYTES}")
    return text


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer")
    return value


def _check_hash(name: str, value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise ValueError(f"{name}: must be 32 bytes")
    return value


def record_hash(
    prev_hash: bytes,
    seq: int,
    at_ms: int,
    kind: str,
    actor: str,
    subject: str,
    detail_json: str,
) -> bytes:
    """SHA-256 of the record's encoding (module docstring); ValueError on wrong types."""
    _check_hash("prev_hash", prev_hash)
    if _check_int("seq", seq) < 1:
        raise ValueError("seq: must be 1 or more")
    _check_int("at_ms", at_ms)
    for name, text in (
        ("kind", kind),
        ("actor", actor),
        ("subject", subject),
        ("detail_json", detail_json),
    ):
        if not isinstance(text, str):
            raise ValueError(f"{name}: must be a string")
    body = _canonical([seq, at_ms, kind, actor, subject, detail_json]).encode("utf-8")
    return hashlib.sha256(RECORD_DOMAIN + prev_hash + body).digest()


def make_record(
    prev: AuditRecord | None,
    at_ms: int,
    kind: str,
    actor: str,
    subject: str,
    detail: Mapping[str, Any],
) -> AuditRecord:
    """The record that follows ``prev`` (or the first record when ``prev`` is None)."""
    if not isinstance(kind, str) or not kind:
        raise ValueError("kind: must be a non-empty string")
    seq = 1 if prev is None else prev.seq + 1
    prev_hash = GENESIS if prev is None else prev.hash
    detail_json = canonical_detail(detail)
    digest = record_hash(prev_hash, seq, at_ms, kind, actor, subject, detail_json)
    # Stored as parsed back from its canonical form, so the record equals its export.
    return AuditRecord(seq, at_ms, kind, actor, subject, json.loads(detail_json), prev_hash, digest)


# -- checkpoints -------------------------------------------------------------------------------


def checkpoint_message(seq: int, hash: bytes, at_ms: int) -> bytes:
    """The bytes a checkpoint signs (module docstring)."""
    _check_hash("hash", hash)
    if _check_int("seq", seq) < 1:
        raise ValueError("seq: must be 1 or more")
    _check_int("at_ms", at_ms)
    return CHECKPOINT_DOMAIN + hash + _canonical([seq, at_ms]).encode("utf-8")


def sign_checkpoint(
    key: ec.EllipticCurvePrivateKey, kid: str, record: AuditRecord, at_ms: int
) -> Checkpoint:
    """Vouch for the chain up to and including ``record`` with a P-256 key."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("checkpoint key: must be P-256")
    if not isinstance(kid, str) or not kid:
        raise ValueError("kid: must be a non-empty string")
    message = checkpoint_message(record.seq, record.hash, at_ms)
    signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    return Checkpoint(record.seq, record.hash, at_ms, kid, signature)


def _signature_ok(key: ec.EllipticCurvePublicKey, cp: Checkpoint) -> bool:
    try:
        message = checkpoint_message(cp.seq, cp.hash, cp.at_ms)
        key.verify(cp.signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# -- verification ------------------------------------------------------------------------------


def _content_hash(r: AuditRecord, seq: int) -> bytes | None:
    """``r``'s hash as if it were numbered ``seq``; None if its fields cannot be encoded."""
    try:
        return record_hash(
            r.prev_hash, seq, r.at_ms, r.kind, r.actor, r.subject, canonical_detail(r.detail)
        )
    except (ValueError, TypeError):
        return None


def _seq_list(seqs: list[int]) -> str:
    shown = [str(s) for s in seqs[:10]]
    if len(seqs) > 10:
        shown.append(f"and {len(seqs) - 10} more")
    if len(shown) == 2:
        return f"{shown[0]} and {shown[1]}"
    return ", ".join(shown)


def _reorder_findings(given: list[AuditRecord], order: list[int]) -> list[Finding]:
    """One finding per cycle of the permutation that sorts the records by seq."""
    findings: list[Finding] = []
    seen = [False] * len(order)
    for start in range(len(order)):
        if seen[start] or order[start] == start:
            continue
        cycle: list[int] = []
        pos = start
        while not seen[pos]:
            seen[pos] = True
            cycle.append(given[pos].seq)
            pos = order[pos]
        cycle.sort()
        what = "swapped" if len(cycle) == 2 else "out of order"
        findings.append(
            Finding(
                cycle[0],
                RECORDS_REORDERED,
                f"records {_seq_list(cycle)} are {what}: they do not appear in sequence order",
            )
        )
    return findings


class _Walk:
    """Follows the chain through the records (sorted by seq) and explains each break once.

    ``orig`` is the seq a record had when it was written, as the chain says:
    after a renumbering (an insertion or deletion followed by ``seq = seq ± 1``
    in the store) records hash correctly only with it. ``accepted`` maps it to
    the stored hash of the record the chain runs through, for the checkpoints.
    """

    def __init__(
        self, recs: list[AuditRecord], first_prev_hash: bytes | None, vouched: set[bytes]
    ) -> None:
        self.recs = recs
        self.vouched = vouched
        self.stored = {r.hash for r in recs}
        self.findings: list[Finding] = []
        self.flagged: set[int] = set()
        self.accepted: dict[int, bytes] = {}
        self.tip: AuditRecord | None = None
        self.tip_hash: bytes | None = first_prev_hash
        self.tip_orig: int | None = 0 if first_prev_hash == GENESIS else None
        self.tip_linked = True
        self.tip_content_ok = True
        self.parent_hash: bytes | None = None
        # shown-minus-original seq offsets that need no finding of their own
        self.shifts: set[int] = {0}

    def add(self, seq: int, code: str, message: str) -> None:
        self.findings.append(Finding(seq, code, message))

    def tip_name(self) -> str:
        return "the start of the log" if self.tip is None else f"record {self.tip.seq}"

    def accept(self, r: AuditRecord, orig: int, *, linked: bool, content_ok: bool) -> None:
        self.parent_hash = self.tip_hash
        self.tip = r
        self.tip_hash = r.hash
        self.tip_orig = orig
        self.tip_linked = linked
        self.tip_content_ok = content_ok
        self.accepted[orig] = r.hash
        self.shifts = {r.seq - orig}

    def place(self, r: AuditRecord, orig: int, *, linked: bool) -> None:
        """Accept ``r`` as record ``orig`` of the chain, reporting it if its content is wrong."""
        ok = _content_hash(r, r.seq) == r.hash or _content_hash(r, orig) == r.hash
        if not ok:
            self.flagged.add(orig)
            self.add(r.seq, RECORD_EDITED, self.edited_message(r))
        self.accept(r, orig, linked=linked, content_ok=ok)

    @staticmethod
    def edited_message(r: AuditRecord) -> str:
        return (
            f"record {r.seq} ({r.kind}) does not match its own hash: its time, kind, actor, "
            "subject, detail or prev_hash was changed after it was written"
        )

    def run(self) -> None:
        recs = self.recs
        i = 0
        while i < len(recs):
            r = recs[i]
            nxt = recs[i + 1] if i + 1 < len(recs) else None
            if self.tip_hash is None or r.prev_hash == self.tip_hash:
                self.linked(r)
                i += 1
            elif nxt is not None and nxt.prev_hash == self.tip_hash:
                i += self.out_of_place(r, nxt)
            elif self.tip is not None and r.prev_hash == self.parent_hash:
                self.sibling(r, nxt)
                i += 1
            elif r.prev_hash not in self.stored:
                self.dangling(r)
                i += 1
            else:
                self.add(
                    r.seq,
                    CHAIN_BROKEN,
                    f"record {r.seq} does not link to {self.tip_name()} before it but to "
                    "another record of the log",
                )
                orig = r.seq if _content_hash(r, r.seq) == r.hash else self.expected(r)
                self.place(r, orig, linked=False)
                i += 1

    def expected(self, r: AuditRecord) -> int:
        return r.seq if self.tip_orig is None else self.tip_orig + 1

    def linked(self, r: AuditRecord) -> None:
        """``r`` links to the tip: only its own content can be wrong."""
        exp = self.expected(r)
        if _content_hash(r, r.seq) == r.hash:
            if r.seq != exp:
                self.flagged.add(r.seq)
                self.add(
                    r.seq,
                    RECORD_EDITED,
                    f"record {r.seq} follows {self.tip_name()} in the chain, so it was written "
                    f"as record {exp}: its seq was changed and its hash recomputed",
                )
            self.accept(r, r.seq, linked=True, content_ok=True)
        elif r.seq != exp and _content_hash(r, exp) == r.hash:
            self.renumbered(r, exp)
            self.accept(r, exp, linked=True, content_ok=True)
        else:
            self.flagged.add(exp)
            self.add(r.seq, RECORD_EDITED, self.edited_message(r))
            self.accept(r, exp, linked=True, content_ok=False)

    def out_of_place(self, r: AuditRecord, nxt: AuditRecord) -> int:
        """The record after ``r`` continues the chain: ``r`` was swapped or inserted."""
        exp = self.expected(r)
        if r.prev_hash == nxt.hash:
            a, b = sorted((r.seq, nxt.seq))
            self.flagged.update((exp, exp + 1))
            self.add(
                a,
                RECORDS_REORDERED,
                f"records {a} and {b} are swapped: the record numbered {nxt.seq} is the one "
                f"that follows {self.tip_name()} in the chain, then the one numbered {r.seq}",
            )
            self.place(nxt, exp, linked=True)
            self.place(r, exp + 1, linked=True)
            return 2
        self.add(
            r.seq,
            RECORD_INSERTED,
            f"record {r.seq} was inserted: it does not link to {self.tip_name()}, "
            f"and record {nxt.seq} after it does",
        )
        self.shifts |= {s + 1 for s in self.shifts}
        return 1

    def sibling(self, r: AuditRecord, nxt: AuditRecord | None) -> None:
        """``r`` and the tip claim the same predecessor: one of them was inserted."""
        tip = self.tip
        assert tip is not None and self.tip_orig is not None
        r_continues = (nxt is not None and nxt.prev_hash == r.hash) or (
            r.hash in self.vouched and tip.hash not in self.vouched
        )
        if r_continues:
            self.add(
                tip.seq,
                RECORD_INSERTED,
                f"record {tip.seq} was inserted: record {r.seq} after it links to the same "
                "predecessor, and the chain continues from that one",
            )
            orig = self.tip_orig
            self.tip_hash = self.parent_hash
            self.tip = None
            self.tip_orig = orig - 1
            self.place(r, orig, linked=True)
        else:
            self.add(
                r.seq,
                RECORD_INSERTED,
                f"record {r.seq} was inserted: it links to the same predecessor as "
                f"record {tip.seq} before it, and the chain continues from that one",
            )
            self.shifts |= {s + 1 for s in self.shifts}

    def dangling(self, r: AuditRecord) -> None:
        """``r``'s prev_hash is no record's hash: a deletion, or the tip's hash was redone."""
        exp = self.expected(r)
        orig: int | None = None
        # The seq r hashes right with: its own; else, after a renumbering, the one the
        # chain expects or (a deletion, then renumbering) a few more than its own.
        for s in (r.seq, exp, *range(r.seq + 1, r.seq + 1 + _RENUMBER_PROBE)):
            if _content_hash(r, s) == r.hash:
                orig = s
                break
        if orig is None:
            self.place(r, exp, linked=False)
            return
        if self.tip_orig is not None and orig > self.tip_orig + 1:
            lo, hi = self.tip_orig + 1, orig - 1
            before = f"between {self.tip_orig} and {orig}" if self.tip_orig else f"before {orig}"
            what = f"record {lo} is" if lo == hi else f"records {lo} to {hi} are"
            renumbered = "" if orig == r.seq else "; the records after them were renumbered"
            self.add(lo, RECORD_DELETED, f"{what} missing ({before}){renumbered}")
            self.accept(r, orig, linked=False, content_ok=True)
            return
        tip = self.tip
        if (
            tip is not None
            and orig == exp
            and self.tip_orig is not None
            and self.tip_linked
            and self.tip_content_ok
            and self.tip_orig not in self.flagged
        ):
            self.flagged.add(self.tip_orig)
            self.add(
                tip.seq,
                RECORD_EDITED,
                f"record {tip.seq} ({tip.kind}) was changed and its hash recomputed: "
                f"record {r.seq} does not link to it",
            )
        else:
            self.add(
                r.seq,
                CHAIN_BROKEN,
                f"record {r.seq} does not link to {self.tip_name()}: its prev_hash is the "
                "hash of no record in the log",
            )
        self.renumbered(r, orig)
        self.accept(r, orig, linked=False, content_ok=True)

    def renumbered(self, r: AuditRecord, orig: int) -> None:
        """Report ``r``'s seq change unless an insertion or deletion explains it."""
        if r.seq != orig and r.seq - orig not in self.shifts:
            self.flagged.add(orig)
            self.add(
                r.seq,
                RECORD_EDITED,
                f"record {r.seq} was written as record {orig}: its seq was changed",
            )


def _checkpoint_findings(
    valid: list[Checkpoint], walk: _Walk, first_prev_hash: bytes | None
) -> list[Finding]:
    findings: list[Finding] = []
    if not valid:
        return findings
    last = max(walk.accepted) if walk.accepted else (0 if first_prev_hash == GENESIS else None)
    newest = max(valid, key=lambda c: c.seq)
    if last is not None and newest.seq > last:
        lo = last + 1
        what = f"record {lo} is" if lo == newest.seq else f"records {lo} to {newest.seq} are"
        after = f"after record {last}" if last else "from the empty log"
        findings.append(
            Finding(
                lo,
                RECORDS_TRUNCATED,
                f"{what} missing {after}: checkpoint {newest.seq} (key {newest.kid}) "
                "vouches for them",
            )
        )
    mismatched = sorted(
        (
            c
            for c in valid
            if c.seq in walk.accepted
            and walk.accepted[c.seq] != c.hash
            and c.seq not in walk.flagged
        ),
        key=lambda c: c.seq,
    )
    if mismatched:
        first = mismatched[0]
        later = len({c.seq for c in mismatched}) - 1
        also = f"; {later} later checkpoint(s) disagree too" if later else ""
        findings.append(
            Finding(
                first.seq,
                CHECKPOINT_MISMATCH,
                f"record {first.seq} is not the record checkpoint {first.seq} (key {first.kid}) "
                f"vouches for: the chain up to it was rewritten{also}",
            )
        )
    return findings


def verify_log(
    records: Iterable[AuditRecord],
    checkpoints: Iterable[Checkpoint],
    keys: Mapping[str, ec.EllipticCurvePublicKey],
    *,
    first_prev_hash: bytes | None = GENESIS,
) -> list[Finding]:
    """Every tampering the records and checkpoints show, one finding each; [] if none.

    ``records`` come in the store's order (by seq). ``first_prev_hash=None``:
    they are a suffix of the log, the first one's prev_hash is taken as given
    and checkpoints before it are ignored. Linear in the number of records
    (plus one sort), no recursion; findings are ordered by seq.
    """
    given = list(records)
    order = sorted(range(len(given)), key=lambda i: given[i].seq)
    findings = _reorder_findings(given, order)
    recs = [given[i] for i in order]

    start = recs[0].seq if recs else None
    valid: list[Checkpoint] = []
    for cp in checkpoints:
        if first_prev_hash is None and (start is None or cp.seq < start):
            continue
        key = keys.get(cp.kid)
        if key is None:
            findings.append(
                Finding(
                    cp.seq,
                    CHECKPOINT_UNKNOWN_KEY,
                    f"checkpoint {cp.seq} is signed by key {cp.kid!r}, which is not known",
                )
            )
        elif not _signature_ok(key, cp):
            findings.append(
                Finding(
                    cp.seq,
                    CHECKPOINT_BAD_SIGNATURE,
                    f"checkpoint {cp.seq}'s signature by key {cp.kid!r} does not verify",
                )
            )
        else:
            valid.append(cp)

    walk = _Walk(recs, first_prev_hash, {c.hash for c in valid})
    walk.run()
    findings.extend(walk.findings)
    findings.extend(_checkpoint_findings(valid, walk, first_prev_hash))
    findings.sort(key=lambda f: f.seq)
    return findings


# -- JSON lines export -------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _iso_time(at_ms: int) -> str:
    """ISO-8601 UTC with milliseconds; "" for a time no calendar date can show."""
    try:
        when = _EPOCH + timedelta(milliseconds=at_ms)
    except OverflowError:
        return ""
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def record_to_json(r: AuditRecord) -> dict[str, Any]:
    return {
        "type": "record",
        "seq": r.seq,
        "at_ms": r.at_ms,
        "time": _iso_time(r.at_ms),
        "kind": r.kind,
        "actor": r.actor,
        "subject": r.subject,
        "detail": r.detail,
        "prev_hash": r.prev_hash.hex(),
        "hash": r.hash.hex(),
    }


def checkpoint_to_json(c: Checkpoint) -> dict[str, Any]:
    return {
        "type": "checkpoint",
        "seq": c.seq,
        "at_ms": c.at_ms,
        "time": _iso_time(c.at_ms),
        "hash": c.hash.hex(),
        "kid": c.kid,
        "signature": _b64url(c.signature),
    }


_RECORD_FIELDS = {"type", "seq", "at_ms", "time", "kind", "actor", "subject", "detail"}
_RECORD_FIELDS |= {"prev_hash", "hash"}
_CHECKPOINT_FIELDS = {"type", "seq", "at_ms", "time", "hash", "kid", "signature"}


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"{k}: duplicate key")
        out[k] = v
    return out


class _Fields:
    """Typed access to one parsed line, each error naming its field."""

    def __init__(self, obj: dict[str, Any], allowed: set[str]) -> None:
        extra = sorted(set(obj) - allowed)
        if extra:
            raise ValueError(f"{extra[0]}: unknown field")
        self.obj = obj

    def get(self, name: str) -> Any:
        if name not in self.obj:
            raise ValueError(f"{name}: missing")
        return self.obj[name]

    def integer(self, name: str, minimum: int | None = None) -> int:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: must be an integer")
        if minimum is not None and value < minimum:
            raise ValueError(f"{name}: must be {minimum} or more")
        return value

    def text(self, name: str, *, empty: bool = True) -> str:
        value = self.get(name)
        if not isinstance(value, str):
            raise ValueError(f"{name}: must be a string")
        if not empty and not value:
            raise ValueError(f"{name}: must not be empty")
        return value

    def hex32(self, name: str) -> bytes:
        value = self.text(name)
        if not _HEX32.fullmatch(value):
            raise ValueError(f"{name}: must be 64 lowercase hex digits")
        return bytes.fromhex(value)

    def b64url(self, name: str) -> bytes:
        value = self.text(name, empty=False)
        if not _B64URL.fullmatch(value) or len(value) % 4 == 1:
            raise ValueError(f"{name}: must be unpadded base64url")
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))

    def detail(self, name: str) -> dict[str, Any]:
        value = self.get(name)
        if not isinstance(value, dict):
            raise ValueError(f"{name}: must be an object")
        try:
            canonical_detail(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        return value


def parse_export_line(line: str | bytes) -> AuditRecord | Checkpoint:
    """One line of ``attestd audit export``; ValueError naming the field if malformed.

    Strict on purpose: an auditor's tool must not read a line two ways. The
    ``time`` field is derived from ``at_ms`` and ignored.
    """
    if isinstance(line, str):
        if len(line) > MAX_LINE_BYTES:
            raise ValueError(f"line: longer than {MAX_LINE_BYTES} bytes")
        try:
            raw = line.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("line: not valid Unicode") from exc
    elif isinstance(line, bytes):
        raw = line
    else:
        raise ValueError("line: must be str or bytes")
    if len(raw) > MAX_LINE_BYTES:
        raise ValueError(f"line: longer than {MAX_LINE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("line: not valid UTF-8") from exc
    try:
        obj = json.loads(text, parse_constant=_no_constants, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line: not JSON ({exc.msg} at column {exc.colno})") from exc
    except RecursionError as exc:
        raise ValueError("line: nested too deeply") from exc
    if not isinstance(obj, dict):
        raise ValueError("line: must be a JSON object")
    kind = obj.get("type")
    if kind == "record":
        f = _Fields(obj, _RECORD_FIELDS)
        return AuditRecord(
            seq=f.integer("seq", 1),
            at_ms=f.integer("at_ms"),
            kind=f.text("kind", empty=False),
            actor=f.text("actor"),
            subject=f.text("subject"),
            detail=f.detail("detail"),
            prev_hash=f.hex32("prev_hash"),
            hash=f.hex32("hash"),
        )
    if kind == "checkpoint":
        f = _Fields(obj, _CHECKPOINT_FIELDS)
        return Checkpoint(
            seq=f.integer("seq", 1),
            at_ms=f.integer("at_ms"),
            hash=f.hex32("hash"),
            kid=f.text("kid", empty=False),
            signature=f.b64url("signature"),
        )
    if "type" not in obj:
        raise ValueError("type: missing")
    raise ValueError(f"type: must be 'record' or 'checkpoint', not {kind!r}")
