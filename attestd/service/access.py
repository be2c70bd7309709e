"""Who may call what: the roles, the caller of the current RPC, and the one matrix.

Four roles. **device**: a caller without a credential (its TPM proves it during
enrollment and attestation) or one presenting its own attestd credential (the
EAR JWT as a bearer token), which may then read only its own record and verdict.
**policy-author**: reference values and groups. **gateway**: verdicts and
credential checks. **admin**: callers' credentials, admission, revocation,
signing keys and the audit log, and reading what the others can read (but not
writing policy).

``MATRIX`` names every RPC of every attestd service; a method missing from it is
refused (fail closed), and a test checks the matrix covers every method of the
protos. The security interceptor (attestd/service/security.py) is the only place
that enforces it.
"""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass
from typing import Any


class Role(enum.StrEnum):
    DEVICE = "device"
    POLICY_AUTHOR = "policy-author"
    GATEWAY = "gateway"
    ADMIN = "admin"


# Roles a token or client certificate may carry (device credentials come from attestation).
GRANTABLE_ROLES = (Role.POLICY_AUTHOR, Role.GATEWAY, Role.ADMIN)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    role: Role
    name: str  # token/certificate name, or the device id
    credential_id: str  # "tok-…", "crt-…", or the device credential's jti
    device_id: str = ""  # role device only

    @property
    def actor(self) -> str:
        if self.role is Role.DEVICE:
            return f"device:{self.device_id}"
        return f"{self.credential_id} ({self.name}, {self.role})"


# The caller of the RPC being served (None: no credential), set by the interceptor.
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "attestd_principal", default=None
)
# The peer address of the RPC being served, for the audit log of anonymous calls.
current_peer: contextvars.ContextVar[str] = contextvars.ContextVar("attestd_peer", default="")


@dataclass
class AuditSlot:
    """The audit record owed for the call being served (see security.claimed_audit)."""

    kind: str
    request: Any
    claimed: bool = False


# Set by the interceptor for audited calls; a servicer may claim it to write the record
# inside its own store transaction.
current_audit: contextvars.ContextVar[AuditSlot | None] = contextvars.ContextVar(
    "attestd_audit", default=None
)


def current_actor() -> str:
    principal = current_principal.get()
    if principal is not None:
        return principal.actor
    return f"anonymous {current_peer.get() or '?'}"


@dataclass(frozen=True)
class Rule:
    """Who may call one RPC.

    ``open``: callers without a credential too (and every role). ``roles``: the roles
    allowed otherwise. ``self_field``: for role device, the request field that must
    name the caller's own device (empty: the device role is not allowed unless open).
    ``rate``: the abuse-limit bucket ("nonce", "enroll") or "". ``audit``: the audit
    record kind for this call ("" for reads).
    """

    roles: frozenset[Role] = frozenset()
    open: bool = False
    self_field: str = ""
    rate: str = ""
    audit: str = ""

    def allows(self, role: Role) -> bool:
        return self.open or role in self.roles


_A, _P, _G, _D = Role.ADMIN, Role.POLICY_AUTHOR, Role.GATEWAY, Role.DEVICE
_AUTHORS = frozenset({_P})
_POLICY_READERS = frozenset({_P, _A})
_VERDICT_READERS = frozenset({_G, _A})
_ADMINS = frozenset({_A})


def _open(rate: str = "", audit: str = "", self_field: str = "") -> Rule:
    return Rule(open=True, rate=rate, audit=audit, self_field=self_field)


def _write(roles: frozenset[Role], audit: str) -> Rule:
    return Rule(roles=roles, audit=audit)


MATRIX: dict[str, Rule] = {
    # Devices: no credential needed; the TPM proves them. A device presenting its own
    # credential still acts only for itself (self_field).
    "/attestd.v1.Enrollment/Enroll": _open(rate="enroll", audit="device.enroll"),
    "/attestd.v1.Enrollment/Activate": _open(audit="device.activate", self_field="device_id"),
    "/attestd.v1.Attestation/GetNonce": _open(rate="nonce", self_field="device_id"),
    "/attestd.v1.Attestation/Attest": _open(audit="attestation.verdict", self_field="device_id"),
    "/attestd.v1.Verdicts/GetTrustBundle": _open(),
    # Device records and revocation.
    "/attestd.v1.Devices/GetDevice": Rule(
        roles=frozenset({_D, _P, _G, _A}), self_field="device_id"
    ),
    "/attestd.v1.Devices/RevokeDevice": _write(_ADMINS, "device.revoke"),
    "/attestd.v1.Devices/ReadmitDevice": _write(_ADMINS, "device.readmit"),
    # Policy: authors write, authors and admins read.
    "/attestd.v1.Policy/PutPolicy": _write(_AUTHORS, "policy.put"),
    "/attestd.v1.Policy/RollbackPolicy": _write(_AUTHORS, "policy.rollback"),
    "/attestd.v1.Policy/DeletePolicy": _write(_AUTHORS, "policy.delete"),
    "/attestd.v1.Policy/CapturePolicy": _write(_AUTHORS, "policy.capture"),
    "/attestd.v1.Policy/GetPolicy": Rule(roles=_POLICY_READERS),
    "/attestd.v1.Policy/ListPolicies": Rule(roles=_POLICY_READERS),
    "/attestd.v1.Policy/PolicyHistory": Rule(roles=_POLICY_READERS),
    "/attestd.v1.Policy/DiffPolicies": Rule(roles=_POLICY_READERS),
    "/attestd.v1.Policy/DryRunPolicy": Rule(roles=_POLICY_READERS),
    "/attestd.v1.Policy/CreateGroup": _write(_AUTHORS, "group.create"),
    "/attestd.v1.Policy/UpdateGroup": _write(_AUTHORS, "group.update"),
    "/attestd.v1.Policy/DeleteGroup": _write(_AUTHORS, "group.delete"),
    "/attestd.v1.Policy/AssignDevices": _write(_AUTHORS, "group.assign"),
    "/attestd.v1.Policy/UnassignDevices": _write(_AUTHORS, "group.unassign"),
    "/attestd.v1.Policy/GetGroup": Rule(roles=_POLICY_READERS),
    "/attestd.v1.Policy/ListGroups": Rule(roles=_POLICY_READERS),
    # Gateways.
    "/attestd.v1.Verdicts/GetVerdict": Rule(roles=frozenset({_D, _G, _A}), self_field="device_id"),
    "/attestd.v1.Verdicts/VerifyCredential": Rule(roles=_VERDICT_READERS),
    "/attestd.v1.Verdicts/WatchVerdicts": Rule(roles=_VERDICT_READERS),
    # attestd's own keys and administration.
    "/attestd.v1.Keys/RotateSigningKey": _write(_ADMINS, "keys.rotate"),
    "/attestd.v1.Keys/ListSigningKeys": Rule(roles=_ADMINS),
    "/attestd.v1.Admin/CreateToken": _write(_ADMINS, "credential.token_create"),
    "/attestd.v1.Admin/IssueClientCertificate": _write(_ADMINS, "credential.cert_issue"),
    "/attestd.v1.Admin/ListCredentials": Rule(roles=_ADMINS),
    "/attestd.v1.Admin/RevokeCredential": _write(_ADMINS, "credential.revoke"),
    "/attestd.v1.Admin/PreregisterDevices": _write(_ADMINS, "device.preregister"),
    "/attestd.v1.Admin/ExportAudit": Rule(roles=_ADMINS),
}

# gRPC's own services (health checks, reflection) are open and unaudited.
OPEN_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
