"""The whole boot-attestation journey through the real server, agent, CLI and swtpm."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Device, ServerThread, run_cli, write_yaml
from cryptography.hazmat.primitives.asymmetric import ec
from tpmsim import SimTpm

from attestd.core.ear import EAR_PROFILE, b64url_decode, verify_jwt
from attestd.v1 import common_pb2, enrollment_pb2, verdicts_pb2

pytestmark = pytest.mark.integration


def test_enroll_capture_attest_tamper(
    device_factory: Callable[..., Device], server: ServerThread, tmp_path: Path
) -> None:
    dev = device_factory()
    agent_args = [
        "--server",
        server.address,
        "--tcti",
        dev.tpm.tcti,
        "--state-dir",
        str(dev.state_dir),
    ]

    # Golden capture from the known-good boot, published through the CLI.
    policy_file = tmp_path / "golden.yaml"
    run_cli(
        *agent_args,
        "capture",
        "--name",
        "default",
        "--output",
        str(policy_file),
        tool="attestd-agent",
        check=True,
    )
    out = run_cli(
        "policy",
        "put",
        str(policy_file),
        "-m",
        "golden boot",
        "--server",
        server.address,
        check=True,
    )
    assert "default@1" in out.stdout

    # Good boot: affirming, with an EAR credential signed by the server's key.
    out = run_cli(*agent_args, "attest", "--json", tool="attestd-agent")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["verdict"]["status"] == "VERDICT_STATUS_AFFIRMING"
    token = (dev.state_dir / "credential.jwt").read_text()
    assert token == result["credential"]
    assert (dev.state_dir / "credential.jwt").stat().st_mode & 0o077 == 0
    # Verified offline, as a gateway would: with the published JWKS.
    bundle = server.verdicts.GetTrustBundle(verdicts_pb2.GetTrustBundleRequest())
    (jwk,) = json.loads(bundle.jwks)["keys"]
    x, y = (int.from_bytes(b64url_decode(jwk[c]), "big") for c in ("x", "y"))
    public = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    claims = verify_jwt(token, public)
    assert claims["eat_profile"] == EAR_PROFILE
    assert claims["sub"] == dev.device_id
    assert claims["exp"] - claims["iat"] == 3600
    sub = claims["submods"]["tpm"]
    assert sub["ear.status"] == "affirming"
    assert sub["ear.appraisal-policy-id"] == "policy:default@1"
    assert sub["ear.trustworthiness-vector"]["instance-identity"] == 2
    assert claims["jti"] and claims["eat_nonce"]

    # Tampered boot (one extra extend into PCR 4): contraindicated, no credential.
    dev.tpm.powercycle()
    dev.tpm.boot(tamper=True)
    out = run_cli(*agent_args, "attest", tool="attestd-agent")
    assert out.returncode == 1
    assert "CONTRAINDICATED" in out.stdout
    assert "PCR_VALUE_NOT_ALLOWED pcr[sha256:4]" in out.stdout
    assert "no credential issued" in out.stdout

    # The latest verdict stays queryable, through the API and the CLI.
    info = server.devices.GetDevice(enrollment_pb2.GetDeviceRequest(device_id=dev.device_id))
    assert info.latest_verdict.status == common_pb2.VERDICT_STATUS_CONTRAINDICATED
    assert [f.subject for f in info.latest_verdict.failures] == ["pcr[sha256:4]"]
    out = run_cli("device", "show", dev.device_id, "--server", server.address, check=True)
    assert "CONTRAINDICATED" in out.stdout

    # A good reboot attests again (resetCount moved forward, which is fine).
    dev.tpm.powercycle()
    dev.tpm.boot()
    assert dev.agent.attest().verdict.status == common_pb2.VERDICT_STATUS_AFFIRMING


def test_every_attestation_is_recorded(device: Device, server: ServerThread) -> None:
    for _ in range(3):
        assert device.agent.attest().credential
    store = server.running.state.store.store
    rows = list(
        store.db.execute(  # type: ignore[attr-defined]
            "SELECT status, policy_name, policy_version, clock FROM attestations"
            " WHERE device_id = ?",
            (device.device_id,),
        )
    )
    assert len(rows) == 3
    assert all(r[0] == "affirming" and r[1] == "default" and r[2] == 1 for r in rows)
    clocks = [json.loads(r[3])["clock"] for r in rows]
    assert clocks == sorted(clocks)


def test_same_tpm_reenrolls_to_the_same_device_id_and_new_ak_replaces_old(
    device: Device, server: ServerThread
) -> None:
    first_id = device.device_id
    before = server.devices.GetDevice(enrollment_pb2.GetDeviceRequest(device_id=first_id))
    done = device.agent.enroll(new_ak=True)
    assert done.device_id == first_id
    assert done.ak_name != before.ak_name
    # The new AK is the one that counts from now on.
    assert device.agent.attest().verdict.status == common_pb2.VERDICT_STATUS_AFFIRMING


def test_ecc_ak_enrolls_and_attests(
    device_factory: Callable[..., Device], server: ServerThread
) -> None:
    dev = device_factory(ak_alg="ecc")
    server.put_policy(dev.golden_policy())
    assert dev.agent.attest().verdict.status == common_pb2.VERDICT_STATUS_AFFIRMING


def test_policy_cli_put_get_list_and_refusal(server: ServerThread, tmp_path: Path) -> None:
    good = write_yaml(tmp_path / "p.yaml", {"name": "lab", "pcrs": {"sha256": {0: "00" * 32}}})
    assert (
        run_cli("policy", "put", str(good), "-m", "first", "--server", server.address).returncode
        == 0
    )
    out = run_cli("policy", "get", "lab", "--server", server.address, "--json", check=True)
    assert json.loads(out.stdout)["pcrs"] == {"sha256": {"0": ["00" * 32]}}
    out = run_cli("policy", "list", "--server", server.address, check=True)
    assert out.stdout.startswith("lab@1")
    bad = write_yaml(tmp_path / "bad.yaml", {"name": "lab", "pcrs": {"sha256": {0: "00" * 20}}})
    out = run_cli("policy", "put", str(bad), "-m", "bad", "--server", server.address)
    assert out.returncode == 1
    assert "POLICY_INVALID" in out.stderr and "pcrs.sha256.0" in out.stderr
    # Nothing was half-written: still version 1.
    out = run_cli("policy", "get", "lab@1", "--server", server.address, "--json", check=True)
    assert run_cli("policy", "get", "lab@2", "--server", server.address).returncode == 1


def test_high_range_ecc_ek_enrolls_through_the_cli(
    tpm_factory: Callable[..., SimTpm], server: ServerThread, tmp_path: Path
) -> None:
    tpm = tpm_factory()
    out = run_cli(
        "--server",
        server.address,
        "--tcti",
        tpm.tcti,
        "--state-dir",
        str(tmp_path / "a"),
        "--ek-type",
        "ecc",
        "enroll",
        "--json",
        tool="attestd-agent",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["device_id"].startswith("dev-")
