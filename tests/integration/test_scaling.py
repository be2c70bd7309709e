"""Scaling out and staying bounded: `attestd serve --workers N` on one port, and retention.

Several worker processes share one port (SO_REUSEPORT) and one SQLite store; the
parent only supervises. Each worker's log lines carry its index and pid, and at
``--log-level debug`` every call is logged, which is how these tests see that
both workers answered.

The server runs as deployed: TLS (a trial CA) on the shared port, the mTLS port on
an explicit free port (several workers share it too), and callers with roles carry
API tokens put in the store before the server starts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import BOOT_SELECTION, Device, ServerThread, rpc_code
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tpmsim import Manufacturer, SimTpm

from attestd.agent.client import Agent, AgentConfig, capture_policy
from attestd.connect import Connection, open_channel
from attestd.service.access import Role
from attestd.service.admin import ROLE_TO_PB, create_token
from attestd.service.server import KEYRING_REFRESH_S
from attestd.store.base import AttestationRecord, CredentialRecord, NonceGrant
from attestd.store.sqlite import NONCE_GRACE_MS, SqliteStore
from attestd.tlsinit import init_tls
from attestd.v1 import (
    admin_pb2,
    common_pb2,
    enrollment_pb2,
    enrollment_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    verdicts_pb2,
    verdicts_pb2_grpc,
)

pytestmark = pytest.mark.integration

EXE = Path(sys.executable).parent / "attestd"
CALL = re.compile(r"\[worker (\d+) pid (\d+)\]: call (\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> set[int]:
    """Live child processes of ``pid``, from /proc (no psutil)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: set[int], timeout_s: float = 20.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = {p for p in pids if alive(p)}
        if not left:
            return left
        time.sleep(0.1)
    return {p for p in pids if alive(p)}


def tls_args(tmp_path: Path, mtls_port: int = 0) -> list[str]:
    """A trial CA's server certificate, and the mTLS port (0: any free one)."""
    tls = init_tls(tmp_path / "tls", ["127.0.0.1"])
    return [
        "--tls-cert",
        str(tls.server_cert),
        "--tls-key",
        str(tls.server_key),
        "--mtls-listen",
        f"127.0.0.1:{mtls_port}",
    ]


def put_tokens(data_dir: Path) -> dict[str, str]:
    """One API token per role, stored as `attestd admin token create` would, before start."""
    data_dir.mkdir(mode=0o700, parents=True)
    store = SqliteStore(data_dir / "attestd.sqlite")
    try:
        return {
            role: create_token(
                store,
                admin_pb2.CreateTokenRequest(role=ROLE_TO_PB[Role(role)], name=f"scaling-{role}"),
                int(time.time() * 1000),
                "tests",
            ).token
            for role in ("admin", "policy-author", "gateway")
        }
    finally:
        store.close()


class Workers:
    """`attestd serve --workers N` as a subprocess, its log in a file."""

    def __init__(self, tmp_path: Path, manufacturer: Manufacturer, workers: int = 2) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = tmp_path / "serve.log"
        self.log = self.log_path.open("w")
        self.tokens = put_tokens(tmp_path / "data")
        self.ca_cert = tmp_path / "tls" / "ca-cert.pem"
        self.proc = subprocess.Popen(
            [
                str(EXE),
                "serve",
                "--workers",
                str(workers),
                "--listen",
                self.address,
                *tls_args(tmp_path, free_port()),
                "--data-dir",
                str(tmp_path / "data"),
                "--ek-root",
                str(manufacturer.root_cert_path),
                "--ek-intermediate",
                str(manufacturer.intermediate_cert_path),
                "--log-level",
                "debug",
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, "TSS2_LOG": "all+none"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == f"attestd serving on {self.address}\n", (line, self.log_text())
        # The workers (the multiprocessing resource tracker is a child as well).
        self.pids = {p for p in children(self.proc.pid) if b"spawn_main" in _cmdline(p)}
        assert len(self.pids) == workers, self.log_text()
        self.everyone = children(self.proc.pid)

    def log_text(self) -> str:
        return self.log_path.read_text()  # (written by the server only)

    def channel(self, role: str | None = None) -> grpc.Channel:
        """A channel with its own connection (the kernel picks a worker per connection),
        with ``role``'s token (None: no credential, as a device)."""
        conn = Connection(
            self.address, ca_cert=self.ca_cert, token=self.tokens[role] if role else ""
        )
        return open_channel(conn, [("grpc.use_local_subchannel_pool", 1)])

    def agent(self, tcti: str, state_dir: Path) -> Agent:
        return Agent(
            AgentConfig(server=self.address, tcti=tcti, state_dir=state_dir, ca_cert=self.ca_cert)
        )

    def served(self, method: str) -> set[int]:
        """Pids of the workers that logged a call of ``method``."""
        return {int(m[2]) for m in CALL.finditer(self.log_text()) if m[3] == method}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.log.close()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture
def workers(tmp_path: Path, manufacturer: Manufacturer) -> Iterator[Workers]:
    w = Workers(tmp_path, manufacturer)
    yield w
    w.stop()
    for pid in wait_gone(w.everyone, 5):  # a failed test leaves nothing running
        os.kill(pid, signal.SIGKILL)


def until_both(workers: Workers, method: str, call: Callable[[], None], tries: int) -> None:
    for _ in range(tries):
        call()
        if workers.served(method) == workers.pids:
            return
    raise AssertionError(f"{method}: served by {workers.served(method)}, not all of {workers.pids}")


def test_two_workers_share_the_port_store_and_keys(
    workers: Workers, tpm_factory: Callable[..., SimTpm], tmp_path: Path
) -> None:
    def health() -> None:
        with workers.channel() as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

    until_both(workers, "/grpc.health.v1.Health/Check", health, 200)

    # A device enrolls through one connection, then attests again and again on new ones:
    # whichever worker answers sees the same store (nonces, clock, history) and keys.
    tpm = tpm_factory()
    tpm.boot()
    state = tmp_path / "agent"
    agent = workers.agent(tpm.tcti, state)
    agent.enroll()
    policy = capture_policy(tpm.tcti, "default", BOOT_SELECTION)
    with workers.channel("policy-author") as ch:
        policy_pb2_grpc.PolicyStub(ch).PutPolicy(
            policy_pb2.PutPolicyRequest(document=json.dumps(policy), change_note="golden"),
            timeout=10,
        )
    agent.close()
    tokens = []

    def attest() -> None:
        a = workers.agent(tpm.tcti, state)
        try:
            response = a.attest()
        finally:
            a.close()
        assert response.verdict.status == common_pb2.VERDICT_STATUS_AFFIRMING
        tokens.append(response.credential)

    until_both(workers, "/attestd.v1.Attestation/Attest", attest, 40)
    print(f"{len(tokens)} attestations until both workers had answered one")
    # Every credential verifies at every worker (one signing key, one credentials table).
    for token in tokens:
        for _ in range(3):
            with workers.channel("gateway") as ch:
                answer = verdicts_pb2_grpc.VerdictsStub(ch).VerifyCredential(
                    verdicts_pb2.VerifyCredentialRequest(token=token), timeout=5
                )
                assert answer.state == verdicts_pb2.CREDENTIAL_STATE_VALID, answer.reason
    with workers.channel("admin") as ch:
        info = enrollment_pb2_grpc.DevicesStub(ch).GetDevice(
            enrollment_pb2.GetDeviceRequest(device_id=agent.device_id()), timeout=5
        )
        assert info.latest_verdict.status == common_pb2.VERDICT_STATUS_AFFIRMING

    # SIGTERM to the parent stops every process it started, and it exits 0.
    everyone = workers.everyone
    assert workers.stop() == 0
    assert wait_gone(everyone) == set()
    log = workers.log_text()
    for pid in workers.pids:
        assert re.search(rf"pid {pid}\]: stopping", log), log


def test_a_key_rotation_reaches_every_worker(workers: Workers) -> None:
    with workers.channel("admin") as ch:
        rotated = keys_pb2_grpc.KeysStub(ch).RotateSigningKey(
            keys_pb2.RotateSigningKeyRequest(), timeout=10
        )
    (new,) = [k.kid for k in rotated.keys if k.current]
    assert len(rotated.keys) == 2
    time.sleep(KEYRING_REFRESH_S * 2.5)  # the other worker reloads keys.json

    def listed() -> None:
        with workers.channel("admin") as ch:
            keys = keys_pb2_grpc.KeysStub(ch).ListSigningKeys(
                keys_pb2.ListSigningKeysRequest(), timeout=5
            )
        assert [k.kid for k in keys.keys if k.current] == [new]
        assert len(keys.keys) == 2

    until_both(workers, "/attestd.v1.Keys/ListSigningKeys", listed, 200)


def test_a_dead_worker_stops_the_server(workers: Workers) -> None:
    victim, survivor = sorted(workers.pids)
    os.kill(victim, signal.SIGKILL)
    assert workers.proc.wait(timeout=30) == 1
    assert wait_gone({survivor}) == set()
    log = workers.log_text()
    assert f"pid {victim}) stopped unexpectedly (killed by SIGKILL); all workers stopped" in log
    with workers.channel() as ch, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)


def test_several_workers_need_an_explicit_port(tmp_path: Path) -> None:
    tls = tls_args(tmp_path)  # its mTLS port is 0 too
    for listen, setting in (
        ("127.0.0.1:0", "workers"),
        (f"127.0.0.1:{free_port()}", "mtls_listen"),
    ):
        out = subprocess.run(
            [str(EXE), "serve", "--workers", "2", "--listen", listen, *tls],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
        )
        assert out.returncode == 2, out.stderr
        assert f"{setting}: 2 worker" in out.stderr and "explicit port" in out.stderr
        assert not (tmp_path / "attestd-data").exists()  # refused before touching anything


def test_port_taken_by_another_program_is_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        tls = tls_args(tmp_path, free_port())
        for n in ("2", "1"):
            out = subprocess.run(
                [str(EXE), "serve", "--workers", n, "--listen", address, *tls],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path,
            )
            assert out.returncode == 2, (n, out.stderr)
            assert f"cannot listen on {address}" in out.stderr


# == retention ===========================================================================


@pytest.fixture
def server(server_factory: Callable[..., ServerThread]) -> ServerThread:
    return server_factory(history_per_device=3, event_retention=4)


def test_history_per_device_keeps_the_newest_rows_and_counts_them_all(
    device: Device, server: ServerThread
) -> None:
    for _ in range(5):
        assert device.agent.attest().verdict.status == common_pb2.VERDICT_STATUS_AFFIRMING
    store = server.running.state.store.store
    assert isinstance(store, SqliteStore)

    def rows() -> list[int]:
        return [
            r[0]
            for r in store.db.execute(
                "SELECT id FROM attestations WHERE device_id = ? ORDER BY id",
                (device.device_id,),
            )
        ]

    kept = rows()
    assert len(kept) == 3
    counts = store.attestation_counts(device.device_id)
    assert (counts.total, counts.affirming, counts.failed) == (5, 5, 0)
    # The latest verdict is still the newest row.
    latest = store.latest_attestation(device.device_id)
    assert latest is not None and latest.attestation_id == kept[-1]

    # A failing attestation is counted as failed; still three rows.
    device.tpm.powercycle()
    device.tpm.boot(tamper=True)
    assert device.agent.attest().verdict.status == common_pb2.VERDICT_STATUS_CONTRAINDICATED
    assert len(rows()) == 3 and rows()[:2] == kept[1:]
    counts = store.attestation_counts(device.device_id)
    assert (counts.total, counts.affirming, counts.failed) == (6, 5, 1)
    assert store.attestation_counts("dev-unknown").total == 0


def test_event_retention_and_a_watcher_behind_it(device: Device, server: ServerThread) -> None:
    for _ in range(6):
        device.agent.attest()
    store = server.running.state.store.store
    assert store.last_event_cursor() == 6
    # (The server's own sweep may have pruned some already.)
    store.prune(server.running.state.now_ms(), server.config.event_retention)
    assert store.oldest_event_cursor() == 3
    assert [e.cursor for e in store.events_after(0, [], 100)] == [3, 4, 5, 6]
    # A watcher resuming from a pruned cursor would skip events: it is told to start over.
    stream = server.verdicts.WatchVerdicts(verdicts_pb2.WatchVerdictsRequest(after_cursor=1))
    with pytest.raises(grpc.RpcError) as expired:
        next(stream)
    assert rpc_code(expired.value) == (grpc.StatusCode.OUT_OF_RANGE, "CURSOR_EXPIRED")
    # ...with where to resume once it has read the current verdicts again.
    assert isinstance(expired.value, grpc.Call)
    trailers = dict(expired.value.trailing_metadata() or ())
    assert trailers["attestd-latest-cursor"] == "6"
    # Right behind the oldest kept event, or from the start, it reads what is kept.
    for after in (2, 0):
        stream = server.verdicts.WatchVerdicts(
            verdicts_pb2.WatchVerdictsRequest(after_cursor=after)
        )
        try:
            assert [next(stream).cursor for _ in range(4)] == [3, 4, 5, 6]
        finally:
            stream.cancel()
    # New events continue the numbering (cursors are never reused).
    device.agent.attest()
    assert store.last_event_cursor() == 7


def test_prune_drops_long_expired_nonces_and_keeps_recent_ones(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    try:
        for i in range(3):
            store.put_nonce(bytes([i]) * 32, NonceGrant("dev-a", 1000 * (i + 1), "default", 1))
        now = 2500 + NONCE_GRACE_MS  # nonces 1 and 2 expired longer ago than the grace
        assert store.prune(now, 10) == 2
        (left,) = store.db.execute("SELECT COUNT(*) FROM nonces").fetchone()
        assert left == 1
    finally:
        store.close()


# == several processes on one store ======================================================


def _record(device_id: str, at_ms: int, expires_ms: int = 0) -> AttestationRecord:
    credential = (
        CredentialRecord(f"jti-{device_id}-{at_ms}", device_id, "kid", "", at_ms, expires_ms, "")
        if expires_ms
        else None
    )
    return AttestationRecord(
        device_id=device_id,
        at_ms=at_ms,
        status="affirming" if credential else "contraindicated",
        failures=[] if credential else [{"code": "X"}],
        warnings=[],
        trust_vector={},
        policy_name="default",
        policy_version=1,
        clock={},
        pcrs={},
        credential_expires_at_ms=expires_ms,
        credential=credential,
    )


WRITER = textwrap.dedent(
    """
    import sys
    import time
    from attestd.store.base import AttestationRecord, CredentialRecord
    from attestd.store.sqlite import SqliteStore

    store = SqliteStore(sys.argv[1], history_per_device=5)
    me = int(sys.argv[2])
    time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # all start together
    for i in range(150):
        device, at = f"dev-{i % 3}", me * 1000 + i
        credential = CredentialRecord(f"jti-{me}-{i}", device, "k", "", at, 10**9, "")
        store.record_attestation(
            AttestationRecord(
                device, at, "affirming", [], [], {}, "default", 1, {}, {},
                credential=credential if i % 2 else None,
            ),
            None,
        )
    store.close()
    """
)


def test_concurrent_writers_in_several_processes_wait_their_turn(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    SqliteStore(path).close()
    start = str(time.time() + 2)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(n), start],
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    store = SqliteStore(path, history_per_device=5)
    try:
        for d in range(3):
            counts = store.attestation_counts(f"dev-{d}")
            assert counts.total == 200 and counts.affirming + counts.failed == 200
            (rows,) = store.db.execute(
                "SELECT COUNT(*) FROM attestations WHERE device_id = ?", (f"dev-{d}",)
            ).fetchone()
            assert rows == 5
        assert store.last_event_cursor() == 600
    finally:
        store.close()


def test_expiries_are_announced_once_by_concurrent_sweepers(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    first, second = SqliteStore(path), SqliteStore(path)
    try:
        for i in range(50):
            first.record_attestation(_record(f"dev-{i}", 1000, 5000), None)
        announced = []

        def sweep(store: SqliteStore) -> None:
            for now in range(5000, 5020):
                announced.append(store.announce_expiries(now))

        threads = [threading.Thread(target=sweep, args=(s,)) for s in (first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(announced) == 50
        kinds = [e.kind for e in first.events_after(0, [], 1000)]
        assert kinds.count("EXPIRED") == 50
    finally:
        first.close()
        second.close()
