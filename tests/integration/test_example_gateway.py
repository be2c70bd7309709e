"""examples/smart_energy: the gateway admits attested sensors and drops revoked ones.

The gateway and the sensor run as subprocesses, as a user would run them: the
gateway against the test server (TLS, trusting the server's CA, with an API token of
the gateway role in a private file), the sensor with the agent's client certificate
and its TPM-resident key (through the tpm2 OpenSSL provider, OPENSSL_CONF and
TPM2OPENSSL_TCTI set as examples/smart_energy/README.md says).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import importlib.util
import json
import os
import queue
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import grpc
import pytest
from conftest import REPO, Device, ServerThread, run_cli
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attestd.v1 import enrollment_pb2, verdicts_pb2

TPM2_PROVIDER = Path("/usr/lib/x86_64-linux-gnu/ossl-modules/tpm2.so")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not TPM2_PROVIDER.exists(),
        reason="tpm2-openssl (the OpenSSL 3 tpm2 provider) not installed",
    ),
]

EXAMPLE = REPO / "examples" / "smart_energy"
AFFIRMING = 2
WAIT_S = 30.0  # upper bound for anything that should take well under a second


class Proc:
    """A subprocess whose stdout lines are collected, each with when it was read."""

    def __init__(self, argv: list[str], env: dict[str, str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._stderr: IO[bytes] = stderr_path.open("wb")
        self.p = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._stderr, env=env, cwd=REPO, text=True
        )
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put((time.monotonic(), line.rstrip("\n")))

    def expect(self, pattern: str, timeout: float = WAIT_S) -> tuple[float, re.Match[str]]:
        """(monotonic time the line was read, match) of the next line matching."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                at, line = self.lines.get(timeout=max(0.0, min(left, 0.2)))
            except queue.Empty:
                if left > 0 and (self.p.poll() is None or self._reader.is_alive()):
                    continue
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout} s "
                    f"(exit status {self.p.poll()}); {self.describe()}"
                ) from None
            self.seen.append(line)
            m = re.search(pattern, line)
            if m:
                return at, m

    def wait(self, timeout: float = WAIT_S) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s; {self.describe()}") from None

    def describe(self) -> str:
        self._stderr.flush()
        return (
            f"{self.p.args[1]} stdout so far: {self.seen!r}; stderr:\n"
            f"{self.stderr_path.read_text(errors='replace')}"
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit; harmless if it has exited."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        self._reader.join(5)
        self._stderr.close()


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENSSL_CONF", "TPM2OPENSSL_TCTI")}
    env["TSS2_LOG"] = "all+none"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def token_file(path: Path, token: str) -> Path:
    """A token in a file only its owner can read, as `attestd admin token create --out`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


def gateway_argv(server: ServerThread, tmp_path: Path, *connection: str) -> list[str]:
    return [
        sys.executable,
        str(EXAMPLE / "gateway.py"),
        "--attestd",
        server.address,
        *connection,
        "--listen",
        "127.0.0.1:0",
        "--readings",
        str(tmp_path / "readings.jsonl"),
        "--tls-dir",
        str(tmp_path / "gateway-tls"),
        "--connect-timeout",
        "5",
    ]


def start_gateway(server: ServerThread, tmp_path: Path, *extra: str) -> tuple[Proc, int]:
    assert server.ca_cert is not None
    gateway = Proc(
        [
            sys.executable,
            str(EXAMPLE / "gateway.py"),
            "--attestd",
            server.address,
            "--ca-cert",
            str(server.ca_cert),
            "--token-file",
            str(token_file(tmp_path / "gateway.token", server.tokens["gateway"])),
            "--listen",
            "127.0.0.1:0",
            "--readings",
            str(tmp_path / "readings.jsonl"),
            "--tls-dir",
            str(tmp_path / "gateway-tls"),
            *extra,
        ],
        base_env(),
        tmp_path / "gateway.stderr",
    )
    _, m = gateway.expect(r"^listening on 127\.0\.0\.1:(\d+)$")
    return gateway, int(m[1])


def start_sensor(dev: Device, port: int, tmp_path: Path, name: str, *extra: str) -> Proc:
    env = {
        **base_env(),
        "OPENSSL_CONF": str(EXAMPLE / "openssl-tpm2.cnf"),
        "TPM2OPENSSL_TCTI": dev.tpm.tcti,
    }
    return Proc(
        [
            sys.executable,
            str(EXAMPLE / "sensor.py"),
            "--gateway",
            f"127.0.0.1:{port}",
            "--gateway-cert",
            str(tmp_path / "gateway-tls" / "gateway-cert.pem"),
            "--agent-state",
            str(dev.state_dir),
            "--meter",
            f"meter-{name}",
            "--interval-ms",
            "50",
            *extra,
        ],
        env,
        tmp_path / f"sensor-{name}.stderr",
    )


def readings_of(tmp_path: Path, device_id: str, meter: str) -> list[dict[str, Any]]:
    path = tmp_path / "readings.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["device"] == device_id and r["meter"] == meter:
            out.append(r)
    return out


def wait_until(what: str, check: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def stranger_identity(tmp_path: Path, device_id: str) -> tuple[Path, Path]:
    """A certificate naming the device, but from a CA that is not attestd's."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attestd device CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"urn:attestd:device:{device_id}")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "stranger-cert.pem", tmp_path / "stranger-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def try_connect(port: int, gateway_cert: Path, identity: tuple[Path, Path] | None = None) -> str:
    """Connect as a client with `identity` (or none): "admitted ..." or "refused: ..."."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(gateway_cert)
    if identity is not None:
        ctx.load_cert_chain(*identity)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            # TLS 1.3: the server judges the client certificate after the client's
            # side of the handshake; its verdict comes with the first read.
            data = tls.recv(4096)
    except (ssl.SSLError, ConnectionError) as e:
        return f"refused: {e}"
    if not data:
        return "refused: closed without a word"
    return f"answered {data.decode(errors='replace').strip()}"


# ---------------------------------------------------------------------------


def test_gateway_admits_affirming_sensor_and_drops_it_within_a_second_of_revocation(
    device: Device, server: ServerThread, tmp_path: Path
) -> None:
    resp = device.agent.attest()  # binds the TLS key: client-cert.pem + tls-key.pem
    assert resp.verdict.status == AFFIRMING, resp.verdict
    cert_file = device.state_dir / "client-cert.pem"
    assert cert_file.exists() and (device.state_dir / "tls-key.pem").exists()
    device_id = device.device_id
    old_cert = tmp_path / "client-cert-before-revocation.pem"
    old_cert.write_bytes(cert_file.read_bytes())
    first_serial = x509.load_pem_x509_certificate(old_cert.read_bytes()).serial_number

    gateway, port = start_gateway(server, tmp_path)
    gateway_cert = tmp_path / "gateway-tls" / "gateway-cert.pem"
    sensors: list[Proc] = []
    try:
        # 1. The attested device's sensor is admitted; its readings arrive.
        sensor = start_sensor(device, port, tmp_path, "a")
        sensors.append(sensor)
        sensor.expect(rf"^sensor: admitted as {re.escape(device_id)}$")
        wait_until(
            "three readings from the sensor",
            lambda: len(readings_of(tmp_path, device_id, "meter-a")) >= 3,
        )
        first = readings_of(tmp_path, device_id, "meter-a")[0]
        assert first["device"] == device_id and first["kwh"] > 0, first

        # 2. A certificate naming the device but from another CA: refused in the handshake.
        outcome = try_connect(port, gateway_cert, stranger_identity(tmp_path, device_id))
        assert outcome.startswith("refused"), outcome
        # 3. No certificate at all: refused likewise.
        outcome = try_connect(port, gateway_cert)
        assert outcome.startswith("refused"), outcome
        assert sensor.p.poll() is None, "the refusals must not disturb the admitted sensor"
        wait_until(
            "the gateway logs both refusals",
            lambda: (tmp_path / "gateway.stderr").read_text().count("TLS handshake failed") == 2,
        )

        # 4. Revocation through the real API: the sensor is dropped within a second.
        called_at = time.monotonic()
        server.devices.RevokeDevice(
            enrollment_pb2.RevokeDeviceRequest(device_id=device_id, reason="meter tampering")
        )
        returned_at = time.monotonic()
        noticed_at, m = sensor.expect(r"^sensor: closed by the gateway: (.*)$", timeout=10)
        # The server wakes its watchers before it answers: the sensor may notice first.
        print(
            f"\nRevokeDevice took {(returned_at - called_at) * 1000:.1f} ms; the sensor "
            f"noticed the closed connection {(noticed_at - returned_at) * 1000:.1f} ms after "
            f"it returned ({(noticed_at - called_at) * 1000:.1f} ms after the call began)"
        )
        assert noticed_at - returned_at < 1.0, f"{noticed_at - returned_at:.3f} s"
        assert noticed_at - called_at < 1.0, f"{noticed_at - called_at:.3f} s"
        assert m[1] == "revoked: meter tampering", m[1]
        assert sensor.wait() == 3, sensor.describe()
        count = len(readings_of(tmp_path, device_id, "meter-a"))
        time.sleep(0.3)
        assert len(readings_of(tmp_path, device_id, "meter-a")) == count

        # 5. A new connection is refused, saying why.
        again = start_sensor(device, port, tmp_path, "b")
        sensors.append(again)
        again.expect(r"^sensor: refused: revoked: meter tampering$")
        assert again.wait() == 2, again.describe()

        # 6. Readmitted (through the CLI) but not attested since: still refused; the
        # old certificate predates the revocation.
        run_cli(
            "device", "readmit", device_id, "--reason", "inspected", "--server",
            server.address, check=True,
        )  # fmt: skip
        again = start_sensor(device, port, tmp_path, "c")
        sensors.append(again)
        again.expect(r"^sensor: refused: ")
        assert again.wait() == 2, again.describe()

        # 7. Attests again: a new certificate, admitted again, readings arrive.
        resp = device.agent.attest()
        assert resp.verdict.status == AFFIRMING, resp.verdict
        new_serial = x509.load_pem_x509_certificate(cert_file.read_bytes()).serial_number
        assert new_serial != first_serial
        # The device is affirming again, but its certificate from before the
        # revocation is not: attestd says so (VerifyCredential), the gateway refuses it.
        stale = start_sensor(device, port, tmp_path, "old", "--cert", str(old_cert))
        sensors.append(stale)
        stale.expect(r"^sensor: refused: certificate revoked: ")
        assert stale.wait() == 2, stale.describe()
        back = start_sensor(device, port, tmp_path, "d")
        sensors.append(back)
        back.expect(rf"^sensor: admitted as {re.escape(device_id)}$")
        wait_until(
            "readings after readmission",
            lambda: len(readings_of(tmp_path, device_id, "meter-d")) >= 3,
        )

        # 8. SIGTERM: the gateway tells the sensor, closes and exits 0.
        gateway.p.send_signal(signal.SIGTERM)
        _, m = back.expect(r"^sensor: closed by the gateway: (.*)$", timeout=10)
        assert m[1] == "gateway shutting down", m[1]
        assert gateway.wait(15) == 0, gateway.describe()
        assert back.wait() == 3, back.describe()
    finally:
        for s in sensors:
            s.stop()
        gateway.stop()


def test_gateway_watch_resumes_from_its_cursor_after_attestd_restarts(
    device_factory: Callable[..., Device], server: ServerThread, tmp_path: Path
) -> None:
    """attestd goes away and comes back: the gateway keeps its sensors meanwhile, then
    reconnects from the last event it saw and still drops a device revoked just then."""
    first = ServerThread(
        dataclasses.replace(server.config, data_dir=tmp_path / "attestd"), server.tls
    )
    running = [first]
    gateway: Proc | None = None
    sensor: Proc | None = None
    try:
        dev = device_factory(target=first)
        first.put_policy(dev.golden_policy())
        assert dev.agent.attest().verdict.status == AFFIRMING
        gateway, port = start_gateway(first, tmp_path)
        sensor = start_sensor(dev, port, tmp_path, "a")
        sensor.expect(rf"^sensor: admitted as {re.escape(dev.device_id)}$")
        log_file = tmp_path / "gateway.stderr"
        wait_until("the AFFIRMED event is seen", lambda: cursor_of(log_file) >= 1)
        seen = cursor_of(log_file)

        # attestd stops: the watch is lost, the admitted sensor stays (offline grace).
        dev.agent.close()  # done with it; its channel would only log the GOAWAY
        running.remove(first)
        stop_server(first)
        wait_until("the gateway notices", lambda: "verdict watch lost" in log_file.read_text())
        time.sleep(1.5)  # a few failed reconnects and polls
        assert sensor.p.poll() is None, sensor.describe()

        # attestd is back (same store, same address); the device is revoked at once.
        # (The gateway keeps the token it was given: it is in the same store.)
        second = ServerThread(
            dataclasses.replace(first.config, listen=first.address, data_dir=tmp_path / "attestd"),
            server.tls,
        )
        running.append(second)
        second.devices.RevokeDevice(
            enrollment_pb2.RevokeDeviceRequest(device_id=dev.device_id, reason="stolen")
        )
        _, m = sensor.expect(r"^sensor: closed by the gateway: (.*)$", timeout=WAIT_S)
        assert m[1] == "revoked: stolen", m[1]
        # The watch picked up where it left off: after the cursor it had, not from 0.
        wait_until(
            "the watch replays the revocation", lambda: "revoked dev-" in log_file.read_text()
        )
        log = log_file.read_text()
        resumed = re.findall(r"watching verdict events after cursor (\d+)", log)
        assert resumed[0] == "0" and resumed[-1] == str(seen), log
        assert re.search(rf"event {seen + 1}: revoked {dev.device_id}", log), log
    finally:
        if sensor is not None:
            sensor.stop()
        if gateway is not None:
            gateway.stop()
        for s in running:
            stop_server(s)


def stop_server(s: ServerThread) -> None:
    """ServerThread.stop, letting the cancelled watch streams finish before the loop
    closes (else asyncio complains that their tasks were destroyed while pending)."""

    async def stop_and_settle() -> None:
        await s.running.stop(0)
        await asyncio.sleep(0.2)

    s.channel.close()
    asyncio.run_coroutine_threadsafe(stop_and_settle(), s.loop).result(30)
    s.loop.call_soon_threadsafe(s.loop.stop)
    s.thread.join(10)
    s.loop.close()


def cursor_of(log_file: Path) -> int:
    """The newest verdict event cursor the gateway logged."""
    text = log_file.read_text()
    cursors = [int(c) for c in re.findall(r"event (\d+): ", text)]
    return max(cursors, default=0)


def test_gateway_needs_tls_and_a_gateway_credential(server: ServerThread, tmp_path: Path) -> None:
    """It stops at start, saying why, rather than run without verdicts."""
    assert server.ca_cert is not None
    ca = ["--ca-cert", str(server.ca_cert)]
    author = token_file(tmp_path / "author.token", server.tokens["policy-author"])
    env = {k: v for k, v in base_env().items() if not k.startswith("ATTESTD_")}
    cases = [
        # No credential at all: refused before it starts.
        ([*ca], {}, "needs a credential of the gateway role"),
        # A token of another role: attestd refuses it.
        ([*ca, "--token-file", str(author)], {}, "refused the gateway's credential"),
        # A token attestd never issued (in the environment this time).
        (ca, {"ATTESTD_TOKEN": "atd_" + "0" * 16 + "_nope"}, "refused the gateway's credential"),
        # The right token, but without the CA attestd's certificate is not trusted.
        ([], {"ATTESTD_TOKEN": server.tokens["gateway"]}, "did not answer GetTrustBundle"),
    ]
    for connection, extra, message in cases:
        out = subprocess.run(
            gateway_argv(server, tmp_path, *connection),
            capture_output=True,
            text=True,
            env={**env, **extra},
            cwd=REPO,
            timeout=60,
        )
        assert out.returncode != 0 and message in out.stderr, (connection, out.stderr)
        assert "listening on" not in out.stdout


# -- resynchronising after CURSOR_EXPIRED --------------------------------------------


def prune_all_but_newest(server: ServerThread) -> None:
    """What attestd's retention does with event_retention = 1: only the newest event stays."""
    state = server.running.state
    state.store.store.prune(state.now_ms(), 1)


def test_gateway_resynchronises_when_its_cursor_has_expired(
    device: Device, server: ServerThread, tmp_path: Path
) -> None:
    """Started after a cursor whose events were pruned: attestd refuses the watch with
    CURSOR_EXPIRED; the gateway reads its cache again, watches after the newest cursor
    attestd named, and still drops a sensor at once when its device is revoked."""
    for _ in range(3):  # events 1..3
        assert device.agent.attest().verdict.status == AFFIRMING
    prune_all_but_newest(server)
    store = server.running.state.store.store
    assert store.oldest_event_cursor() == store.last_event_cursor() == 3

    gateway, port = start_gateway(server, tmp_path, "--after-cursor", "1")
    log_file = tmp_path / "gateway.stderr"
    sensor: Proc | None = None
    try:
        wait_until(
            "the gateway resynchronises",
            lambda: "watching verdict events after cursor 3" in log_file.read_text(),
        )
        log = log_file.read_text()
        assert "events were missed" in log and "the cache was read again" in log, log
        sensor = start_sensor(device, port, tmp_path, "a")
        sensor.expect(rf"^sensor: admitted as {re.escape(device.device_id)}$")

        called_at = time.monotonic()
        server.devices.RevokeDevice(
            enrollment_pb2.RevokeDeviceRequest(device_id=device.device_id, reason="stolen")
        )
        noticed_at, m = sensor.expect(r"^sensor: closed by the gateway: (.*)$", timeout=10)
        assert noticed_at - called_at < 1.0, f"{noticed_at - called_at:.3f} s"
        assert m[1] == "revoked: stolen", m[1]
        # It came on the stream watched from the new cursor.
        wait_until(
            "the revocation event is logged",
            lambda: f"event 4: revoked {device.device_id}" in log_file.read_text(),
        )
        log = log_file.read_text()
        assert "verdict watch lost" not in log, log  # no retrying from the expired cursor
    finally:
        if sensor is not None:
            sensor.stop()
        gateway.stop()


def test_gateway_refuses_a_device_revoked_in_events_it_never_saw(
    device_factory: Callable[..., Device], server: ServerThread, tmp_path: Path
) -> None:
    """The gateway has a device cached as affirming; while it is away the device is
    revoked, another event follows and retention prunes both but the newest. The
    REVOKED event never reaches the gateway: its re-read of the cache must catch it."""
    first = ServerThread(
        dataclasses.replace(server.config, data_dir=tmp_path / "attestd"), server.tls
    )
    running = [first]
    gateway: Proc | None = None
    try:
        dev = device_factory(target=first)
        other = device_factory(target=first)  # enrolled: its revocation is the newer event
        first.put_policy(dev.golden_policy())
        assert dev.agent.attest().verdict.status == AFFIRMING  # event 1
        for d in (dev, other):
            d.agent.close()  # done with them; their channels would only log the GOAWAY

        gateway, port = start_gateway(first, tmp_path)
        log_file = tmp_path / "gateway.stderr"
        # The device is admitted (and cached); its sensor leaves after two readings, so
        # no open connection makes the gateway poll GetVerdict while attestd is away.
        sensor = start_sensor(dev, port, tmp_path, "a", "--count", "2")
        sensor.expect(rf"^sensor: admitted as {re.escape(dev.device_id)}$")
        assert sensor.wait() == 0, sensor.describe()
        sensor.stop()
        wait_until("the AFFIRMED event is seen", lambda: cursor_of(log_file) == 1)

        # attestd goes away; meanwhile (another instance on the same store, on a port
        # the gateway does not know) the device is revoked, then the other one, and
        # retention keeps only the newest event.
        running.remove(first)
        stop_server(first)
        wait_until("the gateway notices", lambda: "verdict watch lost" in log_file.read_text())
        aside = ServerThread(
            dataclasses.replace(first.config, data_dir=tmp_path / "attestd"), server.tls
        )
        running.append(aside)
        for d, reason in ((dev, "stolen"), (other, "spare")):  # events 2 and 3
            aside.devices.RevokeDevice(
                enrollment_pb2.RevokeDeviceRequest(device_id=d.device_id, reason=reason)
            )
        prune_all_but_newest(aside)
        assert aside.running.state.store.store.oldest_event_cursor() == 3
        running.remove(aside)
        stop_server(aside)

        # attestd is back where the gateway expects it: the gateway's cursor (1) expired.
        back = ServerThread(
            dataclasses.replace(first.config, listen=first.address, data_dir=tmp_path / "attestd"),
            server.tls,
        )
        running.append(back)
        wait_until(
            "the gateway resynchronises",
            lambda: "watching verdict events after cursor 3" in log_file.read_text(),
        )
        log = log_file.read_text()
        assert "events were missed" in log, log
        assert "the cache was read again (1 device(s))" in log, log
        assert not re.search(r"event [23]: ", log), log  # the revocations never came
        # The cache is trusted again, and it says revoked.
        again = start_sensor(dev, port, tmp_path, "b")
        try:
            again.expect(r"^sensor: refused: revoked: stolen$")
            assert again.wait() == 2, again.describe()
        finally:
            again.stop()
    finally:
        if gateway is not None:
            gateway.stop()
        for s in running:
            stop_server(s)


def load_gateway() -> ModuleType:
    name = "smart_energy_gateway"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE / "gateway.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class FakeWatch:
    """A WatchVerdicts call: fails with `error`, or stays open without events."""

    def __init__(self, error: grpc.aio.AioRpcError | None) -> None:
        self.error = error
        self.cancelled = False

    def __aiter__(self) -> Any:
        return self._events()

    async def _events(self) -> Any:
        if self.error is not None:
            raise self.error
        await asyncio.Event().wait()
        yield

    def done(self) -> bool:
        return self.cancelled or self.error is not None

    def cancel(self) -> None:
        self.cancelled = True


class FakeVerdicts:
    """attestd as the cache sees it: WatchVerdicts refuses the first cursor (CURSOR_EXPIRED,
    with `latest` in the trailers unless None); GetVerdict of "dev-a" waits for `release`."""

    def __init__(self, latest: int | None) -> None:
        trailers = [("attestd-code", "CURSOR_EXPIRED")]
        if latest is not None:
            trailers.append(("attestd-latest-cursor", str(latest)))
        self.expired = grpc.aio.AioRpcError(
            grpc.StatusCode.OUT_OF_RANGE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*trailers),
            "after_cursor 1: events up to 4 are no longer kept",
        )
        self.watches: list[int] = []
        self.asked: list[str] = []
        self.release = asyncio.Event()

    def WatchVerdicts(self, request: verdicts_pb2.WatchVerdictsRequest) -> FakeWatch:
        self.watches.append(request.after_cursor)
        return FakeWatch(self.expired if len(self.watches) == 1 else None)

    async def GetVerdict(
        self, request: verdicts_pb2.GetVerdictRequest, timeout: float
    ) -> verdicts_pb2.DeviceVerdict:
        self.asked.append(request.device_id)
        answer = verdicts_pb2.DeviceVerdict(device_id=request.device_id)
        if request.device_id == "dev-a":  # revoked while the gateway was not watching
            await self.release.wait()
            answer.revoked, answer.revocation_reason = True, "stolen"
        answer.verdict.status = AFFIRMING
        answer.credential_expires_at_ms = int(time.time() * 1000) + 3_600_000
        return answer


class FakeChannel:
    """Always READY; its calls are never made (the test replaces the cache's stub)."""

    def get_state(self) -> grpc.ChannelConnectivity:
        return grpc.ChannelConnectivity.READY

    def unary_unary(self, *args: Any, **kwargs: Any) -> None:
        return None

    unary_stream = unary_unary


async def until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        await asyncio.sleep(0.01)


def test_verdict_cache_resync_reads_every_device_again_and_is_not_trusted_meanwhile() -> None:
    gw = load_gateway()

    async def go() -> None:
        ended: list[tuple[str, str]] = []
        resynced: list[int] = []

        async def on_resynced() -> None:
            resynced.append(cache.cursor)

        cache = gw.VerdictCache(FakeChannel(), lambda d, w: ended.append((d, w)), 1, on_resynced)
        attestd = FakeVerdicts(latest=9)
        cache.stub = attestd
        far = int(time.time() * 1000) + 3_600_000
        for d in ("dev-a", "dev-b"):
            cache.entries[d] = gw.DeviceState(True, far)
        watch = asyncio.create_task(cache.watch())
        try:
            # Resynchronising: dev-b read again, dev-a's answer still outstanding.
            await until("dev-b is read again", lambda: attestd.asked.count("dev-b") == 1)
            await until("dev-b's read is done", lambda: "dev-b" not in cache._fills)
            assert "dev-a" in attestd.asked and cache.resyncing and not cache.live
            assert cache.cursor == 1 and attestd.watches == [1]
            # A lookup meanwhile does not trust the cache: it asks attestd.
            assert (await cache.lookup("dev-b")).refusal(gw.now_ms()) is None
            assert attestd.asked.count("dev-b") == 2
            # dev-a's answer: revoked; the gateway is told, then watches after cursor 9.
            attestd.release.set()
            await until("the watch is back", lambda: cache.live)
            assert attestd.watches == [1, 9] and cache.cursor == 9, attestd.watches
            assert ended == [("dev-a", "revoked: stolen")], ended
            assert resynced == [1]  # open connections are checked before the cursor moves
            assert cache.entries["dev-a"].refusal(gw.now_ms()) == "revoked: stolen"
            # Live again: the cache answers without asking.
            await cache.lookup("dev-b")
            assert attestd.asked.count("dev-b") == 2
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

        # Without the latest cursor in the trailers: forget everything, watch from 0.
        cache = gw.VerdictCache(FakeChannel(), lambda d, w: ended.append((d, w)), 1)
        attestd = FakeVerdicts(latest=None)
        cache.stub = attestd
        cache.entries["dev-b"] = gw.DeviceState(True, far)
        watch = asyncio.create_task(cache.watch())
        try:
            await until("the watch is back", lambda: cache.live)
            assert attestd.watches == [1, 0] and cache.entries == {}, attestd.watches
            await cache.lookup("dev-b")  # looked up afresh
            assert attestd.asked == ["dev-b"]
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    asyncio.run(go())
