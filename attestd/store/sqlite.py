"""The embedded default store: one SQLite file in WAL mode, through sqlite-utils.

Single-use items are consumed with one ``UPDATE … RETURNING`` statement, so
two concurrent requests (or processes) can never both use the same nonce or
challenge. Multi-row changes run in one transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from attestd.store.base import (
    AttestationRecord,
    Challenge,
    Conflict,
    Device,
    NonceGrant,
    NotFound,
    PolicyRecord,
    Rejected,
    StoreUnavailable,
)

T = TypeVar("T")

_SCHEMA: dict[str, tuple[dict[str, Any], str | tuple[str, ...]]] = {
    "challenges": (
        {
            "challenge_id": str,
            "device_id": str,
            "ek_fingerprint": str,
            "ek_public": bytes,
            "ek_certificate": bytes,
            "ak_public": bytes,
            "secret_hash": bytes,
            "expires_at_ms": int,
            "used_at_ms": int,
            "facts": str,
        },
        "challenge_id",
    ),
    "devices": (
        {
            "device_id": str,
            "ek_fingerprint": str,
            "ek_public": bytes,
            "ek_certificate": bytes,
            "ak_public": bytes,
            "ak_name": str,
            "enrolled_at_ms": int,
            "activated_at_ms": int,
            "facts": str,
            "clock": str,
            "last_attestation_id": int,
        },
        "device_id",
    ),
    "nonces": (
        {
            "nonce_hash": bytes,
            "device_id": str,
            "expires_at_ms": int,
            "used_at_ms": int,
            "policy_name": str,
            "policy_version": int,
        },
        "nonce_hash",
    ),
    "attestations": (
        {
            "id": int,
            "device_id": str,
            "at_ms": int,
            "status": str,
            "failures": str,
            "warnings": str,
            "trust_vector": str,
            "policy_name": str,
            "policy_version": int,
            "clock": str,
            "pcrs": str,
            "credential_expires_at_ms": int,
            "boot_state": str,
        },
        "id",
    ),
    "policies": (
        {"name": str, "version": int, "document": str, "digest": str, "created_at_ms": int},
        ("name", "version"),
    ),
}


class SqliteStore:
    """Store implementation on a SQLite file (``:memory:`` is not supported: WAL needs a file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            # Created private before SQLite opens it; its -wal/-shm files inherit the mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            conn = sqlite3.connect(
                str(self.path), timeout=10.0, isolation_level=None, check_same_thread=False
            )
            self.db = sqlite_utils.Database(conn)
            self.db.enable_wal()
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            for table, (columns, pk) in _SCHEMA.items():
                self.db[table].create(columns, pk=pk, if_not_exists=True)  # type: ignore[union-attr]
            self.db["devices"].create_index(["ek_fingerprint"], unique=True, if_not_exists=True)  # type: ignore[union-attr]
            self.db["attestations"].create_index(["device_id", "id"], if_not_exists=True)  # type: ignore[union-attr]
        except (OSError, sqlite3.Error) as e:
            raise StoreUnavailable(f"cannot open the store at {self.path}: {e}") from None

    # -- plumbing --------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locking) transaction: read-decide-write stays atomic."""
        conn = self.db.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StoreUnavailable(f"store busy or unavailable: {e}") from None
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def _run(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except sqlite3.Error as e:
            raise StoreUnavailable(f"store error: {e}") from None

    def close(self) -> None:
        self.db.conn.close()

    # -- enrollment ------------------------------------------------------

    def put_challenge(self, challenge: Challenge) -> None:
        def go() -> None:
            with self._tx() as c:
                c.execute(
                    "INSERT INTO challenges (challenge_id, device_id, ek_fingerprint, ek_public,"
                    " ek_certificate, ak_public, secret_hash, expires_at_ms, used_at_ms, facts)"
                    " VALUES (?,?,?,?,?,?,?,?,NULL,?)",
                    (
                        challenge.challenge_id,
                        challenge.device_id,
                        challenge.ek_fingerprint,
                        challenge.ek_public,
                        challenge.ek_certificate,
                        challenge.ak_public,
                        challenge.secret_hash,
                        challenge.expires_at_ms,
                        json.dumps(challenge.facts),
                    ),
                )

        self._run(go)

    def consume_challenge(self, challenge_id: str, device_id: str, now_ms: int) -> Challenge:
        def go() -> Challenge:
            with self._tx() as c:
                row = c.execute(
                    "UPDATE challenges SET used_at_ms = ? WHERE challenge_id = ? AND device_id = ?"
                    " AND used_at_ms IS NULL AND expires_at_ms > ?"
                    " RETURNING challenge_id, device_id, ek_fingerprint, ek_public, ek_certificate,"
                    " ak_public, secret_hash, expires_at_ms, facts",
                    (now_ms, challenge_id, device_id, now_ms),
                ).fetchone()
                if row is not None:
                    return Challenge(
                        challenge_id=row[0],
                        device_id=row[1],
                        ek_fingerprint=row[2],
                        ek_public=row[3],
                        ek_certificate=row[4],
                        ak_public=row[5],
                        secret_hash=row[6],
                        expires_at_ms=row[7],
                        facts=json.loads(row[8]),
                    )
                prior = c.execute(
                    "SELECT device_id, used_at_ms, expires_at_ms FROM challenges"
                    " WHERE challenge_id = ?",
                    (challenge_id,),
                ).fetchone()
            if prior is None or prior[0] != device_id:
                raise Rejected("no such enrollment challenge for this device", "CHALLENGE_UNKNOWN")
            if prior[1] is not None:
                raise Rejected("the enrollment challenge was already used", "CHALLENGE_USED")
            raise Rejected("the enrollment challenge has expired", "CHALLENGE_EXPIRED")

        return self._run(go)

    def activate_device(self, challenge: Challenge, ak_name: str, now_ms: int) -> Device:
        def go() -> Device:
            with self._tx() as c:
                existing = c.execute(
                    "SELECT ek_fingerprint, enrolled_at_ms FROM devices WHERE device_id = ?",
                    (challenge.device_id,),
                ).fetchone()
                if existing is not None and existing[0] != challenge.ek_fingerprint:
                    # Ids derive from the EK; a different EK can never take one over.
                    raise Conflict("the device id belongs to another EK", "DEVICE_EK_MISMATCH")
                if existing is None:
                    c.execute(
                        "INSERT INTO devices (device_id, ek_fingerprint, ek_public, ek_certificate,"
                        " ak_public, ak_name, enrolled_at_ms, activated_at_ms, facts, clock,"
                        " last_attestation_id) VALUES (?,?,?,?,?,?,?,?,?,NULL,NULL)",
                        (
                            challenge.device_id,
                            challenge.ek_fingerprint,
                            challenge.ek_public,
                            challenge.ek_certificate,
                            challenge.ak_public,
                            ak_name,
                            now_ms,
                            now_ms,
                            json.dumps(challenge.facts),
                        ),
                    )
                else:
                    c.execute(
                        "UPDATE devices SET ak_public = ?, ak_name = ?, activated_at_ms = ?,"
                        " ek_certificate = ?, facts = ? WHERE device_id = ?",
                        (
                            challenge.ak_public,
                            ak_name,
                            now_ms,
                            challenge.ek_certificate,
                            json.dumps(challenge.facts),
                            challenge.device_id,
                        ),
                    )
            return self.get_device(challenge.device_id)

        return self._run(go)

    def get_device(self, device_id: str) -> Device:
        def go() -> Device:
            row = self.db.execute(
                "SELECT device_id, ek_fingerprint, ek_public, ek_certificate, ak_public, ak_name,"
                " enrolled_at_ms, activated_at_ms, facts, clock, last_attestation_id"
                " FROM devices WHERE device_id = ?",
                (device_id,),
            ).fetchone()
            if row is None:
                raise NotFound(f"unknown device {device_id!r}", "DEVICE_UNKNOWN")
            return Device(
                device_id=row[0],
                ek_fingerprint=row[1],
                ek_public=row[2],
                ek_certificate=row[3],
                ak_public=row[4],
                ak_name=row[5],
                enrolled_at_ms=row[6],
                activated_at_ms=row[7],
                facts=json.loads(row[8]),
                clock=json.loads(row[9]) if row[9] else None,
                last_attestation_id=row[10],
            )

        return self._run(go)

    # -- nonces ----------------------------------------------------------

    def put_nonce(self, nonce_hash: bytes, grant: NonceGrant) -> None:
        def go() -> None:
            self.db.execute(
                "INSERT INTO nonces (nonce_hash, device_id, expires_at_ms, used_at_ms,"
                " policy_name, policy_version) VALUES (?,?,?,NULL,?,?)",
                (
                    nonce_hash,
                    grant.device_id,
                    grant.expires_at_ms,
                    grant.policy_name,
                    grant.policy_version,
                ),
            )

        self._run(go)

    def consume_nonce(self, nonce_hash: bytes, device_id: str, now_ms: int) -> NonceGrant:
        def go() -> NonceGrant:
            row = self.db.execute(
                "UPDATE nonces SET used_at_ms = ? WHERE nonce_hash = ? AND device_id = ?"
                " AND used_at_ms IS NULL AND expires_at_ms > ?"
                " RETURNING device_id, expires_at_ms, policy_name, policy_version",
                (now_ms, nonce_hash, device_id, now_ms),
            ).fetchone()
            if row is not None:
                return NonceGrant(*row)
            prior = self.db.execute(
                "SELECT device_id, used_at_ms FROM nonces WHERE nonce_hash = ?", (nonce_hash,)
            ).fetchone()
            if prior is None:
                raise Rejected("this nonce was not issued by this server", "NONCE_UNKNOWN")
            if prior[0] != device_id:
                raise Rejected("this nonce was issued to another device", "NONCE_WRONG_DEVICE")
            if prior[1] is not None:
                raise Rejected("this nonce was already used", "NONCE_REUSED")
            raise Rejected("this nonce has expired; ask for a new one", "NONCE_EXPIRED")

        return self._run(go)

    # -- attestations ----------------------------------------------------

    def record_attestation(
        self, record: AttestationRecord, accepted_clock: dict[str, int] | None
    ) -> int:
        def go() -> int:
            with self._tx() as c:
                cur = c.execute(
                    "INSERT INTO attestations (device_id, at_ms, status, failures, warnings,"
                    " trust_vector, policy_name, policy_version, clock, pcrs,"
                    " credential_expires_at_ms, boot_state) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        record.device_id,
                        record.at_ms,
                        record.status,
                        json.dumps(record.failures),
                        json.dumps(record.warnings),
                        json.dumps(record.trust_vector),
                        record.policy_name,
                        record.policy_version,
                        json.dumps(record.clock),
                        json.dumps(record.pcrs),
                        record.credential_expires_at_ms,
                        None if record.boot_state is None else json.dumps(record.boot_state),
                    ),
                )
                att_id = int(cur.lastrowid or 0)
                if accepted_clock is not None:
                    c.execute(
                        "UPDATE devices SET last_attestation_id = ?, clock = ? WHERE device_id = ?",
                        (att_id, json.dumps(accepted_clock), record.device_id),
                    )
                else:
                    c.execute(
                        "UPDATE devices SET last_attestation_id = ? WHERE device_id = ?",
                        (att_id, record.device_id),
                    )
                return att_id

        return self._run(go)

    def latest_attestation(self, device_id: str) -> AttestationRecord | None:
        def go() -> AttestationRecord | None:
            row = self.db.execute(
                "SELECT id, device_id, at_ms, status, failures, warnings, trust_vector,"
                " policy_name, policy_version, clock, pcrs, credential_expires_at_ms, boot_state"
                " FROM attestations WHERE device_id = ? ORDER BY id DESC LIMIT 1",
                (device_id,),
            ).fetchone()
            if row is None:
                return None
            return AttestationRecord(
                device_id=row[1],
                at_ms=row[2],
                status=row[3],
                failures=json.loads(row[4]),
                warnings=json.loads(row[5]),
                trust_vector=json.loads(row[6]),
                policy_name=row[7],
                policy_version=row[8],
                clock=json.loads(row[9]),
                pcrs=json.loads(row[10]),
                credential_expires_at_ms=row[11],
                attestation_id=row[0],
                boot_state=json.loads(row[12]) if row[12] else None,
            )

        return self._run(go)

    # -- policies --------------------------------------------------------

    def put_policy(
        self, name: str, document: dict[str, Any], digest: str, now_ms: int
    ) -> PolicyRecord:
        def go() -> PolicyRecord:
            with self._tx() as c:
                row = c.execute(
                    "SELECT version, digest, created_at_ms FROM policies WHERE name = ?"
                    " ORDER BY version DESC LIMIT 1",
                    (name,),
                ).fetchone()
                if row is not None and row[1] == digest:
                    # Publishing the same content again is a no-op, not a new version.
                    return PolicyRecord(name, row[0], document, digest, row[2])
                version = 1 if row is None else row[0] + 1
                c.execute(
                    "INSERT INTO policies (name, version, document, digest, created_at_ms)"
                    " VALUES (?,?,?,?,?)",
                    (name, version, json.dumps(document, sort_keys=True), digest, now_ms),
                )
                return PolicyRecord(name, version, document, digest, now_ms)

        return self._run(go)

    def get_policy(self, name: str, version: int | None = None) -> PolicyRecord:
        def go() -> PolicyRecord:
            if version is None:
                row = self.db.execute(
                    "SELECT name, version, document, digest, created_at_ms FROM policies"
                    " WHERE name = ? ORDER BY version DESC LIMIT 1",
                    (name,),
                ).fetchone()
            else:
                row = self.db.execute(
                    "SELECT name, version, document, digest, created_at_ms FROM policies"
                    " WHERE name = ? AND version = ?",
                    (name, version),
                ).fetchone()
            if row is None:
                what = name if version is None else f"{name}@{version}"
                raise NotFound(f"no policy {what!r}", "POLICY_UNKNOWN")
            return PolicyRecord(row[0], row[1], json.loads(row[2]), row[3], row[4])

        return self._run(go)

    def list_policies(self) -> list[PolicyRecord]:
        def go() -> list[PolicyRecord]:
            rows = self.db.execute(
                "SELECT p.name, p.version, p.document, p.digest, p.created_at_ms FROM policies p"
                " JOIN (SELECT name, MAX(version) AS v FROM policies GROUP BY name) m"
                " ON p.name = m.name AND p.version = m.v ORDER BY p.name"
            ).fetchall()
            return [PolicyRecord(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows]

        return self._run(go)
