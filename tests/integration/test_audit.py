"""The audit log through the real API: what is recorded, what never is, and tampering.

Every state-changing call (and every refused credential) appends a record to a
hash chain; the server signs checkpoints now and then. An admin exports the
log (Admin.ExportAudit or `attestd audit export`) and anyone holding the
verification keys can check it (attestd.core.audit.verify_log, `attestd audit
verify`). Edits made behind the server's back, straight in its SQLite file,
must be named with the record they touched.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from conftest import Device, ServerThread, rpc_code, run_cli
from cryptography.hazmat.primitives.asymmetric import ec

from attestd.agent.tpm import DeviceTpm
from attestd.core.audit import (
    RECORD_DELETED,
    RECORD_EDITED,
    RECORDS_REORDERED,
    RECORDS_TRUNCATED,
    AuditRecord,
    Checkpoint,
    Finding,
    parse_export_line,
    record_to_json,
    verify_log,
)
from attestd.core.ear import b64url_decode
from attestd.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    attestation_pb2,
    common_pb2,
    enrollment_pb2,
    policy_pb2,
    policy_pb2_grpc,
)

pytestmark = pytest.mark.integration

CHECKPOINT_WAIT_S = 5.0


# -- exporting and checking ----------------------------------------------------------------------


@dataclass
class Export:
    jwks: str
    records: list[AuditRecord] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    text: str = ""  # every item as the wire carried it, for searching

    @property
    def keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        return keys_of(self.jwks)

    def verify(self) -> list[Finding]:
        return verify_log(self.records, self.checkpoints, self.keys)

    def of_kind(self, kind: str) -> list[AuditRecord]:
        return [r for r in self.records if r.kind == kind]


def keys_of(jwks: str) -> dict[str, ec.EllipticCurvePublicKey]:
    """The P-256 public keys of a JWKS, by kid."""
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for jwk in json.loads(jwks)["keys"]:
        assert (jwk["kty"], jwk["crv"]) == ("EC", "P-256")
        x = int.from_bytes(b64url_decode(jwk["x"]), "big")
        y = int.from_bytes(b64url_decode(jwk["y"]), "big")
        keys[jwk["kid"]] = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    return keys


def export(server: ServerThread, stub: admin_pb2_grpc.AdminStub | None = None) -> Export:
    items = list((stub or server.admin).ExportAudit(admin_pb2.ExportAuditRequest()))
    assert items and items[0].WhichOneof("item") == "verification_keys_jwks"
    out = Export(items[0].verification_keys_jwks)
    for item in items[1:]:
        which = item.WhichOneof("item")
        if which == "record":
            pb = item.record
            out.records.append(
                AuditRecord(
                    seq=pb.seq,
                    at_ms=pb.at_ms,
                    kind=pb.kind,
                    actor=pb.actor,
                    subject=pb.subject,
                    detail=json.loads(pb.detail_json),
                    prev_hash=pb.prev_hash,
                    hash=pb.hash,
                )
            )
        else:
            assert which == "checkpoint", which
            cp = item.checkpoint
            out.checkpoints.append(Checkpoint(cp.seq, cp.hash, cp.at_ms, cp.kid, cp.signature))
    out.text = "\n".join(
        [str(item) for item in items]
        + [json.dumps(record_to_json(r), ensure_ascii=False) for r in out.records]
    )
    return out


def wait_for_checkpoint(server: ServerThread) -> Export:
    """Poll until a checkpoint vouches for the newest record (the sweep runs each second)."""
    deadline = time.monotonic() + CHECKPOINT_WAIT_S
    while True:
        got = export(server)
        last = got.records[-1].seq if got.records else 0
        if last and any(c.seq == last for c in got.checkpoints):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no checkpoint at record {last} after {CHECKPOINT_WAIT_S} s:"
                f" {[c.seq for c in got.checkpoints]}"
            )
        time.sleep(0.2)


def rpc_error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return rpc_code(info.value)


def encodings(secret: bytes) -> set[str]:
    """The ways bytes end up in text: hex (either case) and base64 (either alphabet)."""
    forms = {secret.hex(), secret.hex().upper()}
    for enc in (base64.b64encode, base64.urlsafe_b64encode):
        text = enc(secret).decode()
        forms |= {text, text.rstrip("=")}
    return forms


# -- the scenario --------------------------------------------------------------------------------


@dataclass
class Scenario:
    server: ServerThread
    dev: Device
    secrets: dict[str, set[str]]  # what -> texts that must appear in no record
    token_id: str


def new_token(server: ServerThread, role: int, name: str) -> admin_pb2.CreateTokenResponse:
    resp: admin_pb2.CreateTokenResponse = server.admin.CreateToken(
        admin_pb2.CreateTokenRequest(role=role, name=name)
    )
    return resp


@pytest.fixture
def scenario(
    server_factory: Callable[..., ServerThread], device_factory: Callable[..., Device]
) -> Iterator[Scenario]:
    """One of each kind of state-changing call, a few refusals among them."""
    server = server_factory(audit_checkpoint_every=1, audit_checkpoint_interval_s=1)
    dev = device_factory(target=server)  # device.enroll, device.activate
    server.put_policy(dev.golden_policy())  # policy.put
    verdict = dev.agent.attest()  # attestation.verdict, ok
    assert verdict.verdict.status == common_pb2.VERDICT_STATUS_AFFIRMING
    found: dict[str, set[str]] = {"agent credential": {verdict.credential}}

    # By hand, to know the nonce: attest once, then again with the same nonce (refused).
    grant = server.attestation.GetNonce(attestation_pb2.GetNonceRequest(device_id=dev.device_id))
    found["nonce"] = encodings(grant.nonce)
    selection = [(s.bank, list(s.indices)) for s in grant.pcr_selection]
    with DeviceTpm(dev.tpm.tcti) as tpm:
        q = tpm.quote(selection, grant.nonce)
    request = attestation_pb2.AttestRequest(
        device_id=dev.device_id,
        nonce=grant.nonce,
        quote=q.attest,
        signature=q.signature,
        pcrs=[common_pb2.PcrBank(bank=b, values=v) for b, v in q.pcrs.items()],
    )
    first = server.attestation.Attest(request)
    assert first.credential
    found["hand credential"] = {first.credential}
    status, code = rpc_error(lambda: server.attestation.Attest(request))
    assert (status, code) == (grpc.StatusCode.FAILED_PRECONDITION, "NONCE_REUSED")

    server.policy.CreateGroup(policy_pb2.CreateGroupRequest(name="lab", policy_name="default"))
    server.policy.AssignDevices(
        policy_pb2.AssignDevicesRequest(group="lab", device_ids=[dev.device_id])
    )
    server.devices.RevokeDevice(
        enrollment_pb2.RevokeDeviceRequest(device_id=dev.device_id, reason="lost in transit")
    )
    server.devices.ReadmitDevice(
        enrollment_pb2.ReadmitDeviceRequest(device_id=dev.device_id, reason="found again")
    )

    made = new_token(server, admin_pb2.ROLE_GATEWAY, "audit-gateway")
    found["new token"] = {made.token, made.token.split("_", 2)[2]}
    gateway = policy_pb2_grpc.PolicyStub(server.open(None, token=made.token))
    # A gateway token may not read policy: refused (by role) and recorded.
    assert rpc_error(lambda: gateway.ListPolicies(policy_pb2.ListPoliciesRequest()))[1] == (
        "ROLE_NOT_ALLOWED"
    )
    server.admin.RevokeCredential(
        admin_pb2.RevokeCredentialRequest(id=made.credential.id, reason="rotated")
    )
    # A made-up token: refused before any role is known.
    bogus = policy_pb2_grpc.PolicyStub(
        server.open(None, token="atd_0123456789abcdef_not-a-real-secret")
    )
    status, _ = rpc_error(lambda: bogus.ListPolicies(policy_pb2.ListPoliciesRequest()))
    assert status == grpc.StatusCode.UNAUTHENTICATED
    found["harness tokens"] = set(server.tokens.values()) | {
        t.split("_", 2)[2] for t in server.tokens.values()
    }
    yield Scenario(server, dev, found, made.credential.id)


def test_every_kind_of_change_is_recorded_with_its_actor(scenario: Scenario) -> None:
    got = export(scenario.server)
    kinds = {r.kind for r in got.records}
    assert {
        "device.enroll",
        "device.activate",
        "attestation.verdict",
        "policy.put",
        "group.create",
        "group.assign",
        "device.revoke",
        "device.readmit",
        "credential.token_create",
        "credential.revoke",
        "auth.refused",
    } <= kinds
    assert [r.seq for r in got.records] == list(range(1, len(got.records) + 1))

    verdicts = got.of_kind("attestation.verdict")
    ok = [r for r in verdicts if r.detail["outcome"] == "ok"]
    assert len(ok) == 2
    for r in ok:
        assert r.detail["result"]["verdict"]["status"] == common_pb2.VERDICT_STATUS_AFFIRMING
        assert r.subject == scenario.dev.device_id
        assert r.actor.startswith("anonymous")
    assert [r.detail["outcome"] for r in verdicts if r not in ok] == ["NONCE_REUSED"]

    (put,) = got.of_kind("policy.put")
    assert "policy-author" in put.actor and "tok-" in put.actor
    assert put.subject == "default"
    for kind in ("device.enroll", "device.activate"):
        (r,) = got.of_kind(kind)
        assert r.actor.startswith("anonymous"), r.actor
        assert r.detail["outcome"] == "ok"
        assert r.subject == scenario.dev.device_id
    for kind in ("group.create", "group.assign"):
        (r,) = got.of_kind(kind)
        assert "policy-author" in r.actor
    for kind in ("device.revoke", "device.readmit", "credential.token_create"):
        (r,) = got.of_kind(kind)
        assert "admin" in r.actor and "tok-" in r.actor, r.actor
    (revoke,) = got.of_kind("device.revoke")
    assert revoke.detail["request"]["reason"] == "lost in transit"
    # Which credential was made, so later records naming it as actor can be traced back.
    (created,) = got.of_kind("credential.token_create")
    assert created.detail["result"]["credential"]["id"] == scenario.token_id
    assert "token" not in created.detail["result"]
    (cred_revoke,) = got.of_kind("credential.revoke")
    assert cred_revoke.subject == scenario.token_id

    refused = got.of_kind("auth.refused")
    codes = {r.detail["code"] for r in refused}
    assert {"ROLE_NOT_ALLOWED", "CREDENTIAL_INVALID"} <= codes, codes
    by_role = next(r for r in refused if r.detail["code"] == "ROLE_NOT_ALLOWED")
    assert scenario.token_id in by_role.actor and "gateway" in by_role.actor
    assert by_role.detail["method"] == "/attestd.v1.Policy/ListPolicies"
    unknown = next(r for r in refused if r.detail["code"] != "ROLE_NOT_ALLOWED")
    assert unknown.actor.startswith("anonymous")


def test_no_record_holds_a_secret(scenario: Scenario) -> None:
    got = export(scenario.server)
    # What is no secret is there (the search finds what it looks for).
    assert scenario.token_id in got.text
    assert scenario.dev.device_id in got.text
    assert "lost in transit" in got.text
    for what, forms in scenario.secrets.items():
        for form in forms:
            assert form and form not in got.text, f"the {what} is in the audit log"
    assert "PRIVATE KEY" not in got.text


def test_the_exported_log_and_its_checkpoints_verify(scenario: Scenario) -> None:
    got = wait_for_checkpoint(scenario.server)
    assert got.checkpoints
    assert {c.kid for c in got.checkpoints} <= set(got.keys)
    assert got.verify() == []
    assert verify_log(got.records, [], got.keys) == []
    # A checkpoint's signature is checked: with a key of no one it is refused.
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    forged = verify_log(got.records, got.checkpoints, dict.fromkeys(got.keys, other))
    assert forged and {f.code for f in forged} == {"CHECKPOINT_BAD_SIGNATURE"}


def test_only_an_admin_may_export(scenario: Scenario) -> None:
    for role in ("gateway", "policy-author"):
        stub = admin_pb2_grpc.AdminStub(scenario.server.open(role))
        status, code = rpc_error(lambda stub=stub: export(scenario.server, stub))
        assert (status, code) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED"), role
    anonymous = admin_pb2_grpc.AdminStub(scenario.server.channel)
    status, _ = rpc_error(lambda: export(scenario.server, anonymous))
    assert status == grpc.StatusCode.UNAUTHENTICATED


def test_cli_export_and_verify_of_an_intact_log(scenario: Scenario) -> None:
    server = scenario.server
    got = wait_for_checkpoint(server)
    out = run_cli(
        "audit", "export", "--since", "2000-01-01", "--server", server.address, check=True
    )
    lines = [parse_export_line(line) for line in out.stdout.splitlines() if line.strip()]
    records = [x for x in lines if isinstance(x, AuditRecord)]
    checkpoints = [x for x in lines if isinstance(x, Checkpoint)]
    assert records[: len(got.records)] == got.records
    assert checkpoints
    assert verify_log(records, checkpoints, got.keys) == []

    verified = run_cli("audit", "verify", "--server", server.address)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "intact" in verified.stdout


# -- tampering behind the server's back ----------------------------------------------------------


def make_records(server: ServerThread, n: int) -> None:
    for i in range(n):
        new_token(server, admin_pb2.ROLE_GATEWAY, f"gw-{i}")


def tamper(server: ServerThread, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Change the audit tables with a second connection while the server runs."""
    db = sqlite3.connect(server.config.store_path, timeout=10)
    try:
        with db:
            for sql, params in statements:
                db.execute(sql, params)
    finally:
        db.close()


def edit_detail(server: ServerThread, seq: int) -> None:
    db = sqlite3.connect(server.config.store_path, timeout=10)
    try:
        (text,) = db.execute("SELECT detail FROM audit_log WHERE seq = ?", (seq,)).fetchone()
    finally:
        db.close()
    detail = json.loads(text)
    detail["request"]["name"] = "someone-else"
    tamper(server, ("UPDATE audit_log SET detail = ? WHERE seq = ?", (json.dumps(detail), seq)))


TAMPERING: dict[str, tuple[Callable[[ServerThread], None], int, str]] = {
    # name: (what is done, seq named, finding code)
    "edit": (lambda s: edit_detail(s, 4), 4, RECORD_EDITED),
    "delete": (
        lambda s: tamper(s, ("DELETE FROM audit_log WHERE seq = ?", (4,))),
        4,
        RECORD_DELETED,
    ),
    "swap": (
        lambda s: tamper(
            s,
            ("UPDATE audit_log SET seq = -1 WHERE seq = 4", ()),
            ("UPDATE audit_log SET seq = 4 WHERE seq = 5", ()),
            ("UPDATE audit_log SET seq = 5 WHERE seq = -1", ()),
        ),
        4,
        RECORDS_REORDERED,
    ),
    "truncate": (
        lambda s: tamper(s, ("DELETE FROM audit_log WHERE seq >= ?", (7,))),
        7,
        RECORDS_TRUNCATED,
    ),
}


@pytest.mark.parametrize("how", sorted(TAMPERING))
def test_tampering_is_found_at_its_record(
    server_factory: Callable[..., ServerThread], how: str
) -> None:
    server = server_factory(audit_checkpoint_every=1, audit_checkpoint_interval_s=1)
    make_records(server, 8)
    before = wait_for_checkpoint(server)
    assert [r.seq for r in before.records] == list(range(1, 9))
    assert before.verify() == []

    action, seq, code = TAMPERING[how]
    action(server)
    after = export(server)
    findings = verify_log(after.records, after.checkpoints, before.keys)
    assert [(f.seq, f.code) for f in findings] == [(seq, code)], findings

    out = run_cli("audit", "verify", "--server", server.address)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"seq {seq}: {code}" in out.stdout, out.stdout
    assert "NOT intact" in out.stdout


def test_a_rewritten_chain_is_caught_by_its_checkpoint(
    server_factory: Callable[..., ServerThread],
) -> None:
    """Someone who recomputes every hash after an edit is still caught by a checkpoint."""
    from attestd.core.audit import CHECKPOINT_MISMATCH, canonical_detail, record_hash

    server = server_factory(audit_checkpoint_every=1, audit_checkpoint_interval_s=1)
    make_records(server, 5)
    before = wait_for_checkpoint(server)
    rows = []
    prev = bytes(32)
    for r in before.records:
        detail = dict(r.detail)
        if r.seq == 2:
            detail["outcome"] = "rewritten"
        text = canonical_detail(detail)
        digest = record_hash(prev, r.seq, r.at_ms, r.kind, r.actor, r.subject, text)
        rows.append(("UPDATE audit_log SET detail=?, prev_hash=?, hash=? WHERE seq=?",
                     (text, prev, digest, r.seq)))  # fmt: skip
        prev = digest
    tamper(server, *rows)
    after = export(server)
    assert verify_log(after.records, [], before.keys) == []  # the chain alone looks fine
    codes = {f.code for f in verify_log(after.records, after.checkpoints, before.keys)}
    assert CHECKPOINT_MISMATCH in codes


# -- concurrency ---------------------------------------------------------------------------------


def test_parallel_writes_make_one_unbroken_chain(server: ServerThread) -> None:
    def put(i: int) -> int:
        doc = {"name": f"p{i}", "pcrs": {"sha256": {"0": f"{i:02x}" * 32}}}
        server.put_policy(doc, note=f"parallel {i}")
        return i

    with ThreadPoolExecutor(20) as pool:
        assert sorted(pool.map(put, range(20))) == list(range(20))
    got = export(server)
    puts = got.of_kind("policy.put")
    assert sorted(r.subject for r in puts) == sorted(f"p{i}" for i in range(20))
    assert all(r.detail["outcome"] == "ok" for r in puts)
    assert [r.seq for r in got.records] == list(range(1, len(got.records) + 1))
    assert got.verify() == []
