"""A nonce is checked when Attest reads its context and spent in the verdict's own
transaction (SqliteStore.check_nonce, record_attestation(nonce=...)); and the WAL
is copied into the database file by SqliteStore.checkpoint when commits leave it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from attestd.store.base import (
    AttestationRecord,
    AuditEvent,
    NonceGrant,
    NonceUse,
    Rejected,
)
from attestd.store.sqlite import INLINE_CHECKPOINT_PAGES, SqliteStore

NOW = 1_000_000
DEVICE = "dev-a"


def _record(device: str = DEVICE, at_ms: int = NOW) -> AttestationRecord:
    return AttestationRecord(
        device_id=device,
        at_ms=at_ms,
        status="affirming",
        failures=[],
        warnings=[],
        trust_vector={},
        policy_name="default",
        policy_version=1,
        clock={},
        pcrs={"sha256": {"0": "00" * 32}},
    )


def _audit(device: str = DEVICE) -> AuditEvent:
    return AuditEvent(NOW, "attestation.verdict", f"device:{device}", device, {"outcome": "ok"})


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "s.sqlite")
    s.put_nonce(b"\x01" * 32, NonceGrant(DEVICE, NOW + 60_000, "default", 1), NOW, 4)
    return s


def _counts(store: SqliteStore) -> tuple[int, int]:
    (attestations,) = store.db.execute("SELECT COUNT(*) FROM attestations").fetchone()
    (audit,) = store.db.execute("SELECT COUNT(*) FROM audit_log").fetchone()
    return attestations, audit


def test_checking_a_nonce_does_not_spend_it(store: SqliteStore) -> None:
    for _ in range(3):
        grant = store.check_nonce(b"\x01" * 32, DEVICE, NOW)
    assert grant == NonceGrant(DEVICE, NOW + 60_000, "default", 1)
    store.record_attestation(_record(), None, _audit(), NonceUse(b"\x01" * 32, NOW))
    with pytest.raises(Rejected) as e:
        store.check_nonce(b"\x01" * 32, DEVICE, NOW)
    assert e.value.code == "NONCE_REUSED"


def test_a_nonce_spent_meanwhile_records_nothing(store: SqliteStore) -> None:
    """Two Attests passed check_nonce with one nonce; the second to record loses whole."""
    use = NonceUse(b"\x01" * 32, NOW)
    store.check_nonce(b"\x01" * 32, DEVICE, NOW)
    store.check_nonce(b"\x01" * 32, DEVICE, NOW)
    store.record_attestation(_record(), None, _audit(), use)
    before = _counts(store)
    with pytest.raises(Rejected) as e:
        store.record_attestation(_record(), None, _audit(), use)
    assert e.value.code == "NONCE_REUSED"
    assert _counts(store) == before  # neither the verdict nor its audit record
    assert store.attestation_counts(DEVICE).total == 1


@pytest.mark.parametrize(
    ("device", "nonce", "at_ms", "code"),
    [
        (DEVICE, b"\x02" * 32, NOW, "NONCE_UNKNOWN"),
        ("dev-b", b"\x01" * 32, NOW, "NONCE_WRONG_DEVICE"),
        (DEVICE, b"\x01" * 32, NOW + 60_000, "NONCE_EXPIRED"),
    ],
)
def test_refused_nonces_record_nothing_and_say_why(
    store: SqliteStore, device: str, nonce: bytes, at_ms: int, code: str
) -> None:
    with pytest.raises(Rejected) as checked:
        store.check_nonce(nonce, device, at_ms)
    assert checked.value.code == code
    with pytest.raises(Rejected) as spent:
        store.record_attestation(
            _record(device, at_ms), None, _audit(device), NonceUse(nonce, at_ms)
        )
    assert spent.value.code == code
    assert _counts(store) == (0, 0)
    # The owner's nonce is still good.
    store.record_attestation(_record(), None, _audit(), NonceUse(b"\x01" * 32, NOW))
    assert _counts(store) == (1, 1)


def test_a_retired_nonce_is_refused_as_retired(store: SqliteStore) -> None:
    for i in range(2, 6):  # four newer nonces: the cap is four outstanding
        grant = NonceGrant(DEVICE, NOW + 60_000 + i, "default", 1)
        store.put_nonce(bytes([i]) * 32, grant, NOW, 4)
    use = NonceUse(b"\x01" * 32, NOW)
    with pytest.raises(Rejected) as e:
        store.record_attestation(_record(), None, _audit(), use)
    assert e.value.code == "NONCE_RETIRED"
    assert _counts(store) == (0, 0)


def _rows_in_database_file(path: Path) -> int:
    """Attestation rows in the database file itself, not counting the WAL."""
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        (n,) = conn.execute("SELECT COUNT(*) FROM attestations").fetchone()
        return int(n)
    finally:
        conn.close()


def _record_many(store: SqliteStore, n: int) -> None:
    for i in range(n):
        store.record_attestation(_record(f"dev-{i}", NOW + i), None)


def test_commits_leave_the_wal_to_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = SqliteStore(path)
    store.checkpoint_inline(False)
    try:
        store.checkpoint()  # the schema into the file
        n = INLINE_CHECKPOINT_PAGES // 2  # well past the inline threshold in pages
        _record_many(store, n)
        assert _rows_in_database_file(path) == 0  # all still in the WAL
        wal, copied = store.checkpoint()
        assert wal >= INLINE_CHECKPOINT_PAGES and copied == wal
        assert _rows_in_database_file(path) == n
    finally:
        store.close()


def test_a_long_wal_is_checkpointed_in_full_and_started_again(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = SqliteStore(path)
    store.checkpoint_inline(False)
    try:
        n = 200
        _record_many(store, n)
        wal, copied = store.checkpoint()
        assert wal > 100 and copied == wal
        # Beyond the threshold: the file synced, checkpointed in full, started again.
        wal, copied = store.checkpoint(restart_above=100)
        assert copied == wal
        store.record_attestation(_record("dev-last", NOW + n), None)
        wal, _ = store.checkpoint()
        assert wal < 50  # the next commit wrote from the WAL's beginning
        assert _rows_in_database_file(path) == n + 1
    finally:
        store.close()


def test_commits_checkpoint_inline_by_default(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = SqliteStore(path)
    try:
        _record_many(store, INLINE_CHECKPOINT_PAGES // 2)
        assert _rows_in_database_file(path) > 0
    finally:
        store.close()
