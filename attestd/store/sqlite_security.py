"""The SQLite store's tables for attestd's own security: caller credentials,
pre-registered devices and the audit log (a mixin of ``SqliteStore``).

The audit log is a hash chain (attestd.core.audit): appending reads the newest
record and inserts the next one inside one write transaction, so several
processes sharing the file still build one unbroken chain. Nothing here ever
updates or deletes an audit row.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import sqlite_utils

from attestd.core.audit import AuditRecord, Checkpoint, canonical_detail, record_hash
from attestd.store.base import (
    AuditEvent,
    CallerCredentialRecord,
    Conflict,
    NotFound,
    Preregistration,
)

T = TypeVar("T")

SECURITY_SCHEMA: dict[str, tuple[dict[str, Any], str | tuple[str, ...]]] = {
    "caller_credentials": (
        {
            "cred_id": str,
            "kind": str,
            "role": str,
            "name": str,
            "secret_hash": bytes,
            "cert_serial": str,
            "cert_sha256": str,
            "created_at_ms": int,
            "expires_at_ms": int,
            "revoked_at_ms": int,
            "created_by": str,
            "revocation_reason": str,
        },
        "cred_id",
    ),
    "preregistrations": (
        {
            "id": int,
            "ek_cert_serial": str,
            "ek_cert_issuer": str,
            "ek_public_sha256": str,
            "name": str,
            "group_name": str,
            "added_at_ms": int,
        },
        "id",
    ),
    "audit_log": (
        {
            "seq": int,
            "at_ms": int,
            "kind": str,
            "actor": str,
            "subject": str,
            "detail": str,
            "prev_hash": bytes,
            "hash": bytes,
        },
        "seq",
    ),
    "audit_checkpoints": (
        {"seq": int, "at_ms": int, "hash": bytes, "kid": str, "signature": bytes},
        "seq",
    ),
}


# Fixed column lists, spliced into fixed statements (never input).
_CRED_COLUMNS = (
    "cred_id, kind, role, name, secret_hash, cert_serial, cert_sha256, created_at_ms,"
    " expires_at_ms, revoked_at_ms, created_by, revocation_reason"
)
_AUDIT_COLUMNS = "seq, at_ms, kind, actor, subject, detail, prev_hash, hash"


def create_security_indexes(db: sqlite_utils.Database) -> None:
    db["caller_credentials"].create_index(["cert_serial"], if_not_exists=True)  # type: ignore[union-attr]
    db["preregistrations"].create_index(  # type: ignore[union-attr]
        ["ek_cert_serial", "ek_cert_issuer"], if_not_exists=True
    )
    db["preregistrations"].create_index(["ek_public_sha256"], if_not_exists=True)  # type: ignore[union-attr]
    db["audit_log"].create_index(["at_ms"], if_not_exists=True)  # type: ignore[union-attr]


def _cred(row: Any) -> CallerCredentialRecord:
    return CallerCredentialRecord(*row)


def _audit(row: Any) -> AuditRecord:
    return AuditRecord(
        seq=row[0],
        at_ms=row[1],
        kind=row[2],
        actor=row[3],
        subject=row[4],
        detail=json.loads(row[5]),
        prev_hash=row[6],
        hash=row[7],
    )


def _checkpoint(row: Any) -> Checkpoint:
    return Checkpoint(seq=row[0], hash=row[2], at_ms=row[1], kid=row[3], signature=row[4])


class SecurityTables:
    """Mixin: needs ``db``, ``_tx`` and ``_run`` from SqliteStore."""

    db: sqlite_utils.Database

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _run(self, fn: Callable[[], T]) -> T:
        raise NotImplementedError

    # -- caller credentials ------------------------------------------------

    def put_caller_credential(self, record: CallerCredentialRecord) -> None:
        def go() -> None:
            with self._tx() as c:
                if record.kind == "certificate":
                    dup = c.execute(
                        "SELECT cred_id FROM caller_credentials WHERE cert_serial = ?",
                        (record.cert_serial,),
                    ).fetchone()
                    if dup is not None:
                        raise Conflict("a certificate with this serial exists", "DUPLICATE")
                c.execute(
                    f"INSERT INTO caller_credentials ({_CRED_COLUMNS})"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        record.cred_id,
                        record.kind,
                        record.role,
                        record.name,
                        record.secret_hash,
                        record.cert_serial,
                        record.cert_sha256,
                        record.created_at_ms,
                        record.expires_at_ms,
                        record.revoked_at_ms,
                        record.created_by,
                        record.revocation_reason,
                    ),
                )

        self._run(go)

    def get_caller_credential(self, cred_id: str) -> CallerCredentialRecord | None:
        def go() -> CallerCredentialRecord | None:
            row = self.db.execute(
                f"SELECT {_CRED_COLUMNS} FROM caller_credentials WHERE cred_id = ?",
                (cred_id,),
            ).fetchone()
            return None if row is None else _cred(row)

        return self._run(go)

    def find_certificate_credential(self, serial: str) -> CallerCredentialRecord | None:
        def go() -> CallerCredentialRecord | None:
            row = self.db.execute(
                f"SELECT {_CRED_COLUMNS} FROM caller_credentials"
                " WHERE kind = 'certificate' AND cert_serial = ?",
                (serial,),
            ).fetchone()
            return None if row is None else _cred(row)

        return self._run(go)

    def list_caller_credentials(self) -> list[CallerCredentialRecord]:
        def go() -> list[CallerCredentialRecord]:
            rows = self.db.execute(
                f"SELECT {_CRED_COLUMNS} FROM caller_credentials ORDER BY created_at_ms, cred_id"
            ).fetchall()
            return [_cred(r) for r in rows]

        return self._run(go)

    def revoke_caller_credential(
        self, cred_id: str, reason: str, now_ms: int
    ) -> CallerCredentialRecord:
        def go() -> CallerCredentialRecord:
            with self._tx() as c:
                row = c.execute(
                    "UPDATE caller_credentials SET revoked_at_ms = ?, revocation_reason = ?"
                    " WHERE cred_id = ? AND revoked_at_ms = 0"
                    f" RETURNING {_CRED_COLUMNS}",
                    (now_ms, reason, cred_id),
                ).fetchone()
                if row is not None:
                    return _cred(row)
                prior = c.execute(
                    f"SELECT {_CRED_COLUMNS} FROM caller_credentials WHERE cred_id = ?",
                    (cred_id,),
                ).fetchone()
            if prior is None:
                raise NotFound(f"unknown credential {cred_id!r}", "CREDENTIAL_UNKNOWN")
            return _cred(prior)  # already revoked: unchanged

        return self._run(go)

    # -- admission ---------------------------------------------------------

    @staticmethod
    def _find_prereg(
        c: sqlite3.Connection | sqlite_utils.Database, serial: str, issuer: str, ek_hash: str
    ) -> Any:
        """Rows whose every given identifier matches (serial+issuer and/or key hash)."""
        return c.execute(
            "SELECT id, ek_cert_serial, ek_cert_issuer, ek_public_sha256, name, group_name,"
            " added_at_ms FROM preregistrations"
            " WHERE ((ek_cert_serial = ? AND ek_cert_issuer = ?) OR ek_public_sha256 = ?)"
            " ORDER BY id DESC",
            (serial, issuer, ek_hash),
        ).fetchall()

    def preregister(self, entries: list[Preregistration], now_ms: int) -> tuple[int, int, int]:
        def go() -> tuple[int, int, int]:
            added = updated = unchanged = 0
            with self._tx() as c:
                for e in entries:
                    if (
                        e.group
                        and not c.execute(
                            "SELECT 1 FROM groups WHERE name = ?", (e.group,)
                        ).fetchone()
                    ):
                        raise NotFound(f"group {e.group!r} does not exist", "GROUP_UNKNOWN")
                    row = c.execute(
                        "SELECT id, name, group_name FROM preregistrations WHERE"
                        " ek_cert_serial = ? AND ek_cert_issuer = ? AND ek_public_sha256 = ?",
                        (e.ek_cert_serial, e.ek_cert_issuer, e.ek_public_sha256),
                    ).fetchone()
                    if row is None:
                        c.execute(
                            "INSERT INTO preregistrations (ek_cert_serial, ek_cert_issuer,"
                            " ek_public_sha256, name, group_name, added_at_ms)"
                            " VALUES (?,?,?,?,?,?)",
                            (
                                e.ek_cert_serial,
                                e.ek_cert_issuer,
                                e.ek_public_sha256,
                                e.name,
                                e.group,
                                now_ms,
                            ),
                        )
                        added += 1
                    elif (row[1], row[2]) != (e.name, e.group):
                        c.execute(
                            "UPDATE preregistrations SET name = ?, group_name = ? WHERE id = ?",
                            (e.name, e.group, row[0]),
                        )
                        updated += 1
                    else:
                        unchanged += 1
            return added, updated, unchanged

        return self._run(go)

    def find_preregistration(
        self, ek_cert_serial: str, ek_cert_issuer: str, ek_public_sha256: str
    ) -> Preregistration | None:
        def go() -> Preregistration | None:
            for row in self._find_prereg(self.db, ek_cert_serial, ek_cert_issuer, ek_public_sha256):
                # Every identifier the entry gives must match; the newest entry wins
                # (a later manifest listing the device again sets its name and group).
                if row[1] and (row[1], row[2]) != (ek_cert_serial, ek_cert_issuer):
                    continue
                if row[3] and row[3] != ek_public_sha256:
                    continue
                return Preregistration(row[1], row[2], row[3], row[4], row[5], row[6])
            return None

        return self._run(go)

    # -- audit log ---------------------------------------------------------

    def append_audit(self, event: AuditEvent) -> AuditRecord:
        detail_json = event.detail_json or canonical_detail(event.detail)

        def go() -> AuditRecord:
            with self._tx() as c:
                seq, prev, digest = self._append_audit_row(c, event, detail_json)
            return AuditRecord(
                seq=seq,
                at_ms=event.at_ms,
                kind=event.kind,
                actor=event.actor,
                subject=event.subject,
                detail=json.loads(detail_json),
                prev_hash=prev,
                hash=digest,
            )

        return self._run(go)

    @staticmethod
    def _append_audit_row(
        c: sqlite3.Connection, event: AuditEvent, detail_json: str
    ) -> tuple[int, bytes, bytes]:
        """Chain one record after the newest (inside the caller's write transaction);
        (seq, previous hash, hash)."""
        last = c.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (last[0] + 1, last[1]) if last else (1, bytes(32))
        digest = record_hash(
            prev, seq, event.at_ms, event.kind, event.actor, event.subject, detail_json
        )
        c.execute(
            f"INSERT INTO audit_log ({_AUDIT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
            (seq, event.at_ms, event.kind, event.actor, event.subject, detail_json, prev, digest),
        )
        return seq, prev, digest

    def audit_records(self, after_seq: int, since_ms: int, limit: int) -> list[AuditRecord]:
        def go() -> list[AuditRecord]:
            rows = self.db.execute(
                f"SELECT {_AUDIT_COLUMNS} FROM audit_log WHERE seq > ? AND at_ms >= ?"
                " ORDER BY seq LIMIT ?",
                (after_seq, since_ms, limit),
            ).fetchall()
            return [_audit(r) for r in rows]

        return self._run(go)

    def last_audit_record(self) -> AuditRecord | None:
        def go() -> AuditRecord | None:
            row = self.db.execute(
                f"SELECT {_AUDIT_COLUMNS} FROM audit_log ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            return None if row is None else _audit(row)

        return self._run(go)

    def add_audit_checkpoint(self, checkpoint: Checkpoint) -> None:
        def go() -> None:
            self.db.execute(
                "INSERT OR IGNORE INTO audit_checkpoints (seq, at_ms, hash, kid, signature)"
                " VALUES (?,?,?,?,?)",
                (
                    checkpoint.seq,
                    checkpoint.at_ms,
                    checkpoint.hash,
                    checkpoint.kid,
                    checkpoint.signature,
                ),
            )

        self._run(go)

    def audit_checkpoints(self, after_seq: int) -> list[Checkpoint]:
        def go() -> list[Checkpoint]:
            rows = self.db.execute(
                "SELECT seq, at_ms, hash, kid, signature FROM audit_checkpoints"
                " WHERE seq > ? ORDER BY seq",
                (after_seq,),
            ).fetchall()
            return [_checkpoint(r) for r in rows]

        return self._run(go)

    def last_audit_checkpoint(self) -> Checkpoint | None:
        def go() -> Checkpoint | None:
            row = self.db.execute(
                "SELECT seq, at_ms, hash, kid, signature FROM audit_checkpoints"
                " ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            return None if row is None else _checkpoint(row)

        return self._run(go)
