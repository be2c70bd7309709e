"""What the servicers share: configuration, the store (off the event loop), keys, caches."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography import x509

from attestd.core.policy import Policy, policy_from_document
from attestd.core.tpm import PublicArea, parse_public
from attestd.service.config import ServerConfig
from attestd.service.keys import IssuingCA, SigningKeyring
from attestd.store.base import PolicyRecord, Store, StoreBusy, StoreUnavailable

T = TypeVar("T")


class StoreRunner:
    """Runs blocking store calls on one worker thread so the event loop never waits on disk.

    ``fast`` runs a call on the event loop itself when that cannot wait long: the store
    is not in use by the thread, and SQLite is told not to wait for another process's
    write lock (WAL reads never wait). If it would have to wait, the call goes to the
    thread after all. Hot paths use it for calls that may be repeated from the start:
    reads, and a single write transaction or write statement that failed before it
    changed anything.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attestd-store")
        self._lock = threading.Lock()
        # A store that can refuse to wait (SQLite): calls on the event loop never wait for
        # another process's lock; only the thread's calls do (the setting is switched
        # there, not on every fast call).
        self._set_waiting: Callable[[bool], None] | None = getattr(store, "set_waiting", None)
        self._changes: Callable[[], int] | None = getattr(store, "changes", None)
        if self._set_waiting is not None:
            self._set_waiting(False)

    def _locked(self, fn: Callable[[], T]) -> T:
        with self._lock:
            if self._set_waiting is None:
                return fn()
            self._set_waiting(True)
            try:
                return fn()
            finally:
                self._set_waiting(False)

    async def __call__(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs)
        return await loop.run_in_executor(self._pool, self._locked, call)

    async def fast(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        if self._changes is not None and self._lock.acquire(blocking=False):
            try:
                before = self._changes()
                try:
                    return fn(*args, **kwargs)
                except StoreBusy:
                    if self._changes() != before:  # it wrote before it had to wait
                        raise StoreUnavailable("store busy; retry") from None
                # Another process is writing and nothing was changed: wait on the thread.
            finally:
                self._lock.release()
        return await self(fn, *args, **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            self.store.close()


@functools.lru_cache(maxsize=8192)  # ~2.3 KB each: bounded at ~20 MB per process
def cached_public(raw: bytes) -> PublicArea:
    """AK public areas are parsed once (they only change at enrollment)."""
    return parse_public(raw, "ak_public")


@dataclass
class ServiceState:
    config: ServerConfig
    store: StoreRunner
    ek_roots: list[x509.Certificate]
    ek_intermediates: list[x509.Certificate]
    keyring: SigningKeyring
    ca: IssuingCA
    # Issues role client certificates for the mTLS port.
    client_ca: IssuingCA
    clock: Callable[[], float] = time.time
    # Policy versions are immutable, so (name, version) -> Policy never goes stale.
    _policies: dict[tuple[str, int], Policy] = field(default_factory=dict)

    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def notify(self) -> None:
        """Wake every watcher: verdict events were appended."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout_s: float) -> None:
        """Wait for notify(), or at most ``timeout_s`` (other replicas append too)."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    def cached_policy(self, name: str, version: int) -> Policy | None:
        return self._policies.get((name, version))

    def policy_of(self, record: PolicyRecord) -> Policy:
        key = (record.name, record.version)
        policy = self._policies.get(key)
        if policy is None:
            policy = policy_from_document(record.document, self.config.limits)
            self._policies[key] = policy
        return policy
