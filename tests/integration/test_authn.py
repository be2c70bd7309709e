"""Authentication edge cases: each refusal is checked by status AND attestd-code.

API tokens (malformed, unknown, wrong secret, revoked, expired), role client
certificates on the mTLS port (revoked, from another CA, on the wrong port), the
device's own credential as a bearer token, TLS-by-default and the insecure
escape hatch, how tokens are stored, and the Admin RPCs that manage credentials.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import Device, ServerThread, rpc_code
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from attestd.connect import Connection, open_channel
from attestd.service.config import ConfigError, ServerConfig, load_config
from attestd.service.server import create_server
from attestd.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    enrollment_pb2,
    keys_pb2,
    keys_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    verdicts_pb2,
    verdicts_pb2_grpc,
)

pytestmark = pytest.mark.integration

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
TIMEOUT_S = 15.0


# -- helpers ---------------------------------------------------------------------


def refusal(call: Callable[[], object]) -> grpc.RpcError:
    """The error ``call`` fails with (it must fail)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def list_policies(channel: grpc.Channel, **kw: object) -> object:
    stub = policy_pb2_grpc.PolicyStub(channel)
    return stub.ListPolicies(policy_pb2.ListPoliciesRequest(), timeout=TIMEOUT_S, **kw)


def list_keys(channel: grpc.Channel, **kw: object) -> object:
    stub = keys_pb2_grpc.KeysStub(channel)
    return stub.ListSigningKeys(keys_pb2.ListSigningKeysRequest(), timeout=TIMEOUT_S, **kw)


def trust_bundle(channel: grpc.Channel, **kw: object) -> object:
    stub = verdicts_pb2_grpc.VerdictsStub(channel)
    return stub.GetTrustBundle(verdicts_pb2.GetTrustBundleRequest(), timeout=TIMEOUT_S, **kw)


def get_verdict(channel: grpc.Channel, device_id: str) -> object:
    stub = verdicts_pb2_grpc.VerdictsStub(channel)
    return stub.GetVerdict(verdicts_pb2.GetVerdictRequest(device_id=device_id), timeout=TIMEOUT_S)


def create_token(
    server: ServerThread, role: int, name: str, lifetime_s: int = 0
) -> admin_pb2.CreateTokenResponse:
    response: admin_pb2.CreateTokenResponse = server.admin.CreateToken(
        admin_pb2.CreateTokenRequest(role=role, name=name, lifetime_s=lifetime_s),
        timeout=TIMEOUT_S,
    )
    return response


def secret_of(token: str) -> str:
    """The secret part of ``atd_<id>_<secret>``."""
    assert token.startswith("atd_"), token
    ident, sep, secret = token[len("atd_") :].partition("_")
    assert sep and len(ident) == 16 and secret, token
    return secret


def ec_key_files(where: Path, stem: str) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = where / f"{stem}.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return key, path


def issue_certificate(
    server: ServerThread, role: int, name: str, where: Path
) -> tuple[admin_pb2.IssueClientCertificateResponse, Path, Path]:
    """A role client certificate through Admin.IssueClientCertificate; (response, cert, key)."""
    key, key_path = ec_key_files(where, name)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    response: admin_pb2.IssueClientCertificateResponse = server.admin.IssueClientCertificate(
        admin_pb2.IssueClientCertificateRequest(role=role, name=name, public_key=public),
        timeout=TIMEOUT_S,
    )
    cert_path = where / f"{name}.crt"
    cert_path.write_text(response.certificate_pem)
    return response, cert_path, key_path


def mtls_channel(
    server: ServerThread, cert: Path | None, key: Path | None, token: str = ""
) -> grpc.Channel:
    return open_channel(
        Connection(
            server.mtls_address,
            ca_cert=server.ca_cert,
            token=token,
            client_cert=cert,
            client_key=key,
        )
    )


def foreign_certificate(where: Path) -> tuple[Path, Path]:
    """A client certificate (and key) from a CA attestd has never heard of."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attestd client CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key, key_path = ec_key_files(where, "foreign")
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path = where / "foreign.crt"
    cert_path.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    )
    return cert_path, key_path


def attested_credential(device: Device) -> str:
    response = device.agent.attest()
    assert response.credential, response
    return response.credential


# -- API tokens ------------------------------------------------------------------


def test_no_credential_on_a_role_rpc(server: ServerThread) -> None:
    error = refusal(lambda: list_policies(server.open(None)))
    assert rpc_code(error) == (UNAUTH, "CREDENTIAL_REQUIRED")


@pytest.mark.parametrize(
    "header",
    [
        "Basic x",
        "Bearer",
        "Bearer ",
        "bearer",
        "garbage",
        "Bearer garbage",
        "Bearer atd_",
        "Bearer atd_short_secret",
        "Bearer atd_0123456789abcdef",
        "Bearer atd_0123456789abcdef_",
        "Bearer not.a.jwt",
        "Bearer " + "x" * 4000,
    ],
    ids=lambda h: h[:30],
)
def test_malformed_bearer_header(server: ServerThread, header: str) -> None:
    channel = server.open(None)
    error = refusal(lambda: list_policies(channel, metadata=(("authorization", header),)))
    assert rpc_code(error) == (UNAUTH, "CREDENTIAL_INVALID")
    presented = header.partition(" ")[2]
    if len(presented) >= 8:
        assert presented not in (error.details() or "")


def test_two_authorization_headers_are_ambiguous(server: ServerThread) -> None:
    token = server.tokens["admin"]
    headers = (("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}"))
    error = refusal(lambda: list_keys(server.open(None), metadata=headers))
    assert rpc_code(error) == (UNAUTH, "CREDENTIAL_AMBIGUOUS")


def test_unknown_token_id(server: ServerThread) -> None:
    real = server.tokens["admin"]
    forged = f"atd_{'0' * 16}_{secret_of(real)}"
    error = refusal(lambda: list_keys(server.open(None, token=forged)))
    assert rpc_code(error) == (UNAUTH, "CREDENTIAL_INVALID")
    assert secret_of(real) not in (error.details() or "")


def test_right_id_wrong_secret(server: ServerThread) -> None:
    real = server.tokens["admin"]
    secret = secret_of(real)
    wrong = real[: -len(secret)] + ("A" if secret[0] != "A" else "B") + secret[1:]
    assert wrong != real
    error = refusal(lambda: list_keys(server.open(None, token=wrong)))
    assert rpc_code(error) == (UNAUTH, "CREDENTIAL_INVALID")
    details = error.details() or ""
    assert wrong not in details and secret not in details and secret[1:] not in details


def test_revoked_token_is_refused_at_once_on_every_channel(server: ServerThread) -> None:
    made = create_token(server, admin_pb2.ROLE_ADMIN, "to-revoke")
    token = made.token
    first = server.open(None, token=token)
    second = open_channel(server.connection(token))
    try:
        list_keys(first)
        list_keys(second)  # both channels are open and working
        revoked = server.admin.RevokeCredential(
            admin_pb2.RevokeCredentialRequest(id=made.credential.id, reason="test"),
            timeout=TIMEOUT_S,
        )
        assert revoked.revoked_at_ms > 0
        for channel in (first, second):
            error = refusal(lambda channel=channel: list_keys(channel))
            assert rpc_code(error) == (UNAUTH, "CREDENTIAL_REVOKED")
            assert secret_of(token) not in (error.details() or "")
        # Also on an open RPC: a presented credential that does not check out is refused.
        error = refusal(lambda: trust_bundle(first))
        assert rpc_code(error) == (UNAUTH, "CREDENTIAL_REVOKED")
    finally:
        second.close()
    # Revoking again leaves it revoked (and is not an error).
    again = server.admin.RevokeCredential(
        admin_pb2.RevokeCredentialRequest(id=made.credential.id), timeout=TIMEOUT_S
    )
    assert again.revoked_at_ms == revoked.revoked_at_ms


def test_expired_token(server: ServerThread) -> None:
    made = create_token(server, admin_pb2.ROLE_GATEWAY, "short-lived", lifetime_s=1)
    assert made.credential.expires_at_ms > made.credential.created_at_ms
    channel = server.open(None, token=made.token)
    trust_bundle(channel)
    checked = verdicts_pb2_grpc.VerdictsStub(channel).VerifyCredential(
        verdicts_pb2.VerifyCredentialRequest(token="a.b.c"), timeout=TIMEOUT_S
    )
    assert checked.state  # allowed while the token lives
    server.advance(5)
    error = refusal(lambda: get_verdict(channel, "some-device"))
    assert rpc_code(error) == (UNAUTH, "CREDENTIAL_EXPIRED")
    assert secret_of(made.token) not in (error.details() or "")


def test_presented_bad_token_on_an_open_rpc_is_refused(server: ServerThread) -> None:
    trust_bundle(server.open(None))  # no credential: fine
    bad = f"atd_{'f' * 16}_not-the-secret"
    error = refusal(lambda: trust_bundle(server.open(None, token=bad)))
    assert rpc_code(error) == (UNAUTH, "CREDENTIAL_INVALID")
    assert "not-the-secret" not in (error.details() or "")
    error = refusal(
        lambda: trust_bundle(server.open(None), metadata=(("authorization", "Basic x"),))
    )
    assert rpc_code(error) == (UNAUTH, "CREDENTIAL_INVALID")


def test_refusals_are_audited(server: ServerThread) -> None:
    refusal(lambda: list_keys(server.open(None)))
    refusal(lambda: list_keys(server.open("gateway")))
    stream = server.admin.ExportAudit(admin_pb2.ExportAuditRequest(), timeout=TIMEOUT_S)
    refused = [
        item.record.detail_json
        for item in stream
        if item.WhichOneof("item") == "record" and item.record.kind == "auth.refused"
    ]
    assert any("CREDENTIAL_REQUIRED" in d and "ListSigningKeys" in d for d in refused), refused
    assert any("ROLE_NOT_ALLOWED" in d and "ListSigningKeys" in d for d in refused), refused
    # No token secret ends up in the audit log, nor the token CreateToken answered with.
    made = create_token(server, admin_pb2.ROLE_GATEWAY, "audited")
    refusal(lambda: list_keys(server.open(None, token=made.token[:-1] + "!")))
    records = [
        item.record
        for item in server.admin.ExportAudit(admin_pb2.ExportAuditRequest(), timeout=TIMEOUT_S)
        if item.WhichOneof("item") == "record"
    ]
    created = [r for r in records if r.kind == "credential.token_create"]
    assert created and created[-1].subject == "audited", created
    assert "tok-" in created[-1].actor  # the admin token that made it
    for token in (*server.tokens.values(), made.token):
        for r in records:
            assert secret_of(token)[:-1] not in f"{r.actor} {r.subject} {r.detail_json}"


# -- open streams re-check their credential --------------------------------------

STREAM_DEADLINE_S = 10.0


class OpenWatch:
    """A WatchVerdicts stream with ``token``, read on a thread: its events and how it ended."""

    def __init__(self, server: ServerThread, token: str) -> None:
        stub = verdicts_pb2_grpc.VerdictsStub(server.open(None, token=token))
        self.started = time.monotonic()
        self.call = stub.WatchVerdicts(
            verdicts_pb2.WatchVerdictsRequest(), timeout=STREAM_DEADLINE_S
        )
        self.events: queue.Queue[verdicts_pb2.VerdictEvent] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.ended_at = 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.ended_at = time.monotonic()
            self.done.set()

    def next_event(self, timeout_s: float = 5.0) -> verdicts_pb2.VerdictEvent:
        return self.events.get(timeout=timeout_s)

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(5)


@pytest.fixture
def open_watch(server: ServerThread) -> Iterator[Callable[[str], OpenWatch]]:
    watches: list[OpenWatch] = []

    def make(token: str) -> OpenWatch:
        watches.append(OpenWatch(server, token))
        return watches[-1]

    yield make
    for w in watches:
        w.close()


def test_revoking_a_token_ends_its_open_stream(
    server: ServerThread, device: Device, open_watch: Callable[[str], OpenWatch]
) -> None:
    device.agent.attest()  # an event for the stream to replay: it shows the stream is open
    made = create_token(server, admin_pb2.ROLE_GATEWAY, "watching-gateway")
    watch = open_watch(made.token)
    assert watch.next_event().device_id == device.device_id
    assert not watch.done.is_set()

    server.admin.RevokeCredential(
        admin_pb2.RevokeCredentialRequest(id=made.credential.id, reason="test"),
        timeout=TIMEOUT_S,
    )
    revoked_at = time.monotonic()
    assert watch.done.wait(STREAM_DEADLINE_S), "the stream did not end"
    assert watch.error is not None
    assert rpc_code(watch.error) == (UNAUTH, "CREDENTIAL_REVOKED")
    assert secret_of(made.token) not in (watch.error.details() or "")
    # Ended by the re-check (every 2 s), well before the call's own deadline.
    assert watch.ended_at - revoked_at < 5.0
    assert watch.ended_at - watch.started < STREAM_DEADLINE_S - 2
    # The refusal is in the audit log.
    refused = [
        item.record.detail_json
        for item in server.admin.ExportAudit(admin_pb2.ExportAuditRequest(), timeout=TIMEOUT_S)
        if item.WhichOneof("item") == "record" and item.record.kind == "auth.refused"
    ]
    assert any("WatchVerdicts" in d and "CREDENTIAL_REVOKED" in d for d in refused), refused


def test_an_expiring_token_ends_its_open_stream(
    server: ServerThread, device: Device, open_watch: Callable[[str], OpenWatch]
) -> None:
    device.agent.attest()
    made = create_token(server, admin_pb2.ROLE_GATEWAY, "expiring-gateway", lifetime_s=60)
    watch = open_watch(made.token)
    assert watch.next_event().device_id == device.device_id
    server.advance(120)  # past the token's expiry, by the server's clock
    expired_at = time.monotonic()
    assert watch.done.wait(STREAM_DEADLINE_S), "the stream did not end"
    assert watch.error is not None
    assert rpc_code(watch.error) == (UNAUTH, "CREDENTIAL_EXPIRED")
    assert watch.ended_at - expired_at < 5.0


def test_a_stream_with_a_valid_token_outlives_its_rechecks(
    server: ServerThread, device: Device, open_watch: Callable[[str], OpenWatch]
) -> None:
    device.agent.attest()
    made = create_token(server, admin_pb2.ROLE_GATEWAY, "steady-gateway")
    watch = open_watch(made.token)
    first = watch.next_event()
    # Past two re-checks (every 2 s) the stream is still open...
    assert not watch.done.wait(5.0), watch.error
    # ...and still delivers: an attestation made now reaches it.
    device.agent.attest()
    later = watch.next_event()
    assert later.device_id == device.device_id
    assert later.cursor > first.cursor
    assert not watch.done.is_set(), watch.error


# -- client certificates ---------------------------------------------------------


def test_client_certificate_works_on_the_mtls_port(server: ServerThread, tmp_path: Path) -> None:
    _, cert, key = issue_certificate(server, admin_pb2.ROLE_GATEWAY, "gw-cert", tmp_path)
    channel = mtls_channel(server, cert, key)
    try:
        trust_bundle(channel)
        error = refusal(lambda: list_keys(channel))
        assert rpc_code(error) == (DENIED, "ROLE_NOT_ALLOWED")
        assert "gateway" in (error.details() or "")
    finally:
        channel.close()


def test_token_and_client_certificate_together_are_ambiguous(
    server: ServerThread, tmp_path: Path
) -> None:
    _, cert, key = issue_certificate(server, admin_pb2.ROLE_ADMIN, "admin-cert", tmp_path)
    channel = mtls_channel(server, cert, key, token=server.tokens["admin"])
    try:
        error = refusal(lambda: list_keys(channel))
        assert rpc_code(error) == (UNAUTH, "CREDENTIAL_AMBIGUOUS")
        error = refusal(lambda: trust_bundle(channel))
        assert rpc_code(error) == (UNAUTH, "CREDENTIAL_AMBIGUOUS")
    finally:
        channel.close()


def test_revoked_client_certificate(server: ServerThread, tmp_path: Path) -> None:
    issued, cert, key = issue_certificate(server, admin_pb2.ROLE_ADMIN, "revoke-me", tmp_path)
    channel = mtls_channel(server, cert, key)
    try:
        list_keys(channel)
        server.admin.RevokeCredential(
            admin_pb2.RevokeCredentialRequest(id=issued.credential.id, reason="test"),
            timeout=TIMEOUT_S,
        )
        error = refusal(lambda: list_keys(channel))
        assert rpc_code(error) == (UNAUTH, "CREDENTIAL_REVOKED")
    finally:
        channel.close()
    # A new connection with the revoked certificate fares no better.
    fresh = mtls_channel(server, cert, key)
    try:
        error = refusal(lambda: list_keys(fresh))
        assert rpc_code(error) == (UNAUTH, "CREDENTIAL_REVOKED")
    finally:
        fresh.close()


def test_expired_client_certificate(server: ServerThread, tmp_path: Path) -> None:
    key, key_path = ec_key_files(tmp_path, "short")
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    issued = server.admin.IssueClientCertificate(
        admin_pb2.IssueClientCertificateRequest(
            role=admin_pb2.ROLE_ADMIN, name="short", public_key=public, lifetime_s=600
        ),
        timeout=TIMEOUT_S,
    )
    cert_path = tmp_path / "short.crt"
    cert_path.write_text(issued.certificate_pem)
    channel = mtls_channel(server, cert_path, key_path)
    try:
        list_keys(channel)
        # Past its expiry by attestd's clock (the handshake, on the real clock, still passes).
        server.advance(900)
        error = refusal(lambda: list_keys(channel))
        assert rpc_code(error) == (UNAUTH, "CREDENTIAL_EXPIRED")
    finally:
        channel.close()


def test_client_certificate_from_another_ca_fails_the_handshake(
    server: ServerThread, tmp_path: Path
) -> None:
    cert, key = foreign_certificate(tmp_path)
    channel = mtls_channel(server, cert, key)
    try:
        error = refusal(lambda: trust_bundle(channel))
        assert error.code() is grpc.StatusCode.UNAVAILABLE, error
    finally:
        channel.close()


def test_mtls_port_requires_a_client_certificate(server: ServerThread) -> None:
    channel = mtls_channel(server, None, None, token=server.tokens["admin"])
    try:
        error = refusal(lambda: list_keys(channel))
        assert error.code() is grpc.StatusCode.UNAVAILABLE, error
    finally:
        channel.close()


def test_main_port_does_not_take_client_certificates(server: ServerThread, tmp_path: Path) -> None:
    """A certificate presented to the main port is not requested: no role from it."""
    _, cert, key = issue_certificate(server, admin_pb2.ROLE_ADMIN, "main-port", tmp_path)
    channel = open_channel(
        Connection(server.address, ca_cert=server.ca_cert, client_cert=cert, client_key=key)
    )
    try:
        trust_bundle(channel)  # the handshake itself succeeds
        error = refusal(lambda: list_keys(channel))
        assert rpc_code(error) == (UNAUTH, "CREDENTIAL_REQUIRED")
    finally:
        channel.close()
    # With a token as well, the token alone counts (not CREDENTIAL_AMBIGUOUS).
    channel = open_channel(
        Connection(
            server.address,
            ca_cert=server.ca_cert,
            token=server.tokens["admin"],
            client_cert=cert,
            client_key=key,
        )
    )
    try:
        list_keys(channel)
    finally:
        channel.close()


# -- TLS by default --------------------------------------------------------------


def test_plaintext_client_to_the_tls_port_fails(server: ServerThread) -> None:
    channel = grpc.insecure_channel(server.address)
    try:
        error = refusal(lambda: trust_bundle(channel))
        assert error.code() is grpc.StatusCode.UNAVAILABLE, error
    finally:
        channel.close()


def test_tls_client_needs_the_right_ca(server: ServerThread, tmp_path: Path) -> None:
    """A client that does not trust the server's CA does not talk to it."""
    other_ca, _ = foreign_certificate(tmp_path)
    channel = open_channel(Connection(server.address, ca_cert=other_ca))
    try:
        error = refusal(lambda: trust_bundle(channel))
        assert error.code() is grpc.StatusCode.UNAVAILABLE, error
    finally:
        channel.close()


def test_load_config_requires_tls_cert(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_cert"):
        load_config(None, {"data_dir": str(tmp_path / "data")})
    config = load_config(None, {"data_dir": str(tmp_path / "data"), "insecure": True})
    assert config.insecure and config.tls_cert is None


def test_create_server_requires_tls_cert(tmp_path: Path) -> None:
    config = ServerConfig(listen="127.0.0.1:0", mtls_listen="", data_dir=tmp_path / "data")
    with pytest.raises(ConfigError, match="tls_cert"):
        asyncio.run(create_server(config, sweep=False))


def test_insecure_server_warns_on_start(
    server_factory: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="attestd"):
        server = server_factory(insecure=True, tls_cert=None, tls_key=None, mtls_listen="")
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.name.startswith("attestd")
        and "INSECURE" in r.getMessage()
    ]
    assert warnings, [r.getMessage() for r in caplog.records]
    # It serves plaintext, and still authenticates.
    assert server.running.mtls_port == 0
    error = refusal(lambda: list_keys(server.open(None)))
    assert rpc_code(error) == (UNAUTH, "CREDENTIAL_REQUIRED")
    list_keys(server.open("admin"))


# -- the device credential as a bearer token -------------------------------------


def test_device_credential_may_not_write_policy(server: ServerThread, device: Device) -> None:
    credential = attested_credential(device)
    channel = server.open(None, token=credential)
    get_verdict(channel, device.device_id)  # its own verdict: fine
    stub = policy_pb2_grpc.PolicyStub(channel)
    error = refusal(
        lambda: stub.PutPolicy(
            policy_pb2.PutPolicyRequest(document='{"name": "x", "pcrs": {}}'), timeout=TIMEOUT_S
        )
    )
    assert rpc_code(error) == (DENIED, "ROLE_NOT_ALLOWED")
    error = refusal(lambda: get_verdict(channel, "another-device"))
    assert rpc_code(error) == (DENIED, "NOT_YOUR_DEVICE")


def test_expired_device_credential(server: ServerThread, device: Device) -> None:
    credential = attested_credential(device)
    channel = server.open(None, token=credential)
    get_verdict(channel, device.device_id)
    server.advance(server.config.credential_lifetime_s + 120)
    error = refusal(lambda: get_verdict(channel, device.device_id))
    assert rpc_code(error) == (UNAUTH, "CREDENTIAL_INVALID")
    assert credential not in (error.details() or "")


def test_revoked_device_credential(server: ServerThread, device: Device) -> None:
    credential = attested_credential(device)
    channel = server.open(None, token=credential)
    get_verdict(channel, device.device_id)
    server.devices.RevokeDevice(
        enrollment_pb2.RevokeDeviceRequest(device_id=device.device_id, reason="test"),
        timeout=TIMEOUT_S,
    )
    error = refusal(lambda: get_verdict(channel, device.device_id))
    assert rpc_code(error) == (UNAUTH, "CREDENTIAL_INVALID")
    # Also on an open RPC.
    error = refusal(lambda: trust_bundle(channel))
    assert rpc_code(error) == (UNAUTH, "CREDENTIAL_INVALID")


def test_forged_device_credential(server: ServerThread, device: Device) -> None:
    credential = attested_credential(device)
    head, body, signature = credential.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    channel = server.open(None, token=f"{head}.{body}.{flipped}")
    error = refusal(lambda: get_verdict(channel, device.device_id))
    assert rpc_code(error) == (UNAUTH, "CREDENTIAL_INVALID")


# -- storage ---------------------------------------------------------------------


def test_tokens_are_stored_hashed(server: ServerThread) -> None:
    made = create_token(server, admin_pb2.ROLE_POLICY_AUTHOR, "hashed")
    tokens = [*server.tokens.values(), made.token]
    secrets = [secret_of(t) for t in tokens]
    db = sqlite3.connect(f"file:{server.config.store_path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT * FROM caller_credentials").fetchall()
    finally:
        db.close()
    assert len(rows) >= len(tokens)
    for row in rows:
        for value in row:
            blob = value if isinstance(value, bytes) else str(value).encode()
            for secret in secrets:
                assert secret.encode() not in blob, "a token's secret is stored in clear"


# -- Admin RPCs that manage credentials -----------------------------------------


@pytest.mark.parametrize("role", [admin_pb2.ROLE_UNSPECIFIED, admin_pb2.ROLE_DEVICE, 99])
def test_create_token_refuses_ungrantable_roles(server: ServerThread, role: int) -> None:
    error = refusal(lambda: create_token(server, role, "some-name"))
    assert rpc_code(error) == (INVALID, "MALFORMED")


def test_issue_certificate_refuses_role_device(server: ServerThread, tmp_path: Path) -> None:
    error = refusal(lambda: issue_certificate(server, admin_pb2.ROLE_DEVICE, "dev", tmp_path))
    assert rpc_code(error) == (INVALID, "MALFORMED")


@pytest.mark.parametrize(
    "name",
    ["", "-leading-dash", ".dot", "has space", "x" * 65, "ünïcode", "a/b", "new\nline", "a:b"],
    ids=repr,
)
def test_create_token_refuses_bad_names(server: ServerThread, name: str) -> None:
    error = refusal(lambda: create_token(server, admin_pb2.ROLE_GATEWAY, name))
    assert rpc_code(error) == (INVALID, "MALFORMED")


@pytest.mark.parametrize("name", ["a", "gw-1.example@site+x", "A_b", "x" * 64])
def test_create_token_accepts_good_names(server: ServerThread, name: str) -> None:
    made = create_token(server, admin_pb2.ROLE_GATEWAY, name)
    assert made.credential.name == name
    assert made.credential.role == admin_pb2.ROLE_GATEWAY


@pytest.mark.parametrize("lifetime_s", [-1, 10 * 365 * 24 * 3600 + 1])
def test_create_token_refuses_bad_lifetimes(server: ServerThread, lifetime_s: int) -> None:
    error = refusal(lambda: create_token(server, admin_pb2.ROLE_GATEWAY, "x", lifetime_s))
    assert rpc_code(error) == (INVALID, "MALFORMED")


def test_created_token_works_for_its_role_only(server: ServerThread) -> None:
    made = create_token(server, admin_pb2.ROLE_POLICY_AUTHOR, "author-2")
    assert made.credential.id.startswith("tok-")
    assert made.credential.kind == "token"
    assert made.credential.created_by  # who made it
    channel = server.open(None, token=made.token)
    list_policies(channel)
    error = refusal(lambda: list_keys(channel))
    assert rpc_code(error) == (DENIED, "ROLE_NOT_ALLOWED")


def test_revoke_unknown_or_missing_id(server: ServerThread) -> None:
    admin = admin_pb2_grpc.AdminStub(server.open("admin"))
    error = refusal(
        lambda: admin.RevokeCredential(admin_pb2.RevokeCredentialRequest(), timeout=TIMEOUT_S)
    )
    assert rpc_code(error) == (INVALID, "MALFORMED")
    error = refusal(
        lambda: admin.RevokeCredential(
            admin_pb2.RevokeCredentialRequest(id="tok-0123456789abcdef"), timeout=TIMEOUT_S
        )
    )
    assert rpc_code(error) == (grpc.StatusCode.NOT_FOUND, "CREDENTIAL_UNKNOWN")


def test_list_credentials_shows_tokens_and_certificates_without_secrets(
    server: ServerThread, tmp_path: Path
) -> None:
    made = create_token(server, admin_pb2.ROLE_GATEWAY, "listed")
    issued, _, _ = issue_certificate(server, admin_pb2.ROLE_POLICY_AUTHOR, "listed-cert", tmp_path)
    gone = create_token(server, admin_pb2.ROLE_ADMIN, "gone")
    server.admin.RevokeCredential(
        admin_pb2.RevokeCredentialRequest(id=gone.credential.id), timeout=TIMEOUT_S
    )

    listed = server.admin.ListCredentials(admin_pb2.ListCredentialsRequest(), timeout=TIMEOUT_S)
    by_id = {c.id: c for c in listed.credentials}
    assert made.credential.id in by_id
    assert issued.credential.id in by_id
    assert gone.credential.id not in by_id  # revoked ones only on request
    token = by_id[made.credential.id]
    assert (token.kind, token.role, token.name) == ("token", admin_pb2.ROLE_GATEWAY, "listed")
    assert not token.certificate_serial and not token.certificate_sha256
    cert = by_id[issued.credential.id]
    assert (cert.kind, cert.role, cert.name) == (
        "certificate",
        admin_pb2.ROLE_POLICY_AUTHOR,
        "listed-cert",
    )
    assert cert.id.startswith("crt-")
    assert cert.certificate_serial and len(cert.certificate_sha256) == 64
    assert cert.expires_at_ms > cert.created_at_ms
    # The harness's tokens (one per role) are there too.
    assert {"test-admin", "test-policy-author", "test-gateway"} <= {
        c.name for c in listed.credentials if c.kind == "token"
    }

    everything = server.admin.ListCredentials(
        admin_pb2.ListCredentialsRequest(include_revoked=True), timeout=TIMEOUT_S
    )
    revoked = {c.id: c for c in everything.credentials}[gone.credential.id]
    assert revoked.revoked_at_ms > 0

    wire = everything.SerializeToString()
    for t in (*server.tokens.values(), made.token, gone.token):
        assert secret_of(t).encode() not in wire
        assert t.encode() not in wire


def test_credential_admin_needs_the_admin_role(server: ServerThread) -> None:
    for role in ("policy-author", "gateway"):
        admin = admin_pb2_grpc.AdminStub(server.open(role))
        error = refusal(
            lambda admin=admin: admin.CreateToken(
                admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_ADMIN, name="escalate"),
                timeout=TIMEOUT_S,
            )
        )
        assert rpc_code(error) == (DENIED, "ROLE_NOT_ALLOWED")
