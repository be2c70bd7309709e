"""Every RPC x every caller: allowed, or refused with the right status and reason.

The intended matrix is written out by hand below (``EXPECTED``), independently of
``attestd.service.access.MATRIX``, so a wrong rule there is caught here. The walk
covers every method of every attestd.v1 service found in the generated descriptors;
a new RPC without a rule (or without a line here) fails ``test_every_rpc_has_a_rule``.

Callers: no credential, a device presenting its own credential (its EAR JWT as the
bearer token), and API tokens of the three grantable roles on the main port; then
the same roles again with client certificates on the mTLS port.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import BOOT_SELECTION, ServerThread, rpc_code, server_config
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from tpmsim import Manufacturer

import attestd.v1
from attestd.agent.client import Agent, capture_policy
from attestd.connect import Connection, open_channel
from attestd.service.access import MATRIX, Role
from attestd.tlsinit import TlsFiles
from attestd.v1 import admin_pb2

pytestmark = pytest.mark.integration

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
# Reason codes that mean "the security interceptor refused the caller".
AUTH_CODES = frozenset(
    {
        "CREDENTIAL_REQUIRED",
        "CREDENTIAL_INVALID",
        "CREDENTIAL_REVOKED",
        "CREDENTIAL_EXPIRED",
        "CREDENTIAL_AMBIGUOUS",
        "ROLE_NOT_ALLOWED",
        "NOT_YOUR_DEVICE",
        "METHOD_NOT_ALLOWED",
    }
)

D, P, G, A = "device", "policy-author", "gateway", "admin"
OPEN = "open"  # every caller, with a credential or without

# The intended matrix, by hand: OPEN, or the roles that may call the RPC.
EXPECTED: dict[str, str | frozenset[str]] = {
    "/attestd.v1.Enrollment/Enroll": OPEN,
    "/attestd.v1.Enrollment/Activate": OPEN,
    "/attestd.v1.Attestation/GetNonce": OPEN,
    "/attestd.v1.Attestation/Attest": OPEN,
    "/attestd.v1.Verdicts/GetTrustBundle": OPEN,
    "/attestd.v1.Devices/GetDevice": frozenset({D, P, G, A}),
    "/attestd.v1.Devices/RevokeDevice": frozenset({A}),
    "/attestd.v1.Devices/ReadmitDevice": frozenset({A}),
    "/attestd.v1.Policy/PutPolicy": frozenset({P}),
    "/attestd.v1.Policy/RollbackPolicy": frozenset({P}),
    "/attestd.v1.Policy/DeletePolicy": frozenset({P}),
    "/attestd.v1.Policy/CapturePolicy": frozenset({P}),
    "/attestd.v1.Policy/GetPolicy": frozenset({P, A}),
    "/attestd.v1.Policy/ListPolicies": frozenset({P, A}),
    "/attestd.v1.Policy/PolicyHistory": frozenset({P, A}),
    "/attestd.v1.Policy/DiffPolicies": frozenset({P, A}),
    "/attestd.v1.Policy/DryRunPolicy": frozenset({P, A}),
    "/attestd.v1.Policy/CreateGroup": frozenset({P}),
    "/attestd.v1.Policy/UpdateGroup": frozenset({P}),
    "/attestd.v1.Policy/DeleteGroup": frozenset({P}),
    "/attestd.v1.Policy/AssignDevices": frozenset({P}),
    "/attestd.v1.Policy/UnassignDevices": frozenset({P}),
    "/attestd.v1.Policy/GetGroup": frozenset({P, A}),
    "/attestd.v1.Policy/ListGroups": frozenset({P, A}),
    "/attestd.v1.Verdicts/GetVerdict": frozenset({D, G, A}),
    "/attestd.v1.Verdicts/VerifyCredential": frozenset({G, A}),
    "/attestd.v1.Verdicts/WatchVerdicts": frozenset({G, A}),
    "/attestd.v1.Keys/RotateSigningKey": frozenset({A}),
    "/attestd.v1.Keys/ListSigningKeys": frozenset({A}),
    "/attestd.v1.Admin/CreateToken": frozenset({A}),
    "/attestd.v1.Admin/IssueClientCertificate": frozenset({A}),
    "/attestd.v1.Admin/ListCredentials": frozenset({A}),
    "/attestd.v1.Admin/RevokeCredential": frozenset({A}),
    "/attestd.v1.Admin/PreregisterDevices": frozenset({A}),
    "/attestd.v1.Admin/ExportAudit": frozenset({A}),
}

# Requests for a device acting for itself name its own id in this field.
SELF_FIELDS = {
    "/attestd.v1.Enrollment/Activate": "device_id",
    "/attestd.v1.Attestation/GetNonce": "device_id",
    "/attestd.v1.Attestation/Attest": "device_id",
    "/attestd.v1.Devices/GetDevice": "device_id",
    "/attestd.v1.Verdicts/GetVerdict": "device_id",
}

SELF = object()  # stands for the device's own id in REQUESTS
UNKNOWN_DEVICE = "no-such-device"
UNKNOWN_NAME = "no-such-name"

# Minimal, harmless requests: an allowed call fails validation, finds nothing, or
# changes nothing that matters (RotateSigningKey really rotates; that is fine).
REQUESTS: dict[str, dict[str, Any]] = {
    "/attestd.v1.Enrollment/Enroll": {},
    "/attestd.v1.Enrollment/Activate": {"device_id": SELF, "challenge_id": "no-such-challenge"},
    "/attestd.v1.Attestation/GetNonce": {"device_id": SELF},
    "/attestd.v1.Attestation/Attest": {"device_id": SELF},
    "/attestd.v1.Verdicts/GetTrustBundle": {},
    "/attestd.v1.Devices/GetDevice": {"device_id": SELF},
    "/attestd.v1.Devices/RevokeDevice": {"device_id": UNKNOWN_DEVICE, "reason": "matrix"},
    "/attestd.v1.Devices/ReadmitDevice": {"device_id": UNKNOWN_DEVICE, "reason": "matrix"},
    "/attestd.v1.Policy/PutPolicy": {},
    "/attestd.v1.Policy/RollbackPolicy": {"name": UNKNOWN_NAME},
    "/attestd.v1.Policy/DeletePolicy": {"name": UNKNOWN_NAME},
    "/attestd.v1.Policy/CapturePolicy": {"device_id": UNKNOWN_DEVICE, "name": UNKNOWN_NAME},
    "/attestd.v1.Policy/GetPolicy": {"name": UNKNOWN_NAME},
    "/attestd.v1.Policy/ListPolicies": {},
    "/attestd.v1.Policy/PolicyHistory": {"name": UNKNOWN_NAME},
    "/attestd.v1.Policy/DiffPolicies": {"from": f"{UNKNOWN_NAME}@1", "to": f"{UNKNOWN_NAME}@2"},
    "/attestd.v1.Policy/DryRunPolicy": {"ref": f"{UNKNOWN_NAME}@1"},
    "/attestd.v1.Policy/CreateGroup": {},
    "/attestd.v1.Policy/UpdateGroup": {"name": UNKNOWN_NAME},
    "/attestd.v1.Policy/DeleteGroup": {"name": UNKNOWN_NAME},
    "/attestd.v1.Policy/AssignDevices": {"group": UNKNOWN_NAME, "device_ids": [UNKNOWN_DEVICE]},
    "/attestd.v1.Policy/UnassignDevices": {"device_ids": [UNKNOWN_DEVICE]},
    "/attestd.v1.Policy/GetGroup": {"name": UNKNOWN_NAME},
    "/attestd.v1.Policy/ListGroups": {},
    "/attestd.v1.Verdicts/GetVerdict": {"device_id": SELF},
    "/attestd.v1.Verdicts/VerifyCredential": {"token": "not.a.token"},
    "/attestd.v1.Verdicts/WatchVerdicts": {},
    "/attestd.v1.Keys/RotateSigningKey": {},
    "/attestd.v1.Keys/ListSigningKeys": {},
    "/attestd.v1.Admin/CreateToken": {},  # ROLE_UNSPECIFIED: refused as MALFORMED
    "/attestd.v1.Admin/IssueClientCertificate": {},
    "/attestd.v1.Admin/ListCredentials": {},
    "/attestd.v1.Admin/RevokeCredential": {"id": "tok-0000000000000000"},
    "/attestd.v1.Admin/PreregisterDevices": {},
    "/attestd.v1.Admin/ExportAudit": {},
}

UNARY_TIMEOUT_S = 15.0
STREAM_TIMEOUT_S = 2.0


def _methods() -> dict[str, MethodDescriptor]:
    """Every method of every service in the generated attestd.v1 modules."""
    found: dict[str, MethodDescriptor] = {}
    for info in pkgutil.iter_modules(attestd.v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"attestd.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found[f"/{service.full_name}/{method.name}"] = method
    return found


METHODS = _methods()
# Main port: no credential, the device's own credential, an API token per role.
CALLERS = ("none", D, P, G, A)
# mTLS port: a client certificate per role.
CERT_ROLES = (P, G, A)


def _short(method: str) -> str:
    return method.removeprefix("/attestd.v1.")


def test_every_rpc_has_a_rule() -> None:
    """The protos, the product's MATRIX and the matrix written here name the same RPCs."""
    assert len(METHODS) > 30, sorted(METHODS)
    assert set(METHODS) == set(MATRIX), {
        "no rule in MATRIX": sorted(set(METHODS) - set(MATRIX)),
        "rule for no RPC": sorted(set(MATRIX) - set(METHODS)),
    }
    assert set(METHODS) == set(EXPECTED), {
        "not in this test's matrix": sorted(set(METHODS) - set(EXPECTED)),
        "not an RPC": sorted(set(EXPECTED) - set(METHODS)),
    }
    assert set(METHODS) == set(REQUESTS)
    # No client-streaming RPCs: the interceptor refuses those outright.
    assert not [m for m, d in METHODS.items() if d.client_streaming], "client streaming RPC"


@pytest.mark.parametrize("method", sorted(EXPECTED), ids=_short)
def test_matrix_rules_match_the_intended_matrix(method: str) -> None:
    """A quick static diff of MATRIX against EXPECTED (the walk below checks behaviour)."""
    rule = MATRIX[method]
    want = EXPECTED[method]
    if want == OPEN:
        assert rule.open, f"{method} should be open"
    else:
        assert not rule.open, f"{method} should not be open"
        assert {r.value for r in rule.roles} == want
    assert rule.self_field == SELF_FIELDS.get(method, "")


# -- the running server ----------------------------------------------------------


@dataclass
class World:
    server: ServerThread
    device_id: str
    credential: str
    cert_channels: dict[str, grpc.Channel]

    def channel(self, caller: str) -> grpc.Channel:
        if caller == "none":
            return self.server.open(None)
        if caller == D:
            return self.server.open(None, token=self.credential)
        return self.server.open(caller)


def _issue_certificate(server: ServerThread, role: str, where: Path) -> tuple[Path, Path]:
    """A role client certificate issued through Admin.IssueClientCertificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pb_role = {P: admin_pb2.ROLE_POLICY_AUTHOR, G: admin_pb2.ROLE_GATEWAY, A: admin_pb2.ROLE_ADMIN}
    response = server.admin.IssueClientCertificate(
        admin_pb2.IssueClientCertificateRequest(
            role=pb_role[role], name=f"matrix-{role}", public_key=public
        ),
        timeout=UNARY_TIMEOUT_S,
    )
    assert response.credential.kind == "certificate"
    cert_path, key_path = where / f"{role}.crt", where / f"{role}.key"
    cert_path.write_text(response.certificate_pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, manufacturer: Manufacturer, tls_files: TlsFiles
) -> Iterator[World]:
    """A fresh server of its own, one attested device, and role certificates for mTLS."""
    base = tmp_path_factory.mktemp("access-matrix")
    server = ServerThread(server_config(base / "server", manufacturer, tls_files), tls_files)
    tpm = manufacturer.make_tpm(base / "tpm")
    agent: Agent | None = None
    channels: dict[str, grpc.Channel] = {}
    try:
        tpm.start()
        tpm.boot()
        agent = Agent(server.agent_config(tpm.tcti, base / "agent"))
        agent.enroll()
        server.put_policy(capture_policy(tpm.tcti, "default", BOOT_SELECTION))
        attested = agent.attest()
        assert attested.credential, attested
        for role in CERT_ROLES:
            cert, key = _issue_certificate(server, role, base)
            channels[role] = open_channel(
                Connection(
                    server.mtls_address, ca_cert=server.ca_cert, client_cert=cert, client_key=key
                )
            )
        yield World(server, agent.device_id(), attested.credential, channels)
    finally:
        for channel in channels.values():
            channel.close()
        if agent is not None:
            agent.close()
        tpm.stop()
        server.stop()


def _request(method: str, device_id: str, overrides: dict[str, Any] | None = None) -> Any:
    cls = message_factory.GetMessageClass(METHODS[method].input_type)
    fields = {k: (device_id if v is SELF else v) for k, v in REQUESTS[method].items()}
    fields.update(overrides or {})
    return cls(**fields)


def _call(channel: grpc.Channel, method: str, request: Any) -> grpc.RpcError | None:
    """Call ``method``; None if it answered (or a stream started), else the error."""
    descriptor = METHODS[method]
    response_cls = message_factory.GetMessageClass(descriptor.output_type)
    serializer = type(request).SerializeToString
    if not descriptor.server_streaming:
        try:
            channel.unary_unary(
                method, request_serializer=serializer, response_deserializer=response_cls.FromString
            )(request, timeout=UNARY_TIMEOUT_S)
        except grpc.RpcError as e:
            return e
        return None
    call = channel.unary_stream(
        method, request_serializer=serializer, response_deserializer=response_cls.FromString
    )(request, timeout=STREAM_TIMEOUT_S)
    try:
        next(call)  # the first message, or the status
    except StopIteration:
        return None
    except grpc.RpcError as e:
        if e.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
            return None  # authorization passed; the stream was waiting for news
        return e
    finally:
        call.cancel()
    return None


def _check(method: str, caller_role: str | None, error: grpc.RpcError | None) -> None:
    """Allowed: anything but an authentication/authorization refusal. Else the refusal."""
    want = EXPECTED[method]
    allowed = want == OPEN or (caller_role is not None and caller_role in want)
    got = None if error is None else rpc_code(error)
    if allowed:
        assert got is None or (got[0] is not UNAUTH and got[1] not in AUTH_CODES), (
            f"{method} as {caller_role}: expected allowed, got {got}"
            f" ({error.details() if isinstance(error, grpc.Call) else ''})"
        )
    elif caller_role is None:
        assert got == (UNAUTH, "CREDENTIAL_REQUIRED"), f"{method} without credential: {got}"
    else:
        assert got == (DENIED, "ROLE_NOT_ALLOWED"), f"{method} as {caller_role}: {got}"


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("method", sorted(EXPECTED), ids=_short)
def test_walk(world: World, method: str, caller: str) -> None:
    request = _request(method, world.device_id)
    error = _call(world.channel(caller), method, request)
    _check(method, None if caller == "none" else caller, error)


@pytest.mark.parametrize("role", CERT_ROLES)
@pytest.mark.parametrize("method", sorted(EXPECTED), ids=_short)
def test_walk_mtls(world: World, method: str, role: str) -> None:
    """The same walk with role client certificates on the mTLS port."""
    error = _call(world.cert_channels[role], method, _request(method, world.device_id))
    _check(method, role, error)


@pytest.mark.parametrize("method", sorted(SELF_FIELDS), ids=_short)
def test_device_may_not_act_for_another_device(world: World, method: str) -> None:
    """A device credential naming another device is refused before the handler runs."""
    field = SELF_FIELDS[method]
    request = _request(method, world.device_id, {field: "another-device"})
    error = _call(world.channel(D), method, request)
    assert error is not None, f"{method}: a device acted for another device"
    assert rpc_code(error) == (DENIED, "NOT_YOUR_DEVICE"), error.details()


def test_device_credential_is_role_device(world: World) -> None:
    """Sanity: the device's credential really is taken as role device (not anonymous)."""
    error = _call(
        world.channel(D),
        "/attestd.v1.Policy/ListPolicies",
        _request("/attestd.v1.Policy/ListPolicies", world.device_id),
    )
    assert error is not None
    assert rpc_code(error) == (DENIED, "ROLE_NOT_ALLOWED")
    assert str(Role.DEVICE) in (error.details() or "")
