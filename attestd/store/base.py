"""The store interface: everything attestd persists goes through it.

Narrow on purpose, and free of SQLite-only assumptions, so a PostgreSQL
implementation can sit behind it for several replicas sharing a database.
The operations that must be atomic across replicas are single methods here
(``record_attestation`` spending its nonce, ``consume_challenge``, ``activate_device``,
``put_policy``), never read-then-write sequences in
the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from attestd.core.audit import AuditRecord, Checkpoint


class StoreError(Exception):
    """Base of store errors. ``code`` is a stable reason code."""

    code = "STORE_ERROR"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class StoreUnavailable(StoreError):
    code = "STORE_UNAVAILABLE"


class StoreBusy(StoreUnavailable):
    """Another process holds the write lock (raised at once by a store set not to wait,
    ``set_waiting(False)``)."""


class NotFound(StoreError):
    code = "NOT_FOUND"


class Conflict(StoreError):
    code = "CONFLICT"


class Rejected(StoreError):
    """A single-use item (nonce, challenge) is unknown, used, expired or not the caller's."""

    code = "REJECTED"


@dataclass(frozen=True)
class Challenge:
    challenge_id: str
    device_id: str
    ek_fingerprint: str
    ek_public: bytes
    ek_certificate: bytes
    ak_public: bytes
    secret_hash: bytes  # SHA-256 of the activation secret; the secret itself is never stored
    expires_at_ms: int
    facts: dict[str, str]  # issuer, serial, manufacturer, model, version


@dataclass(frozen=True)
class Device:
    device_id: str
    ek_fingerprint: str
    ek_public: bytes
    ek_certificate: bytes
    ak_public: bytes
    ak_name: str
    enrolled_at_ms: int
    activated_at_ms: int
    facts: dict[str, str]
    clock: dict[str, int] | None  # last accepted clock state, or None before the first
    last_attestation_id: int | None


@dataclass(frozen=True)
class NonceGrant:
    device_id: str
    expires_at_ms: int
    policy_name: str
    policy_version: int


@dataclass(frozen=True)
class NonceUse:
    """A nonce being spent: its SHA-256 (only hashes are stored) and the time of use."""

    nonce_hash: bytes
    now_ms: int


@dataclass(frozen=True)
class PolicyRecord:
    name: str
    version: int
    document: dict[str, Any]
    digest: str
    created_at_ms: int
    author: str = ""
    change_note: str = ""


@dataclass(frozen=True)
class GroupRecord:
    name: str
    description: str
    policy_name: str
    policy_version: int  # 0: follow the latest version
    rules: list[dict[str, str]]  # each: ek_cert_issuer / tpm_manufacturer / tpm_model to match
    device_ids: tuple[str, ...]  # assigned by id
    created_at_ms: int


@dataclass(frozen=True)
class Evidence:
    """A device's latest attestation evidence, for golden capture and dry-runs."""

    device_id: str
    attestation_id: int
    at_ms: int
    status: str
    values_verified: bool
    pcrs: dict[str, dict[str, str]]  # bank -> index -> hex
    event_log: bytes


@dataclass(frozen=True)
class CredentialRecord:
    jti: str
    device_id: str
    kid: str  # signing key of the JWT
    cert_serial: str  # hex serial of the client certificate, "" if none
    issued_at_ms: int
    expires_at_ms: int
    key_fingerprint: str  # SHA-256 of the bound key's SPKI, "" if none


@dataclass(frozen=True)
class DeviceStatus:
    device_id: str
    revoked: bool
    revoked_at_ms: int
    revocation_reason: str
    # Credentials issued before this instant are no longer valid (revocation, failure).
    credentials_invalid_before_ms: int
    # Expiry of the live credential, 0 when there is none.
    live_expires_at_ms: int


@dataclass(frozen=True)
class VerdictEventRecord:
    cursor: int
    device_id: str
    kind: str  # AFFIRMED, FAILED, REVOKED, READMITTED, EXPIRED
    status: str
    at_ms: int
    reason: str
    credential_expires_at_ms: int


@dataclass(frozen=True)
class AttestationCounts:
    """A device's attestations since enrollment; they survive the pruning of old rows."""

    device_id: str
    total: int
    affirming: int  # appraisals that earned a credential (an AFFIRMED verdict event)
    failed: int  # every other one: no credential, a FAILED event (warning status included)


@dataclass(frozen=True)
class AttestationRecord:
    device_id: str
    at_ms: int
    status: str
    failures: list[dict[str, str]]
    warnings: list[dict[str, str]]
    trust_vector: dict[str, int]
    policy_name: str
    policy_version: int
    clock: dict[str, int]  # resetCount, restartCount, clock, firmwareVersion as quoted
    pcrs: dict[str, dict[str, str]]  # bank -> index -> hex
    credential_expires_at_ms: int = 0
    attestation_id: int | None = None
    # What the boot event log showed, when one was sent and agreed with the quote.
    boot_state: dict[str, Any] | None = None
    # Whether the signature vouched for `pcrs` (else they are whatever the caller sent).
    values_verified: bool = False
    # The event log sent with the quote (kept for the device's latest attestation only).
    event_log: bytes = b""
    # The credential issued for it (affirming verdicts only).
    credential: CredentialRecord | None = None


@dataclass(frozen=True)
class CallerCredentialRecord:
    """An API token or role client certificate (what authenticates a non-device caller)."""

    cred_id: str  # "tok-…" / "crt-…"
    kind: str  # "token" or "certificate"
    role: str  # "policy-author", "gateway", "admin"
    name: str
    secret_hash: bytes  # tokens: SHA-256 of the secret (the secret is never stored)
    cert_serial: str  # certificates: hex serial
    cert_sha256: str  # certificates: hex SHA-256 of the DER certificate
    created_at_ms: int
    expires_at_ms: int  # 0: none
    revoked_at_ms: int  # 0: live
    created_by: str
    revocation_reason: str = ""


@dataclass(frozen=True)
class Preregistration:
    """A device allowed to enroll (admission "preregistered"), from a shipping manifest."""

    ek_cert_serial: str  # normalised hex, "" if not given
    ek_cert_issuer: str  # RFC 4514, "" if not given
    ek_public_sha256: str  # hex, "" if not given
    name: str
    group: str
    added_at_ms: int = 0


@dataclass(frozen=True)
class AuditEvent:
    """What happened, before the store gives it a place (seq) in the hash chain."""

    at_ms: int
    kind: str
    actor: str
    subject: str
    detail: dict[str, Any]
    # The detail's canonical JSON (core.audit.canonical_detail), when the caller already
    # made it; the store makes it otherwise.
    detail_json: str = ""


class Store(Protocol):
    # Several reads that see one state of the store (``with store.snapshot(): ...``).
    def snapshot(self) -> AbstractContextManager[None]: ...

    # Enrollment.
    def put_challenge(self, challenge: Challenge) -> None: ...
    def consume_challenge(self, challenge_id: str, device_id: str, now_ms: int) -> Challenge: ...
    def activate_device(self, challenge: Challenge, ak_name: str, now_ms: int) -> Device: ...
    def get_device(self, device_id: str) -> Device: ...

    # Nonces.
    # ``max_outstanding`` > 0: the device keeps at most that many unused, unexpired nonces
    # at ``now_ms``; the oldest beyond it are retired (consuming one: NONCE_RETIRED).
    def put_nonce(
        self, nonce_hash: bytes, grant: NonceGrant, now_ms: int = 0, max_outstanding: int = 0
    ) -> None: ...
    # A nonce the device may still use (read only; Rejected with the reason otherwise).
    def check_nonce(self, nonce_hash: bytes, device_id: str, now_ms: int) -> NonceGrant: ...

    # Attestations.
    # With ``audit``: its audit record is appended in the same transaction. With
    # ``nonce``: the nonce is spent in it, exactly once (Rejected, nothing recorded, if it
    # is no longer usable: another caller spent it first, or it expired).
    def record_attestation(
        self,
        record: AttestationRecord,
        accepted_clock: dict[str, int] | None,
        audit: AuditEvent | None = None,
        nonce: NonceUse | None = None,
    ) -> int: ...
    def latest_attestation(self, device_id: str) -> AttestationRecord | None: ...
    # Only the newest rows of each device are kept (how many is the store's setting);
    # these counters count every attestation ever recorded.
    def attestation_counts(self, device_id: str) -> AttestationCounts: ...

    # Policies (versions are immutable; delete hides every version of a name).
    def put_policy(
        self,
        name: str,
        document: dict[str, Any],
        digest: str,
        now_ms: int,
        author: str = "",
        change_note: str = "",
    ) -> PolicyRecord: ...
    def get_policy(self, name: str, version: int | None = None) -> PolicyRecord: ...
    def list_policies(self) -> list[PolicyRecord]: ...
    def policy_history(self, name: str) -> list[PolicyRecord]: ...
    def delete_policy(self, name: str, now_ms: int) -> None: ...

    # Device groups.
    def put_group(self, group: GroupRecord, *, create: bool) -> GroupRecord: ...
    def get_group(self, name: str) -> GroupRecord: ...
    def list_groups(self) -> list[GroupRecord]: ...
    # A group's (policy name, pinned version or 0), without reading its members.
    def get_group_policy(self, name: str) -> tuple[str, int]: ...
    # (name, rules) of every group, without members: what deciding a device's group needs.
    def group_rules(self) -> list[tuple[str, list[dict[str, str]]]]: ...
    def delete_group(self, name: str) -> None: ...
    def assign_devices(self, group: str, device_ids: list[str]) -> GroupRecord: ...
    def unassign_devices(self, device_ids: list[str]) -> None: ...
    def assigned_group(self, device_id: str) -> str | None: ...

    # Credentials, revocation, verdict events.
    def device_status(self, device_id: str) -> DeviceStatus: ...
    def set_revoked(
        self, device_id: str, revoked: bool, reason: str, now_ms: int
    ) -> DeviceStatus: ...
    def get_credential(self, *, jti: str = "", serial: str = "") -> CredentialRecord | None: ...
    # Events after ``cursor``, oldest first. Old events are pruned (``prune``): a cursor
    # older than the oldest kept event resumes at the oldest kept event, so a watcher
    # that was away longer than the retention silently misses the pruned ones; one that
    # must not can compare its cursor with ``oldest_event_cursor()`` and resynchronise.
    def events_after(
        self, cursor: int, device_ids: list[str], limit: int
    ) -> list[VerdictEventRecord]: ...
    def last_event_cursor(self) -> int: ...
    def oldest_event_cursor(self) -> int: ...  # 0 when there are none
    # Idempotent across replicas: each expiry is announced once, whoever runs it.
    def announce_expiries(self, now_ms: int) -> int: ...

    # Retention: keeps the newest ``event_retention`` verdict events and deletes nonces,
    # challenges and credential records long expired. Deletes in bounded batches (the
    # write lock is held briefly); returns how many rows went, so a caller can repeat
    # while it is a full batch.
    def prune(self, now_ms: int, event_retention: int) -> int: ...

    # Latest evidence per device.
    def latest_evidence(self, device_id: str) -> Evidence | None: ...
    def all_evidence(self) -> list[tuple[Device, Evidence | None]]: ...

    # Callers' credentials (API tokens and role client certificates).
    def put_caller_credential(self, record: CallerCredentialRecord) -> None: ...
    def get_caller_credential(self, cred_id: str) -> CallerCredentialRecord | None: ...
    def find_certificate_credential(self, serial: str) -> CallerCredentialRecord | None: ...
    def list_caller_credentials(self) -> list[CallerCredentialRecord]: ...
    def revoke_caller_credential(
        self, cred_id: str, reason: str, now_ms: int
    ) -> CallerCredentialRecord: ...

    # Admission control: (added, updated, unchanged); all rows or none.
    def preregister(self, entries: list[Preregistration], now_ms: int) -> tuple[int, int, int]: ...
    def find_preregistration(
        self, ek_cert_serial: str, ek_cert_issuer: str, ek_public_sha256: str
    ) -> Preregistration | None: ...

    # The audit log: an append-only hash chain with signed checkpoints.
    def append_audit(self, event: AuditEvent) -> AuditRecord: ...
    def audit_records(self, after_seq: int, since_ms: int, limit: int) -> list[AuditRecord]: ...
    def last_audit_record(self) -> AuditRecord | None: ...
    def add_audit_checkpoint(self, checkpoint: Checkpoint) -> None: ...
    def audit_checkpoints(self, after_seq: int) -> list[Checkpoint]: ...
    def last_audit_checkpoint(self) -> Checkpoint | None: ...

    def close(self) -> None: ...
