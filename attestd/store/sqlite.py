"""The embedded default store: one SQLite file in WAL mode, through sqlite-utils.

Single-use items are consumed with one ``UPDATE … RETURNING`` statement, so
two concurrent requests (or processes) can never both use the same nonce or
challenge. Multi-row changes run in one transaction.

Several processes (``attestd serve --workers N``) share the file: writes take
the write lock (``BEGIN IMMEDIATE``, or a single autocommit statement) and wait
for it up to the busy timeout, so concurrent writers queue instead of failing.

Retention: each device keeps its newest ``history_per_device`` attestation rows
(pruned in the transaction that adds one) with counters of every attestation
in ``attestation_counts``; ``prune`` keeps the newest verdict events and drops
long-expired nonces, challenges and credential records.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from attestd.core.audit import canonical_detail
from attestd.store.base import (
    AttestationCounts,
    AttestationRecord,
    AuditEvent,
    Challenge,
    Conflict,
    CredentialRecord,
    Device,
    DeviceStatus,
    Evidence,
    GroupRecord,
    NonceGrant,
    NonceUse,
    NotFound,
    PolicyRecord,
    Rejected,
    StoreBusy,
    StoreUnavailable,
    VerdictEventRecord,
)
from attestd.store.sqlite_security import (
    SECURITY_SCHEMA,
    SecurityTables,
    create_security_indexes,
)

T = TypeVar("T")

BUSY_TIMEOUT_S = 10.0
DEFAULT_HISTORY_PER_DEVICE = 100
# Rows deleted per table and ``prune`` call: the write lock is never held for long.
PRUNE_BATCH = 5000
# SQLite's own setting: a commit that finds this many pages in the WAL copies them into
# the database file (and syncs it) before it returns.
INLINE_CHECKPOINT_PAGES = 1000
# The WAL file is cut back to this size when it starts again from its beginning.
WAL_SIZE_LIMIT = 64 * 1024 * 1024
# How long a full checkpoint (checkpoint(restart_above=...)) may hold new writes back.
CHECKPOINT_WAIT_S = 0.2
# A write that waits for another process's write lock tries again after these pauses
# (seconds), then every WRITE_LOCK_POLL_MAX_S. SQLite's own busy handler sleeps 1, 2, 5,
# 10 ... 100 ms between tries: a lock held for a fraction of a millisecond cost a
# waiting writer a millisecond or more.
WRITE_LOCK_POLL_S = (50e-6, 100e-6, 200e-6, 300e-6)
WRITE_LOCK_POLL_MAX_S = 500e-6
# Expired nonces and challenges are kept this long (a late reply reads as expired or
# used, not unknown); long-expired credential records longer (VerifyCredential says
# EXPIRED rather than UNKNOWN_CREDENTIAL for a week).
NONCE_GRACE_MS = 24 * 3600 * 1000
CREDENTIAL_GRACE_MS = 7 * 24 * 3600 * 1000

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
        {
            "name": str,
            "version": int,
            "document": str,
            "digest": str,
            "created_at_ms": int,
            "author": str,
            "change_note": str,
            "deleted_at_ms": int,
        },
        ("name", "version"),
    ),
    "groups": (
        {
            "name": str,
            "description": str,
            "policy_name": str,
            "policy_version": int,
            "rules": str,
            "created_at_ms": int,
        },
        "name",
    ),
    "group_members": ({"device_id": str, "group_name": str}, "device_id"),
    # Credentials issued (for revocation and VerifyCredential); tokens are not stored.
    "credentials": (
        {
            "jti": str,
            "device_id": str,
            "kid": str,
            "cert_serial": str,
            "issued_at_ms": int,
            "expires_at_ms": int,
            "key_fingerprint": str,
        },
        "jti",
    ),
    "device_status": (
        {
            "device_id": str,
            "revoked": int,
            "revoked_at_ms": int,
            "revocation_reason": str,
            "credentials_invalid_before_ms": int,
            "live_expires_at_ms": int,
        },
        "device_id",
    ),
    # An append-only feed of verdict changes; the cursor is what watchers resume from.
    "verdict_events": (
        {
            "cursor": int,
            "device_id": str,
            "kind": str,
            "status": str,
            "at_ms": int,
            "reason": str,
            "credential_expires_at_ms": int,
        },
        "cursor",
    ),
    # The latest evidence of each device (one row per device, replaced on each attestation).
    "evidence": (
        {
            "device_id": str,
            "attestation_id": int,
            "at_ms": int,
            "status": str,
            "values_verified": int,
            "pcrs": str,
            "event_log": bytes,
        },
        "device_id",
    ),
}


class SqliteStore(SecurityTables):
    """Store implementation on a SQLite file (``:memory:`` is not supported: WAL needs a file)."""

    def __init__(
        self,
        path: str | Path,
        *,
        history_per_device: int = DEFAULT_HISTORY_PER_DEVICE,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
    ) -> None:
        if history_per_device < 1:
            raise ValueError("history_per_device must be at least 1")
        self.path = Path(path)
        self.history_per_device = history_per_device
        self.busy_timeout_s = busy_timeout_s
        try:
            # Created private before SQLite opens it; its -wal/-shm files inherit the mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            conn = sqlite3.connect(
                str(self.path),
                timeout=busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            self.db = sqlite_utils.Database(conn)
            self._busy_ms = int(busy_timeout_s * 1000)
            self.db.enable_wal()
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self._checkpointer: sqlite3.Connection | None = None
            self._checkpoint_lock = threading.Lock()
            for table, (columns, pk) in (_SCHEMA | SECURITY_SCHEMA).items():
                t = self.db.table(table)
                t.create(columns, pk=pk, if_not_exists=True)
                # A store made by an older attestd gains the columns added since.
                for column, kind in columns.items():
                    if column not in t.columns_dict:
                        t.add_column(column, kind)
            self.db["devices"].create_index(["ek_fingerprint"], unique=True, if_not_exists=True)  # type: ignore[union-attr]
            self.db["attestations"].create_index(["device_id", "id"], if_not_exists=True)  # type: ignore[union-attr]
            for table in ("nonces", "challenges", "credentials"):  # for pruning by expiry
                self.db[table].create_index(["expires_at_ms"], if_not_exists=True)  # type: ignore[union-attr]
            # A device's outstanding nonces only (put_nonce retires the oldest beyond the
            # cap): spent ones leave it, so the look-up reads at most the cap's worth.
            self.db.execute("DROP INDEX IF EXISTS idx_nonces_device_id_expires_at_ms")
            self.db.execute(
                "CREATE INDEX IF NOT EXISTS idx_nonces_outstanding"
                " ON nonces (device_id, expires_at_ms) WHERE used_at_ms IS NULL"
            )
            # Devices whose credential is live, by its expiry: the expiry sweep (every
            # second) reads the ones due, not every device's status row.
            self.db.execute(
                "CREATE INDEX IF NOT EXISTS idx_device_status_live"
                " ON device_status (live_expires_at_ms) WHERE live_expires_at_ms > 0"
            )
            # Session credentials by their client certificate's serial (VerifyCredential
            # with a certificate), for those issued with one.
            self.db.execute(
                "CREATE INDEX IF NOT EXISTS idx_credentials_cert_serial"
                " ON credentials (cert_serial) WHERE cert_serial != ''"
            )
            create_security_indexes(self.db)
            self._create_counts()
        except (OSError, sqlite3.Error) as e:
            raise StoreUnavailable(f"cannot open the store at {self.path}: {e}") from None

    def _create_counts(self) -> None:
        """The per-device counters; a store from before them is counted from its rows."""
        with self._tx() as c:
            exists = c.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'attestation_counts'"
            ).fetchone()
            if exists:
                return
            c.execute(
                "CREATE TABLE attestation_counts (device_id TEXT PRIMARY KEY,"
                " total INTEGER NOT NULL, affirming INTEGER NOT NULL, failed INTEGER NOT NULL)"
            )
            # Affirming attestations are the ones that earned a credential.
            c.execute(
                "INSERT INTO attestation_counts (device_id, total, affirming, failed)"
                " SELECT device_id, COUNT(*), SUM(credential_expires_at_ms > 0),"
                " SUM(COALESCE(credential_expires_at_ms, 0) <= 0)"
                " FROM attestations GROUP BY device_id"
            )

    # -- plumbing --------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locking) transaction: read-decide-write stays atomic."""
        conn = self.db.conn
        if conn.in_transaction:  # inside an enclosing transaction: part of it
            yield conn
            return
        try:
            self._begin_immediate(conn)
        except sqlite3.Error as e:
            raise _unavailable(e) from None
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def _begin_immediate(self, conn: sqlite3.Connection) -> None:
        """Take the write lock. Not waiting: refused at once if another connection holds
        it. Waiting: tried again after short pauses (WRITE_LOCK_POLL_S) until the busy
        timeout, with SQLite's own busy handler off meanwhile (see WRITE_LOCK_POLL_S)."""
        if not self._busy_ms:
            conn.execute("BEGIN IMMEDIATE")
            return
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            deadline = time.monotonic() + self._busy_ms / 1000
            pauses = itertools.chain(WRITE_LOCK_POLL_S, itertools.repeat(WRITE_LOCK_POLL_MAX_S))
            for pause in pauses:  # pragma: no branch (an endless iterator)
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as e:
                    if not _is_busy(e) or time.monotonic() + pause > deadline:
                        raise
                time.sleep(pause)
        finally:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Several reads in one read transaction: they see one state of the store, and the
        page cache is checked once (a commit by another process empties it, so reads in
        separate transactions under load fetch the same B-tree pages again and again).
        Inside a transaction already open on this connection, part of that one."""
        conn = self.db.conn
        if conn.in_transaction:
            yield
            return
        try:
            conn.execute("BEGIN")
        except sqlite3.Error as e:
            raise _unavailable(e) from None
        try:
            yield
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")  # reads only: nothing to keep or undo

    def _run(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except sqlite3.Error as e:
            raise _unavailable(e) from None

    def set_waiting(self, wait: bool) -> None:
        """Whether a write waits (up to the busy timeout) for another process's write lock,
        or raises StoreBusy at once. A StoreRunner keeps its store not waiting for the
        calls it runs on the event loop, and lets it wait only on its thread."""
        ms = int(self.busy_timeout_s * 1000) if wait else 0
        if ms != self._busy_ms:
            self.db.conn.execute(f"PRAGMA busy_timeout = {ms}")
            self._busy_ms = ms

    def changes(self) -> int:
        """Rows changed through this connection so far (tells whether a call wrote)."""
        return self.db.conn.total_changes

    def checkpoint_inline(self, inline: bool) -> None:
        """Whether this connection's commits copy the WAL into the database file when it
        has grown (SQLite's default), or leave that to ``checkpoint`` (a server does: a
        checkpoint syncs the file, and a commit runs on the event loop)."""
        pages = INLINE_CHECKPOINT_PAGES if inline else 0
        self.db.conn.execute(f"PRAGMA wal_autocheckpoint = {pages}")

    def checkpoint(self, restart_above: int = 0) -> tuple[int, int]:
        """Copy committed WAL pages into the database file, without waiting for or
        blocking readers and writers (PASSIVE). It has its own connection, so any thread
        may run it while the store's connection serves. (pages in the WAL, pages copied)

        Under a steady stream of commits a passive checkpoint never catches up with the
        newest page, and the WAL only ever grows. With ``restart_above``, a WAL longer
        than that many pages is then checkpointed in full and started again from its
        beginning (RESTART): new writes wait meanwhile, at most CHECKPOINT_WAIT_S (most
        was just copied, and the database file synced, so little is left to do), and a
        try that runs out of time is simply repeated at a later call.
        """
        with self._checkpoint_lock:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(
                    str(self.path),
                    timeout=CHECKPOINT_WAIT_S,
                    isolation_level=None,
                    check_same_thread=False,
                )
            try:
                _, wal, copied = self._checkpointer.execute(
                    "PRAGMA wal_checkpoint(PASSIVE)"
                ).fetchone()
                if restart_above and wal > restart_above:
                    # The pages copied so far reach the disk first, while writes go on,
                    # then those written meanwhile, copied and synced once more: the
                    # RESTART syncs the file again holding writes back, and that sync
                    # would otherwise carry every page copied since the last one.
                    sync_file(self.path)
                    self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    sync_file(self.path)
                    _, wal, copied = self._checkpointer.execute(
                        "PRAGMA wal_checkpoint(RESTART)"
                    ).fetchone()
            except sqlite3.Error as e:
                raise _unavailable(e) from None
            except OSError as e:
                raise StoreUnavailable(f"cannot sync the store file: {e}") from None
        return int(wal), int(copied)

    def close(self) -> None:
        with self._checkpoint_lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
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

    def put_nonce(
        self, nonce_hash: bytes, grant: NonceGrant, now_ms: int = 0, max_outstanding: int = 0
    ) -> None:
        def go() -> None:
            if max_outstanding > 0:
                with self._tx() as c:
                    # The device keeps its newest nonces: the oldest beyond the cap are
                    # retired (used_at_ms 0), so storage per device stays bounded and a
                    # stranger asking in its name cannot lock the device out.
                    c.execute(
                        "UPDATE nonces SET used_at_ms = 0 WHERE rowid IN (SELECT rowid FROM"
                        " nonces WHERE device_id = ? AND expires_at_ms > ? AND used_at_ms IS"
                        " NULL ORDER BY expires_at_ms DESC, rowid DESC LIMIT -1 OFFSET ?)",
                        (grant.device_id, now_ms, max_outstanding - 1),
                    )
                    insert(c)
            else:
                insert(self.db.conn)

        def insert(c: sqlite3.Connection) -> None:
            c.execute(
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

    def check_nonce(self, nonce_hash: bytes, device_id: str, now_ms: int) -> NonceGrant:
        """The grant of a nonce this device may still use (nothing is changed: the nonce is
        spent by the record_attestation that carries it); Rejected, with why, otherwise."""

        def go() -> NonceGrant:
            row = self.db.execute(
                "SELECT device_id, expires_at_ms, policy_name, policy_version FROM nonces"
                " WHERE nonce_hash = ? AND device_id = ? AND used_at_ms IS NULL"
                " AND expires_at_ms > ?",
                (nonce_hash, device_id, now_ms),
            ).fetchone()
            if row is None:
                raise self._nonce_refusal(nonce_hash, device_id)
            return NonceGrant(*row)

        return self._run(go)

    def _spend_nonce(
        self, c: sqlite3.Connection, nonce_hash: bytes, device_id: str, now_ms: int
    ) -> None:
        """Mark the nonce used, exactly once however many callers race for it."""
        spent = c.execute(
            "UPDATE nonces SET used_at_ms = ? WHERE nonce_hash = ? AND device_id = ?"
            " AND used_at_ms IS NULL AND expires_at_ms > ?",
            (now_ms, nonce_hash, device_id, now_ms),
        ).rowcount
        if spent != 1:
            raise self._nonce_refusal(nonce_hash, device_id)

    def _nonce_refusal(self, nonce_hash: bytes, device_id: str) -> Rejected:
        """Why a nonce cannot be used (it was not found usable for ``device_id``)."""
        prior = self.db.execute(
            "SELECT device_id, used_at_ms FROM nonces WHERE nonce_hash = ?", (nonce_hash,)
        ).fetchone()
        if prior is None:
            return Rejected("this nonce was not issued by this server", "NONCE_UNKNOWN")
        if prior[0] != device_id:
            return Rejected("this nonce was issued to another device", "NONCE_WRONG_DEVICE")
        if prior[1] == 0:
            return Rejected(
                "this nonce was retired: newer nonces were issued for the device beyond"
                " its limit of outstanding nonces; ask for a new one",
                "NONCE_RETIRED",
            )
        if prior[1] is not None:
            return Rejected("this nonce was already used", "NONCE_REUSED")
        return Rejected("this nonce has expired; ask for a new one", "NONCE_EXPIRED")

    # -- attestations ----------------------------------------------------

    def record_attestation(
        self,
        record: AttestationRecord,
        accepted_clock: dict[str, int] | None,
        audit: AuditEvent | None = None,
        nonce: NonceUse | None = None,
    ) -> int:
        pcrs_json = json.dumps(record.pcrs)

        def go() -> int:
            with self._tx() as c:
                if nonce is not None:  # spent here: the verdict and the nonce's use are one
                    self._spend_nonce(c, nonce.nonce_hash, record.device_id, nonce.now_ms)
                if audit is not None:  # the verdict's audit record, in the same transaction
                    self._append_audit_row(
                        c, audit, audit.detail_json or canonical_detail(audit.detail)
                    )
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
                        pcrs_json,
                        record.credential_expires_at_ms,
                        None if record.boot_state is None else json.dumps(record.boot_state),
                    ),
                )
                att_id = int(cur.lastrowid or 0)
                affirming = int(record.credential is not None)
                (total,) = c.execute(
                    "INSERT INTO attestation_counts (device_id, total, affirming, failed)"
                    " VALUES (?, 1, ?, ?) ON CONFLICT(device_id) DO UPDATE SET"
                    " total = total + 1, affirming = affirming + excluded.affirming,"
                    " failed = failed + excluded.failed RETURNING total",
                    (record.device_id, affirming, 1 - affirming),
                ).fetchone()
                # Retention: the device's newest rows stay (this one among them; ids only
                # grow, since the newest row of the table is never deleted). A device has
                # at most as many rows as attestations counted, so below the limit there
                # is nothing to delete.
                if total > self.history_per_device:
                    c.execute(
                        "DELETE FROM attestations WHERE device_id = ? AND id <= (SELECT id"
                        " FROM attestations WHERE device_id = ? ORDER BY id DESC"
                        " LIMIT 1 OFFSET ?)",
                        (record.device_id, record.device_id, self.history_per_device),
                    )
                c.execute(  # updated in place (REPLACE would delete and insert)
                    "INSERT INTO evidence (device_id, attestation_id, at_ms, status,"
                    " values_verified, pcrs, event_log) VALUES (?,?,?,?,?,?,?)"
                    " ON CONFLICT(device_id) DO UPDATE SET attestation_id ="
                    " excluded.attestation_id, at_ms = excluded.at_ms, status = excluded.status,"
                    " values_verified = excluded.values_verified, pcrs = excluded.pcrs,"
                    " event_log = excluded.event_log",
                    (
                        record.device_id,
                        att_id,
                        record.at_ms,
                        record.status,
                        int(record.values_verified),
                        pcrs_json,
                        record.event_log,
                    ),
                )
                credential = record.credential
                if credential is not None:
                    c.execute(
                        "INSERT INTO credentials (jti, device_id, kid, cert_serial, issued_at_ms,"
                        " expires_at_ms, key_fingerprint) VALUES (?,?,?,?,?,?,?)",
                        (
                            credential.jti,
                            credential.device_id,
                            credential.kid,
                            credential.cert_serial,
                            credential.issued_at_ms,
                            credential.expires_at_ms,
                            credential.key_fingerprint,
                        ),
                    )
                    c.execute(
                        _STATUS_UPSERT + " live_expires_at_ms = excluded.live_expires_at_ms",
                        (record.device_id, 0, credential.expires_at_ms),
                    )
                    self._event(
                        c,
                        record.device_id,
                        "AFFIRMED",
                        record.status,
                        record.at_ms,
                        "",
                        credential.expires_at_ms,
                    )
                else:
                    # A failed (re-)attestation ends the device's live credentials.
                    c.execute(
                        _STATUS_UPSERT + " credentials_invalid_before_ms ="
                        " excluded.credentials_invalid_before_ms, live_expires_at_ms = 0",
                        (record.device_id, record.at_ms + 1, 0),
                    )
                    reason = ",".join(f["code"] for f in record.failures) or record.status
                    self._event(
                        c, record.device_id, "FAILED", record.status, record.at_ms, reason, 0
                    )
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

    def attestation_counts(self, device_id: str) -> AttestationCounts:
        def go() -> AttestationCounts:
            row = self.db.execute(
                "SELECT total, affirming, failed FROM attestation_counts WHERE device_id = ?",
                (device_id,),
            ).fetchone()
            return AttestationCounts(device_id, *(row or (0, 0, 0)))

        return self._run(go)

    # -- policies --------------------------------------------------------

    @staticmethod
    def _policy(row: Any) -> PolicyRecord:
        return PolicyRecord(
            row[0], row[1], json.loads(row[2]), row[3], row[4], row[5] or "", row[6] or ""
        )

    def put_policy(
        self,
        name: str,
        document: dict[str, Any],
        digest: str,
        now_ms: int,
        author: str = "",
        change_note: str = "",
    ) -> PolicyRecord:
        def go() -> PolicyRecord:
            with self._tx() as c:
                latest = c.execute(
                    "SELECT name, version, document, digest, created_at_ms, author, change_note"
                    " FROM policies WHERE name = ?"
                    " AND deleted_at_ms IS NULL ORDER BY version DESC LIMIT 1",
                    (name,),
                ).fetchone()
                if latest is not None and latest[3] == digest:
                    # Publishing the same content again is a no-op, not a new version.
                    return self._policy(latest)
                (top,) = c.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM policies WHERE name = ?", (name,)
                ).fetchone()
                version = top + 1  # numbers are never reused, even after a delete
                c.execute(
                    "INSERT INTO policies (name, version, document, digest, created_at_ms, author,"
                    " change_note, deleted_at_ms) VALUES (?,?,?,?,?,?,?,NULL)",
                    (
                        name,
                        version,
                        json.dumps(document, sort_keys=True),
                        digest,
                        now_ms,
                        author,
                        change_note,
                    ),
                )
                return PolicyRecord(name, version, document, digest, now_ms, author, change_note)

        return self._run(go)

    def get_policy(self, name: str, version: int | None = None) -> PolicyRecord:
        def go() -> PolicyRecord:
            if version is None:
                row = self.db.execute(
                    "SELECT name, version, document, digest, created_at_ms, author, change_note"
                    " FROM policies WHERE name = ?"
                    " AND deleted_at_ms IS NULL ORDER BY version DESC LIMIT 1",
                    (name,),
                ).fetchone()
            else:
                row = self.db.execute(
                    "SELECT name, version, document, digest, created_at_ms, author, change_note"
                    " FROM policies WHERE name = ? AND version = ?"
                    " AND deleted_at_ms IS NULL",
                    (name, version),
                ).fetchone()
            if row is None:
                what = name if version is None else f"{name}@{version}"
                raise NotFound(f"no policy {what!r}", "POLICY_UNKNOWN")
            return self._policy(row)

        return self._run(go)

    def list_policies(self) -> list[PolicyRecord]:
        def go() -> list[PolicyRecord]:
            rows = self.db.execute(
                "SELECT p.name, p.version, p.document, p.digest, p.created_at_ms, p.author,"
                " p.change_note FROM policies p"
                " JOIN (SELECT name, MAX(version) AS v FROM policies WHERE deleted_at_ms IS NULL"
                " GROUP BY name) m ON p.name = m.name AND p.version = m.v ORDER BY p.name"
            ).fetchall()
            return [self._policy(r) for r in rows]

        return self._run(go)

    def policy_history(self, name: str) -> list[PolicyRecord]:
        def go() -> list[PolicyRecord]:
            rows = self.db.execute(
                "SELECT name, version, document, digest, created_at_ms, author, change_note"
                " FROM policies WHERE name = ?"
                " AND deleted_at_ms IS NULL ORDER BY version",
                (name,),
            ).fetchall()
            if not rows:
                raise NotFound(f"no policy {name!r}", "POLICY_UNKNOWN")
            return [self._policy(r) for r in rows]

        return self._run(go)

    def delete_policy(self, name: str, now_ms: int) -> None:
        def go() -> None:
            with self._tx() as c:
                users = [
                    r[0]
                    for r in c.execute(
                        "SELECT name FROM groups WHERE policy_name = ? ORDER BY name", (name,)
                    )
                ]
                if users:
                    raise Conflict(
                        f"policy {name!r} is used by group(s) {', '.join(users)}", "POLICY_IN_USE"
                    )
                cur = c.execute(
                    "UPDATE policies SET deleted_at_ms = ? WHERE name = ?"
                    " AND deleted_at_ms IS NULL",
                    (now_ms, name),
                )
                if cur.rowcount == 0:
                    raise NotFound(f"no policy {name!r}", "POLICY_UNKNOWN")

        self._run(go)

    # -- device groups ---------------------------------------------------

    def _group(self, c: Any, row: Any) -> GroupRecord:
        members = [
            r[0]
            for r in c.execute(
                "SELECT device_id FROM group_members WHERE group_name = ? ORDER BY device_id",
                (row[0],),
            )
        ]
        return GroupRecord(
            row[0],
            row[1] or "",
            row[2],
            row[3] or 0,
            json.loads(row[4] or "[]"),
            tuple(members),
            row[5],
        )

    def _require_policy(self, c: Any, name: str, version: int) -> None:
        if version:
            row = c.execute(
                "SELECT 1 FROM policies WHERE name = ? AND version = ? AND deleted_at_ms IS NULL",
                (name, version),
            ).fetchone()
        else:
            row = c.execute(
                "SELECT 1 FROM policies WHERE name = ? AND deleted_at_ms IS NULL", (name,)
            ).fetchone()
        if row is None:
            what = f"{name}@{version}" if version else name
            raise NotFound(f"policy_name: no policy {what!r}", "POLICY_UNKNOWN")

    def put_group(self, group: GroupRecord, *, create: bool) -> GroupRecord:
        def go() -> GroupRecord:
            with self._tx() as c:
                exists = c.execute("SELECT 1 FROM groups WHERE name = ?", (group.name,)).fetchone()
                if create and exists:
                    raise Conflict(f"name: group {group.name!r} already exists", "GROUP_EXISTS")
                if not create and not exists:
                    raise NotFound(f"name: no group {group.name!r}", "GROUP_UNKNOWN")
                self._require_policy(c, group.policy_name, group.policy_version)
                values = (
                    group.description,
                    group.policy_name,
                    group.policy_version,
                    json.dumps(group.rules, sort_keys=True),
                )
                if create:
                    c.execute(
                        "INSERT INTO groups (name, description, policy_name, policy_version, rules,"
                        " created_at_ms) VALUES (?,?,?,?,?,?)",
                        (group.name, *values, group.created_at_ms),
                    )
                else:
                    c.execute(
                        "UPDATE groups SET description = ?, policy_name = ?, policy_version = ?,"
                        " rules = ? WHERE name = ?",
                        (*values, group.name),
                    )
                row = c.execute(
                    "SELECT name, description, policy_name, policy_version, rules, created_at_ms"
                    " FROM groups WHERE name = ?",
                    (group.name,),
                ).fetchone()
                return self._group(c, row)

        return self._run(go)

    def get_group(self, name: str) -> GroupRecord:
        def go() -> GroupRecord:
            c = self.db.conn
            row = c.execute(
                "SELECT name, description, policy_name, policy_version, rules, created_at_ms"
                " FROM groups WHERE name = ?",
                (name,),
            ).fetchone()
            if row is None:
                raise NotFound(f"no group {name!r}", "GROUP_UNKNOWN")
            return self._group(c, row)

        return self._run(go)

    def list_groups(self) -> list[GroupRecord]:
        def go() -> list[GroupRecord]:
            c = self.db.conn
            rows = c.execute(
                "SELECT name, description, policy_name, policy_version, rules, created_at_ms"
                " FROM groups ORDER BY name"
            ).fetchall()
            return [self._group(c, r) for r in rows]

        return self._run(go)

    def get_group_policy(self, name: str) -> tuple[str, int]:
        def go() -> tuple[str, int]:
            row = self.db.execute(
                "SELECT policy_name, policy_version FROM groups WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise NotFound(f"unknown group {name!r}", "GROUP_UNKNOWN")
            return str(row[0]), int(row[1] or 0)

        return self._run(go)

    def group_rules(self) -> list[tuple[str, list[dict[str, str]]]]:
        def go() -> list[tuple[str, list[dict[str, str]]]]:
            rows = self.db.execute("SELECT name, rules FROM groups ORDER BY name").fetchall()
            return [(r[0], json.loads(r[1] or "[]")) for r in rows]

        return self._run(go)

    def delete_group(self, name: str) -> None:
        def go() -> None:
            with self._tx() as c:
                if c.execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone() is None:
                    raise NotFound(f"no group {name!r}", "GROUP_UNKNOWN")
                (members,) = c.execute(
                    "SELECT COUNT(*) FROM group_members WHERE group_name = ?", (name,)
                ).fetchone()
                if members:
                    raise Conflict(
                        f"group {name!r} still has {members} assigned device(s)", "GROUP_IN_USE"
                    )
                c.execute("DELETE FROM groups WHERE name = ?", (name,))

        self._run(go)

    def assign_devices(self, group: str, device_ids: list[str]) -> GroupRecord:
        def go() -> GroupRecord:
            with self._tx() as c:
                row = c.execute(
                    "SELECT name, description, policy_name, policy_version, rules, created_at_ms"
                    " FROM groups WHERE name = ?",
                    (group,),
                ).fetchone()
                if row is None:
                    raise NotFound(f"group: no group {group!r}", "GROUP_UNKNOWN")
                for device_id in device_ids:
                    if (
                        c.execute(
                            "SELECT 1 FROM devices WHERE device_id = ?", (device_id,)
                        ).fetchone()
                        is None
                    ):
                        # Raised inside the transaction: nothing is assigned.
                        raise NotFound(
                            f"device_ids: unknown device {device_id!r}", "DEVICE_UNKNOWN"
                        )
                c.executemany(
                    "INSERT INTO group_members (device_id, group_name) VALUES (?, ?)"
                    " ON CONFLICT(device_id) DO UPDATE SET group_name = excluded.group_name",
                    [(d, group) for d in device_ids],
                )
                return self._group(c, row)

        return self._run(go)

    def unassign_devices(self, device_ids: list[str]) -> None:
        def go() -> None:
            with self._tx() as c:
                for device_id in device_ids:
                    row = c.execute(
                        "SELECT 1 FROM group_members WHERE device_id = ?", (device_id,)
                    ).fetchone()
                    if row is None:
                        raise NotFound(
                            f"device_ids: {device_id!r} is not assigned to a group", "NOT_ASSIGNED"
                        )
                c.executemany(
                    "DELETE FROM group_members WHERE device_id = ?", [(d,) for d in device_ids]
                )

        self._run(go)

    def assigned_group(self, device_id: str) -> str | None:
        def go() -> str | None:
            row = self.db.execute(
                "SELECT group_name FROM group_members WHERE device_id = ?", (device_id,)
            ).fetchone()
            return None if row is None else str(row[0])

        return self._run(go)

    # -- latest evidence (for capture and dry-run) -----------------------

    def latest_evidence(self, device_id: str) -> Evidence | None:
        def go() -> Evidence | None:
            row = self.db.execute(
                "SELECT device_id, attestation_id, at_ms, status, values_verified, pcrs, event_log"
                " FROM evidence WHERE device_id = ?",
                (device_id,),
            ).fetchone()
            return None if row is None else _evidence(row)

        return self._run(go)

    def all_evidence(self) -> list[tuple[Device, Evidence | None]]:
        """Every device with its latest evidence (None if it never attested), by id."""

        def go() -> list[tuple[Device, Evidence | None]]:
            ids = [
                r[0] for r in self.db.execute("SELECT device_id FROM devices ORDER BY device_id")
            ]
            return [(self.get_device(i), self.latest_evidence(i)) for i in ids]

        return self._run(go)

    # -- credentials, revocation and verdict events ----------------------

    def _event(
        self,
        c: Any,
        device_id: str,
        kind: str,
        status: str,
        at_ms: int,
        reason: str,
        expires_ms: int,
    ) -> None:
        c.execute(
            "INSERT INTO verdict_events (device_id, kind, status, at_ms, reason,"
            " credential_expires_at_ms) VALUES (?,?,?,?,?,?)",
            (device_id, kind, status, at_ms, reason, expires_ms),
        )

    @staticmethod
    def _status_row(c: Any, device_id: str) -> Any:
        c.execute(
            "INSERT OR IGNORE INTO device_status (device_id, revoked, revoked_at_ms,"
            " revocation_reason, credentials_invalid_before_ms, live_expires_at_ms)"
            " VALUES (?, 0, 0, '', 0, 0)",
            (device_id,),
        )
        return c.execute(
            "SELECT device_id, revoked, revoked_at_ms, revocation_reason,"
            " credentials_invalid_before_ms, live_expires_at_ms FROM device_status"
            " WHERE device_id = ?",
            (device_id,),
        ).fetchone()

    def device_status(self, device_id: str) -> DeviceStatus:
        def go() -> DeviceStatus:
            row = self.db.execute(
                "SELECT device_id, revoked, revoked_at_ms, revocation_reason,"
                " credentials_invalid_before_ms, live_expires_at_ms FROM device_status"
                " WHERE device_id = ?",
                (device_id,),
            ).fetchone()
            if row is None:
                return DeviceStatus(device_id, False, 0, "", 0, 0)
            return DeviceStatus(row[0], bool(row[1]), row[2], row[3], row[4], row[5])

        return self._run(go)

    def set_revoked(self, device_id: str, revoked: bool, reason: str, now_ms: int) -> DeviceStatus:
        def go() -> DeviceStatus:
            with self._tx() as c:
                if (
                    c.execute("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)).fetchone()
                    is None
                ):
                    raise NotFound(f"device_id: unknown device {device_id!r}", "DEVICE_UNKNOWN")
                self._status_row(c, device_id)
                if revoked:
                    # Every credential issued until now ends now.
                    c.execute(
                        "UPDATE device_status SET revoked = 1, revoked_at_ms = ?,"
                        " revocation_reason = ?, credentials_invalid_before_ms = ?,"
                        " live_expires_at_ms = 0 WHERE device_id = ?",
                        (now_ms, reason, now_ms + 1, device_id),
                    )
                    self._event(c, device_id, "REVOKED", "", now_ms, reason, 0)
                else:
                    c.execute(
                        "UPDATE device_status SET revoked = 0, revocation_reason = ?"
                        " WHERE device_id = ?",
                        (f"readmitted: {reason}", device_id),
                    )
                    self._event(c, device_id, "READMITTED", "", now_ms, reason, 0)
            return self.device_status(device_id)

        return self._run(go)

    def get_credential(self, *, jti: str = "", serial: str = "") -> CredentialRecord | None:
        def go() -> CredentialRecord | None:
            # Two fixed statements: no SQL is ever assembled from input.
            sql = (
                "SELECT jti, device_id, kid, cert_serial, issued_at_ms, expires_at_ms,"
                " key_fingerprint FROM credentials WHERE jti = ?"
                if jti
                else "SELECT jti, device_id, kid, cert_serial, issued_at_ms, expires_at_ms,"
                " key_fingerprint FROM credentials WHERE cert_serial = ? AND cert_serial != ''"
            )
            row = self.db.execute(sql, (jti or serial,)).fetchone()
            return None if row is None else CredentialRecord(*row)

        return self._run(go)

    def events_after(
        self, cursor: int, device_ids: list[str], limit: int
    ) -> list[VerdictEventRecord]:
        def go() -> list[VerdictEventRecord]:
            columns = "cursor, device_id, kind, status, at_ms, reason, credential_expires_at_ms"
            if device_ids:
                # Filtered in SQL, so a long run of other devices' events never hides one.
                marks = ",".join("?" * len(device_ids))  # only placeholders, never values
                rows = self.db.execute(
                    "SELECT " + columns + " FROM verdict_events"  # noqa: S608
                    " WHERE cursor > ? AND device_id IN (" + marks + ") ORDER BY cursor LIMIT ?",
                    (cursor, *device_ids, limit),
                ).fetchall()
            else:
                rows = self.db.execute(
                    "SELECT " + columns + " FROM verdict_events"  # noqa: S608 (constant)
                    " WHERE cursor > ? ORDER BY cursor LIMIT ?",
                    (cursor, limit),
                ).fetchall()
            return [VerdictEventRecord(*r) for r in rows]

        return self._run(go)

    def last_event_cursor(self) -> int:
        def go() -> int:
            (n,) = self.db.execute("SELECT COALESCE(MAX(cursor), 0) FROM verdict_events").fetchone()
            return int(n)

        return self._run(go)

    def oldest_event_cursor(self) -> int:
        def go() -> int:
            (n,) = self.db.execute("SELECT COALESCE(MIN(cursor), 0) FROM verdict_events").fetchone()
            return int(n)

        return self._run(go)

    def announce_expiries(self, now_ms: int) -> int:
        """Emit EXPIRED for each device whose live credential ran out; returns how many.

        Safe to run in several processes at once: the immediate transaction serialises
        them, and whoever comes second finds ``live_expires_at_ms`` already cleared.
        """

        def go() -> int:
            with self._tx() as c:
                due = c.execute(
                    "SELECT device_id, live_expires_at_ms FROM device_status"
                    " WHERE live_expires_at_ms > 0 AND live_expires_at_ms <= ?",
                    (now_ms,),
                ).fetchall()
                for device_id, expired in due:
                    c.execute(
                        "UPDATE device_status SET live_expires_at_ms = 0 WHERE device_id = ?",
                        (device_id,),
                    )
                    self._event(c, device_id, "EXPIRED", "", expired, "credential expired", expired)
                return len(due)

        return self._run(go)

    # -- retention -------------------------------------------------------

    def prune(self, now_ms: int, event_retention: int) -> int:
        """Delete what retention lets go, at most PRUNE_BATCH rows per table; how many went.

        Verdict events: all but the newest ``event_retention``. A watcher resuming from a
        cursor older than the oldest kept event gets the oldest kept one next (the events
        in between are gone; see ``oldest_event_cursor``). Cursors are never reused: the
        newest event always stays. Nonces and challenges: those expired more than
        NONCE_GRACE_MS ago, used or not (a replay of one then reads as unknown: still
        refused). Credential records: those expired more than CREDENTIAL_GRACE_MS ago.
        """
        if event_retention < 1:
            raise ValueError("event_retention must be at least 1")

        def go() -> int:
            deleted = 0
            with self._tx() as c:
                row = c.execute(
                    "SELECT cursor FROM verdict_events ORDER BY cursor DESC LIMIT 1 OFFSET ?",
                    (event_retention,),
                ).fetchone()
                if row is not None:  # the newest event beyond the retention, and older ones
                    deleted += c.execute(
                        "DELETE FROM verdict_events WHERE cursor IN (SELECT cursor FROM"
                        " verdict_events WHERE cursor <= ? ORDER BY cursor LIMIT ?)",
                        (row[0], PRUNE_BATCH),
                    ).rowcount
            for sql, before in (
                (_PRUNE_NONCES, now_ms - NONCE_GRACE_MS),
                (_PRUNE_CHALLENGES, now_ms - NONCE_GRACE_MS),
                (_PRUNE_CREDENTIALS, now_ms - CREDENTIAL_GRACE_MS),
            ):
                with self._tx() as c:
                    deleted += c.execute(sql, (before, PRUNE_BATCH)).rowcount
            return deleted

        return self._run(go)


def _is_busy(e: sqlite3.Error) -> bool:
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


def sync_file(path: Path) -> None:
    """Put a file's written pages on disk (its data; size changes included)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _unavailable(e: sqlite3.Error) -> StoreUnavailable:
    if _is_busy(e):
        return StoreBusy(f"store busy: {e}")
    return StoreUnavailable(f"store error: {e}")


# Fixed statements (the table names are constants, never input).
# A device's status row, made (not revoked) if it has none yet, else updated as the
# SET clause appended says; parameters: device_id, credentials_invalid_before_ms,
# live_expires_at_ms (the values of a new row).
_STATUS_UPSERT = (
    "INSERT INTO device_status (device_id, revoked, revoked_at_ms, revocation_reason,"
    " credentials_invalid_before_ms, live_expires_at_ms) VALUES (?, 0, 0, '', ?, ?)"
    " ON CONFLICT(device_id) DO UPDATE SET"
)
_PRUNE_NONCES = (
    "DELETE FROM nonces WHERE rowid IN (SELECT rowid FROM nonces WHERE expires_at_ms < ? LIMIT ?)"
)
_PRUNE_CHALLENGES = (
    "DELETE FROM challenges WHERE rowid IN"
    " (SELECT rowid FROM challenges WHERE expires_at_ms < ? LIMIT ?)"
)
_PRUNE_CREDENTIALS = (
    "DELETE FROM credentials WHERE rowid IN"
    " (SELECT rowid FROM credentials WHERE expires_at_ms < ? LIMIT ?)"
)


def _evidence(row: Any) -> Evidence:
    return Evidence(
        device_id=row[0],
        attestation_id=row[1],
        at_ms=row[2],
        status=row[3],
        values_verified=bool(row[4]),
        pcrs=json.loads(row[5]),
        event_log=row[6] or b"",
    )
