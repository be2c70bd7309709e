"""What goes into an audit record for an RPC, and the periodic signed checkpoints.

``describe`` turns a request and its response (or its refusal) into the record's
subject and detail. Secrets never enter it: tokens, credentials, activation
secrets, nonces and encrypted blobs are left out; other bytes and long text are
recorded as their SHA-256 and length, so the record proves *which* document or
quote it was without copying it.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from google.protobuf.message import Message

from attestd.core.audit import MAX_DETAIL_BYTES, canonical_detail, sign_checkpoint
from attestd.store.base import AuditEvent, Store

log = logging.getLogger("attestd.audit")

# Never recorded, whatever message they appear in.
SECRET_FIELDS = frozenset(
    {
        "token",
        "credential",
        "secret",
        "nonce",
        "encrypted_secret",
        "credential_blob",
        "private_key",
    }
)
MAX_TEXT = 200
# Repeated findings recorded by their reason codes.
CODE_LISTS = frozenset({"failures", "warnings"})
MAX_ITEMS = 32
# Fields that name what a call is about, in order of preference.
SUBJECT_FIELDS = ("device_id", "name", "group", "id")


def digest_of(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _value(v: Any) -> Any:
    if isinstance(v, Message):
        return scrub(v)
    if isinstance(v, bytes):
        return digest_of(v)
    if isinstance(v, str) and len(v) > MAX_TEXT:
        return digest_of(v.encode())
    if isinstance(v, float) and v != v:  # NaN has no JSON form
        return None
    return v


def scrub(message: Message) -> dict[str, Any]:
    """The message's set fields, secrets left out, big values replaced by digests."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        # A secret is a value (a JWT, a token, nonce bytes); a message of that name is
        # metadata about one (CreateTokenResponse.credential: its id, role, expiry),
        # scrubbed field by field like any other.
        if field.name in SECRET_FIELDS and field.message_type is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            items = sorted(value.items())[:MAX_ITEMS]
            out[field.name] = {str(k): _value(v) for k, v in items}
        elif field.name in CODE_LISTS:  # verdict findings: their reason codes say it
            out[field.name] = [getattr(v, "code", "") for v in list(value)[:MAX_ITEMS]]
        elif field.is_repeated and field.message_type is not None:
            # Evidence (PCR banks and the like): which, not a copy.
            blob = b"".join(v.SerializeToString(deterministic=True) for v in value)
            out[field.name] = {"count": len(value)} | digest_of(blob)
        elif field.is_repeated:
            out[field.name] = [_value(v) for v in list(value)[:MAX_ITEMS]]
            if len(value) > MAX_ITEMS:
                out[field.name + "_count"] = len(value)
        else:
            out[field.name] = _value(value)
    return out


def subject_of(request: Message, response: Message | None) -> str:
    for source in (request, response):
        if source is None:
            continue
        for name in SUBJECT_FIELDS:
            if name in source.DESCRIPTOR.fields_by_name:
                value = getattr(source, name)
                if isinstance(value, str) and value:
                    return value[:MAX_TEXT]
    return ""


def audit_event(
    at_ms: int,
    kind: str,
    actor: str,
    request: Message,
    response: Message | None,
    outcome: str,
) -> AuditEvent:
    """The audit record of a call, its detail already in canonical JSON (made once here).

    ``outcome`` is "ok" or the refusal's reason code. A detail too large for a small
    record (or with a value JSON cannot carry) records the messages' digests instead.
    """
    detail: dict[str, Any] = {"outcome": outcome, "request": scrub(request)}
    if response is not None:
        detail["result"] = scrub(response)
    try:
        text = canonical_detail(detail)
    except ValueError:
        text = ""
    if not text or len(text.encode()) > MAX_DETAIL_BYTES // 2:  # small records: digests instead
        detail = {
            "outcome": outcome,
            "request": digest_of(request.SerializeToString(deterministic=True)),
        }
        if response is not None:
            detail["result"] = digest_of(response.SerializeToString(deterministic=True))
        text = canonical_detail(detail)
    return AuditEvent(at_ms, kind, actor, subject_of(request, response), detail, text)


def checkpoint_if_due(
    store: Store, key: Any, kid: str, now_ms: int, every: int, interval_s: int
) -> bool:
    """Sign the newest record if ``every`` records or ``interval_s`` passed since the last."""
    last = store.last_audit_record()
    if last is None:
        return False
    cp = store.last_audit_checkpoint()
    if cp is not None and cp.seq >= last.seq:
        return False
    behind = last.seq - (cp.seq if cp else 0)
    if cp is not None and behind < every and now_ms - cp.at_ms < interval_s * 1000:
        return False
    store.add_audit_checkpoint(sign_checkpoint(key, kid, last, now_ms))
    return True
