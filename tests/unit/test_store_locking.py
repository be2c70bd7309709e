"""The SQLite store under another process's writes: waiting for the write lock, and
read snapshots."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from attestd.store.base import NonceGrant, StoreBusy
from attestd.store.sqlite import SqliteStore

GRANT = NonceGrant("dev-a", 10**15, "default", 1)


def _nonces(store: SqliteStore) -> int:
    (n,) = store.db.execute("SELECT COUNT(*) FROM nonces").fetchone()
    return int(n)


def _busy_timeout_ms(store: SqliteStore) -> int:
    (ms,) = store.db.execute("PRAGMA busy_timeout").fetchone()
    return int(ms)


@pytest.fixture
def other(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's connection to the same store file."""
    SqliteStore(tmp_path / "s.sqlite").close()  # the schema
    conn = sqlite3.connect(tmp_path / "s.sqlite", isolation_level=None)
    yield conn
    conn.close()


def test_a_waiting_write_goes_ahead_once_the_other_writer_commits(
    tmp_path: Path, other: sqlite3.Connection
) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    other.execute("BEGIN IMMEDIATE")  # holds the write lock
    errors: list[BaseException] = []

    def put() -> None:
        try:
            store.put_nonce(b"\x01" * 32, GRANT, 0, 4)
        except BaseException as e:  # reported below
            errors.append(e)

    writer = threading.Thread(target=put)
    try:
        writer.start()
        writer.join(0.3)
        assert writer.is_alive()  # still waiting for the lock
        other.execute("COMMIT")
        writer.join(10)
        assert not writer.is_alive() and errors == []
        assert _nonces(store) == 1
        # SQLite's own busy handler is back for everything else the connection runs.
        assert _busy_timeout_ms(store) == 10_000
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        writer.join(10)
        store.close()


def test_a_waiting_write_gives_up_after_the_busy_timeout(
    tmp_path: Path, other: sqlite3.Connection
) -> None:
    store = SqliteStore(tmp_path / "s.sqlite", busy_timeout_s=0.3)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreBusy):
            store.put_nonce(b"\x01" * 32, GRANT, 0, 4)
        other.execute("ROLLBACK")
        assert _nonces(store) == 0  # nothing written
        assert _busy_timeout_ms(store) == 300
        store.put_nonce(b"\x01" * 32, GRANT, 0, 4)  # the store still works
        assert _nonces(store) == 1
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        store.close()


def test_a_write_that_may_not_wait_is_refused_at_once(
    tmp_path: Path, other: sqlite3.Connection
) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    store.set_waiting(False)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreBusy):
            store.put_nonce(b"\x01" * 32, GRANT, 0, 4)
        assert _busy_timeout_ms(store) == 0
    finally:
        other.execute("ROLLBACK")
        store.close()
    assert _nonces(SqliteStore(tmp_path / "s.sqlite")) == 0


def test_reads_in_a_snapshot_see_one_state(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    writer = SqliteStore(tmp_path / "s.sqlite")  # as another process would
    try:
        with store.snapshot():
            before = _nonces(store)
            writer.put_nonce(b"\x01" * 32, GRANT, 0, 4)
            assert _nonces(store) == before == 0  # the other's commit is not seen inside
        assert _nonces(store) == 1  # and is after
    finally:
        writer.close()
        store.close()


def test_a_snapshot_inside_one_is_part_of_it_and_ends_on_errors(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    try:
        with store.snapshot():
            with store.snapshot():
                pass
            assert store.db.conn.in_transaction  # the inner one did not end the outer
        assert not store.db.conn.in_transaction
        with pytest.raises(LookupError), store.snapshot():
            raise LookupError("a failing read")
        assert not store.db.conn.in_transaction
        store.put_nonce(b"\x01" * 32, GRANT, 0, 4)  # writes go ahead afterwards
        assert _nonces(store) == 1
    finally:
        store.close()
