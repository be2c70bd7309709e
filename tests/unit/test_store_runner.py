"""StoreRunner.fast: on the event loop when SQLite need not wait, else on the thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from attestd.service.state import StoreRunner
from attestd.store.base import NonceGrant, StoreUnavailable
from attestd.store.sqlite import SqliteStore


def _grant(device: str) -> NonceGrant:
    return NonceGrant(device, 10**15, "default", 1)


def test_fast_runs_inline_when_the_store_is_free(tmp_path: Path) -> None:
    runner = StoreRunner(SqliteStore(tmp_path / "s.sqlite"))
    seen: list[str] = []

    def where() -> None:
        seen.append(threading.current_thread().name)

    async def go() -> None:
        await runner.fast(where)
        await runner(where)

    try:
        asyncio.run(go())
    finally:
        runner.close()
    assert seen[0] == "MainThread" and seen[1].startswith("attestd-store")


def test_fast_waits_on_the_thread_while_another_process_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    runner = StoreRunner(SqliteStore(path))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    threads: list[str] = []

    def put() -> None:
        threads.append(threading.current_thread().name)
        runner.store.put_nonce(b"\x01" * 32, _grant("dev-a"), 0, 4)

    async def go() -> None:
        task = asyncio.ensure_future(runner.fast(put))
        await asyncio.sleep(0.3)
        assert not task.done()  # waiting for the lock, off the event loop
        other.execute("COMMIT")
        await asyncio.wait_for(task, 10)

    try:
        asyncio.run(go())
        # Tried inline first (refused at once, nothing written), then on the thread.
        assert threads[0] == "MainThread" and threads[-1].startswith("attestd-store")
        (n,) = runner.store.db.execute("SELECT COUNT(*) FROM nonces").fetchone()  # type: ignore[attr-defined]
        assert n == 1
    finally:
        other.close()
        runner.close()


def test_fast_never_repeats_a_call_that_already_wrote(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    runner = StoreRunner(SqliteStore(path))
    store = runner.store
    other = sqlite3.connect(path, isolation_level=None)
    calls = 0

    def write_then_wait() -> None:
        nonlocal calls
        calls += 1
        store.put_nonce(b"\x02" * 32, _grant("dev-b"))  # written (autocommit)
        other.execute("BEGIN IMMEDIATE")
        try:
            store.put_nonce(b"\x03" * 32, _grant("dev-b"), 0, 4)  # must wait: busy
        finally:
            other.execute("ROLLBACK")

    async def go() -> None:
        await runner.fast(write_then_wait)

    try:
        with pytest.raises(StoreUnavailable):
            asyncio.run(go())
        assert calls == 1  # not handed to the thread to run again
    finally:
        other.close()
        runner.close()
