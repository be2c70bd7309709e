"""Measured boot end to end: bootsim writes a log while extending swtpm; the agent
sends the log with its quote; Attest replays it, checks its events and the
policy's boot-state rules."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Device, ServerThread, rpc_code, run_cli

from attestd.agent.client import capture_policy
from attestd.core.bootstate import extract_state
from attestd.core.eventlog import parse_event_log
from attestd.v1 import attestation_pb2, common_pb2

pytestmark = pytest.mark.integration
BOOTSIM = Path(__file__).resolve().parents[2] / "tpm-sim" / "bootsim.py"
AFFIRMING = common_pb2.VERDICT_STATUS_AFFIRMING
CONTRAINDICATED = common_pb2.VERDICT_STATUS_CONTRAINDICATED


def boot(dev: Device, tmp_path: Path, tamper: str | None = None) -> bytes:
    """Power-cycle the device's TPM and boot it with bootsim; return the event log."""
    dev.tpm.powercycle()
    log = tmp_path / f"log-{tamper or 'good'}.bin"
    cmd = [
        sys.executable,
        str(BOOTSIM),
        "--tcti",
        dev.tpm.tcti,
        "--log",
        str(log),
        "--cache-dir",
        str(tmp_path.parent),
    ]
    if tamper:
        cmd += ["--tamper", tamper]
    subprocess.run(cmd, check=True, capture_output=True)
    return log.read_bytes()


def policy_for(
    dev: Device, logs: list[bytes], rules: dict[str, Any] | None = None, pcrs: str = "0-9"
) -> dict[str, Any]:
    """A policy allowing the PCR values of every given boot (so only rules can fail)."""
    lo, hi = (int(x) for x in pcrs.split("-"))
    doc = capture_policy(dev.tpm.tcti, "default", [("sha256", list(range(lo, hi + 1)))])
    doc["allow_sha1"] = False
    doc["pcrs"] = {"sha256": {i: [v] for i, v in doc["pcrs"]["sha256"].items()}}
    if rules:
        doc["eventlog"] = rules
    return doc


def attest(dev: Device, log: bytes | None) -> attestation_pb2.AttestResponse:
    return dev.agent.attest(log or b"")


def codes(resp: attestation_pb2.AttestResponse) -> list[str]:
    return sorted({f.code for f in resp.verdict.failures})


@pytest.fixture
def booted(device_factory: Callable[..., Device], tmp_path: Path) -> tuple[Device, bytes]:
    dev = device_factory(boot=False)
    return dev, boot(dev, tmp_path)


def good_rules(log: bytes) -> dict[str, Any]:
    state = extract_state(parse_event_log(log)).to_json()
    return {
        "require_secure_boot": True,
        "kernel_cmdline": {"regex": [r"/vmlinuz-\S+ root=/dev/sda1 ro( quiet)?"]},
        "boot_applications": [a["digest"] for a in state["boot_applications"]],
        "dbx_contains": [h["hash"] for h in state["dbx"]["hashes"]],
    }


def test_good_boot_with_log_and_rules_affirms(
    booted: tuple[Device, bytes], server: ServerThread
) -> None:
    dev, log = booted
    server.put_policy(policy_for(dev, [log], good_rules(log)))
    resp = attest(dev, log)
    assert resp.verdict.status == AFFIRMING, resp.verdict
    assert resp.credential
    latest = server.running.state.store.store.latest_attestation(dev.device_id)
    assert latest is not None and latest.boot_state is not None
    assert latest.boot_state["secure_boot"] is True


def test_unlogged_extend_is_a_replay_mismatch(
    booted: tuple[Device, bytes], server: ServerThread, tmp_path: Path
) -> None:
    dev, good = booted
    server.put_policy(policy_for(dev, [good]))
    log = boot(dev, tmp_path, "unlogged")
    resp = attest(dev, log)
    assert resp.verdict.status == CONTRAINDICATED
    mismatch = [f for f in resp.verdict.failures if f.code == "EVENTLOG_REPLAY_MISMATCH"]
    assert [f.subject for f in mismatch] == ["pcr[sha256:4]"]
    assert not resp.credential


@pytest.mark.parametrize(
    "tamper, code",
    [
        ("secureboot-off", "SECURE_BOOT_DISABLED"),
        ("dbx-empty", "DBX_MISSING_HASH"),
        ("cmdline", "KERNEL_CMDLINE_NOT_ALLOWED"),
        ("kernel", "BOOT_APPLICATION_NOT_ALLOWED"),
    ],
)
def test_boot_state_rules_name_the_violation(
    booted: tuple[Device, bytes], server: ServerThread, tmp_path: Path, tamper: str, code: str
) -> None:
    dev, good = booted
    rules = good_rules(good)
    bad = boot(dev, tmp_path, tamper)
    # Allow the tampered PCR values too: only the boot-state rule may object.
    doc = policy_for(dev, [bad], rules)
    server.put_policy(doc)
    resp = attest(dev, bad)
    assert resp.verdict.status == CONTRAINDICATED
    assert code in codes(resp), resp.verdict.failures
    assert all(f.code != "PCR_VALUE_NOT_ALLOWED" for f in resp.verdict.failures)
    assert not resp.credential


def test_rules_without_a_log_are_a_named_failure(
    booted: tuple[Device, bytes], server: ServerThread
) -> None:
    dev, log = booted
    server.put_policy(policy_for(dev, [log], good_rules(log)))
    resp = attest(dev, None)
    assert codes(resp) == ["EVENTLOG_MISSING"]


def test_rule_on_a_pcr_the_policy_does_not_quote_is_unexplained(
    booted: tuple[Device, bytes], server: ServerThread
) -> None:
    dev, log = booted
    server.put_policy(policy_for(dev, [log], {"require_secure_boot": True}, pcrs="0-6"))
    resp = attest(dev, log)
    failures = [(f.code, f.subject) for f in resp.verdict.failures]
    assert failures == [("EVENTLOG_PCR_UNEXPLAINED", "pcr[7]")]


def test_malformed_log_is_invalid_argument_and_keeps_the_nonce(
    booted: tuple[Device, bytes], server: ServerThread
) -> None:
    dev, log = booted
    server.put_policy(policy_for(dev, [log]))
    grant = server.attestation.GetNonce(attestation_pb2.GetNonceRequest(device_id=dev.device_id))
    from attestd.agent.tpm import DeviceTpm

    with DeviceTpm(dev.tpm.tcti) as t:
        q = t.quote([(s.bank, list(s.indices)) for s in grant.pcr_selection], grant.nonce)
    request = attestation_pb2.AttestRequest(
        device_id=dev.device_id,
        nonce=grant.nonce,
        quote=q.attest,
        signature=q.signature,
        pcrs=[common_pb2.PcrBank(bank=b, values=v) for b, v in q.pcrs.items()],
        event_log=log[:-7],
    )
    with pytest.raises(grpc.RpcError) as info:
        server.attestation.Attest(request)
    status, code = rpc_code(info.value)
    assert (status, code) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED")
    assert "event_log" in info.value.details() and "byte" in info.value.details()
    request.event_log = log
    assert server.attestation.Attest(request).verdict.status == AFFIRMING


def test_cli_replay_matches_the_tpm_and_agent_sends_the_log(
    booted: tuple[Device, bytes], server: ServerThread, tmp_path: Path
) -> None:
    dev, log = booted
    path = tmp_path / "boot.log"
    path.write_bytes(log)
    out = run_cli("eventlog", "replay", str(path), "--json", check=True)
    replayed = json.loads(out.stdout)
    assert set(replayed) == {"pcrs"}
    tpm = dev.tpm.pcrs()
    for bank in ("sha1", "sha256"):
        assert replayed["pcrs"][bank] == {str(i): d.hex() for i, d in tpm[bank].items()}
    server.put_policy(policy_for(dev, [log], good_rules(log)))
    out = run_cli(
        "--server",
        server.address,
        "--tcti",
        dev.tpm.tcti,
        "--state-dir",
        str(dev.state_dir),
        "attest",
        "--event-log",
        str(path),
        tool="attestd-agent",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    state = json.loads(run_cli("eventlog", "state", str(path), "--json", check=True).stdout)
    assert state["secure_boot"] is True and state["findings"] == []
