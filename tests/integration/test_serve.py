"""`attestd serve` as an operator runs it: a real process, health, reflection, keys, signals."""

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

from attestd.service.config import load_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def start_serve(*args: str) -> tuple[subprocess.Popen[str], str]:
    exe = Path(sys.executable).parent / "attestd"
    proc = subprocess.Popen(
        [str(exe), "serve", "--listen", "127.0.0.1:0", *args],
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


def test_serve_health_reflection_and_graceful_stop(
    tmp_path: Path, manufacturer: Manufacturer
) -> None:
    data = tmp_path / "data"
    proc, address = start_serve(
        "--data-dir", str(data), "--ek-root", str(manufacturer.root_cert_path)
    )
    try:
        with grpc.insecure_channel(address) as ch:
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
    finally:
        assert stop(proc) == 0
    # Key and store are private; the data directory too.
    keys = [*(data / "keys").glob("*.pem"), data / "ca-key.pem"]
    assert len(keys) == 2
    assert all(k.stat().st_mode & 0o777 == 0o600 for k in keys)
    assert (data / "attestd.sqlite").stat().st_mode & 0o077 == 0
    assert data.stat().st_mode & 0o077 == 0


def test_signing_key_is_created_once_and_reused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, _ = start_serve("--data-dir", str(data))
    stop(proc)
    first = {k.name: k.read_bytes() for k in (data / "keys").iterdir()}
    ca = (data / "ca-cert.pem").read_bytes()
    proc, _ = start_serve("--data-dir", str(data))
    stop(proc)
    assert {k.name: k.read_bytes() for k in (data / "keys").iterdir()} == first
    assert (data / "ca-cert.pem").read_bytes() == ca


def test_world_readable_signing_key_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, _ = start_serve("--data-dir", str(data))
    stop(proc)
    (key,) = (data / "keys").glob("*.pem")
    os.chmod(key, 0o644)
    exe = Path(sys.executable).parent / "attestd"
    out = subprocess.run(
        [str(exe), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "readable by others" in out.stderr


def test_config_file_and_flags(tmp_path: Path, manufacturer: Manufacturer) -> None:
    config = tmp_path / "attestd.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "data_dir": str(tmp_path / "d"),
                "ek_roots": [str(manufacturer.root_cert_path)],
                "nonce_ttl_s": 30,
            }
        )
    )
    proc, _ = start_serve("--config", str(config), "--data-dir", str(tmp_path / "flag-wins"))
    stop(proc)
    assert (tmp_path / "flag-wins" / "keys" / "keys.json").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("nonce_ttl: 5\n")
    exe = Path(sys.executable).parent / "attestd"
    out = subprocess.run(
        [str(exe), "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2 and "unknown setting(s) nonce_ttl" in out.stderr


def test_shipped_container_config_is_valid() -> None:
    config = load_config(REPO / "docker" / "config" / "attestd.yaml", {})
    assert config.listen == "0.0.0.0:50051"
    assert config.nonce_ttl_s == 60 and config.credential_lifetime_s == 3600
