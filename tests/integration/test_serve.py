"""`attestd serve` as an operator runs it: a real process, TLS, tokens, health, keys, signals.

Every server here serves TLS with a trial CA (attestd.tlsinit, what `attestd admin
tls-init` writes) and its mTLS port on a free port; callers with a role carry a
token made by `attestd admin token create --data-dir` on the server's data directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tpmsim import Manufacturer

from attestd.connect import Connection, open_channel
from attestd.service.config import load_config
from attestd.tlsinit import TlsFiles, init_tls
from attestd.v1 import policy_pb2, policy_pb2_grpc

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
EXE = Path(sys.executable).parent / "attestd"


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    """A throwaway CA and server certificate, as `attestd admin tls-init` makes them."""
    return init_tls(tmp_path / "tls", ["127.0.0.1", "localhost"])


def tls_args(tls: TlsFiles) -> list[str]:
    """TLS on the main port, and the mTLS port on a free port (never the default)."""
    return [
        "--tls-cert",
        str(tls.server_cert),
        "--tls-key",
        str(tls.server_key),
        "--mtls-listen",
        "127.0.0.1:0",
    ]


def start_serve(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [str(EXE), "serve", "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("attestd serving on "), (line, proc.stderr.read() if proc.poll() else "")
    return proc, line.split()[-1]


def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=20)


def make_token(data_dir: Path, role: str, out: Path) -> str:
    """`attestd admin token create` in local mode, on the server's data directory."""
    done = subprocess.run(
        [
            str(EXE),
            "admin",
            "token",
            "create",
            "--role",
            role,
            "--name",
            f"serve-test-{role}",
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("ATTESTD_")},
    )
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o077 == 0
    token = out.read_text().strip()
    assert token
    return token


def test_serve_health_reflection_and_graceful_stop(
    tmp_path: Path, manufacturer: Manufacturer, tls: TlsFiles
) -> None:
    data = tmp_path / "data"
    proc, address = start_serve(
        "--data-dir", str(data), "--ek-root", str(manufacturer.root_cert_path), *tls_args(tls)
    )
    try:
        # Health and reflection need no credential, but TLS like everything else.
        with open_channel(Connection(address, ca_cert=tls.ca_cert)) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in (
                "",
                "attestd.v1.Attestation",
                "attestd.v1.Enrollment",
                "attestd.v1.Policy",
            ):
                resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            answers = refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = {s.name for a in answers for s in a.list_services_response.service}
            assert {
                "attestd.v1.Enrollment",
                "attestd.v1.Attestation",
                "attestd.v1.Policy",
                "attestd.v1.Devices",
                "grpc.health.v1.Health",
            } <= names
        # Plaintext to a TLS port does not get an answer.
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert stop(proc) == 0
    # Key and store are private; the data directory too.
    keys = [*(data / "keys").glob("*.pem"), data / "ca-key.pem"]
    assert len(keys) == 2
    assert all(k.stat().st_mode & 0o777 == 0o600 for k in keys)
    assert (data / "attestd.sqlite").stat().st_mode & 0o077 == 0
    assert data.stat().st_mode & 0o077 == 0


def test_tokens_made_on_the_data_dir_before_and_while_serving(
    tmp_path: Path, tls: TlsFiles
) -> None:
    data = tmp_path / "data"
    # Before the first start, in the (private) directory the server will use.
    data.mkdir(mode=0o700)
    author = make_token(data, "policy-author", tmp_path / "author.token")
    proc, address = start_serve("--data-dir", str(data), *tls_args(tls))
    try:
        # While it runs: the server sees the new token at once (same store).
        gateway = make_token(data, "gateway", tmp_path / "gateway.token")

        def list_policies(token: str) -> policy_pb2.ListPoliciesResponse:
            with open_channel(Connection(address, ca_cert=tls.ca_cert, token=token)) as ch:
                stub = policy_pb2_grpc.PolicyStub(ch)
                answer: policy_pb2.ListPoliciesResponse = stub.ListPolicies(
                    policy_pb2.ListPoliciesRequest(), timeout=5
                )
                return answer

        list_policies(author)
        for token, code in (
            ("", grpc.StatusCode.UNAUTHENTICATED),
            ("atd_" + "0" * 16 + "_not-a-secret", grpc.StatusCode.UNAUTHENTICATED),
            (gateway, grpc.StatusCode.PERMISSION_DENIED),  # a gateway may not read policy
        ):
            with pytest.raises(grpc.RpcError) as refused:
                list_policies(token)
            assert refused.value.code() == code, token
    finally:
        assert stop(proc) == 0


def test_without_tls_settings_serve_refuses_to_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = subprocess.run(
        [str(EXE), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2, out.stderr
    assert "tls_cert" in out.stderr and "--insecure" in out.stderr
    assert not data.exists()  # refused before touching anything


def test_insecure_serves_plaintext_and_warns_on_every_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for _ in range(2):
        proc, address = start_serve("--data-dir", str(data), "--insecure")
        try:
            with grpc.insecure_channel(address) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            assert stop(proc) == 0
        assert proc.stderr is not None
        assert "INSECURE" in proc.stderr.read()


def test_signing_key_is_created_once_and_reused(tmp_path: Path, tls: TlsFiles) -> None:
    data = tmp_path / "data"
    proc, _ = start_serve("--data-dir", str(data), *tls_args(tls))
    stop(proc)
    first = {k.name: k.read_bytes() for k in (data / "keys").iterdir()}
    ca = (data / "ca-cert.pem").read_bytes()
    proc, _ = start_serve("--data-dir", str(data), *tls_args(tls))
    stop(proc)
    assert {k.name: k.read_bytes() for k in (data / "keys").iterdir()} == first
    assert (data / "ca-cert.pem").read_bytes() == ca


def test_world_readable_signing_key_is_refused(tmp_path: Path, tls: TlsFiles) -> None:
    data = tmp_path / "data"
    proc, _ = start_serve("--data-dir", str(data), *tls_args(tls))
    stop(proc)
    (key,) = (data / "keys").glob("*.pem")
    os.chmod(key, 0o644)
    out = subprocess.run(
        [str(EXE), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data), *tls_args(tls)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "readable by others" in out.stderr


def test_config_file_and_flags(tmp_path: Path, manufacturer: Manufacturer, tls: TlsFiles) -> None:
    config = tmp_path / "attestd.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "mtls_listen": "127.0.0.1:0",
                "data_dir": str(tmp_path / "d"),
                "ek_roots": [str(manufacturer.root_cert_path)],
                "nonce_ttl_s": 30,
                "tls_cert": str(tls.server_cert),
                "tls_key": str(tls.server_key),
            }
        )
    )
    proc, address = start_serve("--config", str(config), "--data-dir", str(tmp_path / "flag-wins"))
    try:
        with open_channel(Connection(address, ca_cert=tls.ca_cert)) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop(proc)
    assert (tmp_path / "flag-wins" / "keys" / "keys.json").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("nonce_ttl: 5\n")
    out = subprocess.run(
        [str(EXE), "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2 and "unknown setting(s) nonce_ttl" in out.stderr


def test_shipped_container_config_is_valid() -> None:
    config = load_config(REPO / "docker" / "config" / "attestd.yaml", {})
    assert config.listen == "0.0.0.0:50051"
    assert config.nonce_ttl_s == 60 and config.credential_lifetime_s == 3600
    assert config.tls_cert is not None and not config.insecure  # TLS in the container too
