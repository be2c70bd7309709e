"""attestd.v1.Admin: callers' credentials, pre-registration, the audit log.

The operations are plain functions over a store, so `attestd admin … --data-dir`
can run them on the server's own files (how the first admin token is made) and
the Admin service runs the very same code for a remote admin.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestd.core.ear import public_jwk
from attestd.core.manifest import ManifestError, parse_manifest
from attestd.service.access import GRANTABLE_ROLES, Role, current_actor
from attestd.service.errors import ServiceError
from attestd.service.keys import IssuingCA, SigningKeyring
from attestd.service.security import new_token
from attestd.service.state import ServiceState
from attestd.store.base import CallerCredentialRecord, Preregistration, Store
from attestd.v1 import admin_pb2, admin_pb2_grpc

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
DEFAULT_CERT_LIFETIME_S = 365 * 24 * 3600
MAX_LIFETIME_S = 10 * 365 * 24 * 3600
MAX_PUBLIC_KEY = 16 * 1024
EXPORT_BATCH = 500

ROLE_FROM_PB: dict[int, Role] = {
    admin_pb2.ROLE_DEVICE: Role.DEVICE,
    admin_pb2.ROLE_POLICY_AUTHOR: Role.POLICY_AUTHOR,
    admin_pb2.ROLE_GATEWAY: Role.GATEWAY,
    admin_pb2.ROLE_ADMIN: Role.ADMIN,
}
ROLE_TO_PB: dict[Role, Any] = {v: k for k, v in ROLE_FROM_PB.items()}


def grant(role: int, name: str, lifetime_s: int) -> Role:
    """Validate what a new credential would carry."""
    if role not in ROLE_FROM_PB or ROLE_FROM_PB[role] not in GRANTABLE_ROLES:
        allowed = ", ".join(r.value for r in GRANTABLE_ROLES)
        raise ServiceError(
            f"role: one of {allowed} (devices authenticate with their TPM)", "MALFORMED"
        )
    if not NAME.fullmatch(name):
        raise ServiceError(
            "name: 1-64 characters, letters, digits and . _ @ + - (starting with a letter or"
            " digit)",
            "MALFORMED",
        )
    if lifetime_s < 0 or lifetime_s > MAX_LIFETIME_S:
        raise ServiceError(f"lifetime_s: between 0 and {MAX_LIFETIME_S}", "MALFORMED")
    return ROLE_FROM_PB[role]


def credential_pb(r: CallerCredentialRecord) -> admin_pb2.CallerCredential:
    return admin_pb2.CallerCredential(
        id=r.cred_id,
        kind=r.kind,
        role=ROLE_TO_PB[Role(r.role)],
        name=r.name,
        created_at_ms=r.created_at_ms,
        expires_at_ms=r.expires_at_ms,
        revoked_at_ms=r.revoked_at_ms,
        created_by=r.created_by,
        certificate_serial=r.cert_serial,
        certificate_sha256=r.cert_sha256,
    )


def create_token(
    store: Store, request: admin_pb2.CreateTokenRequest, now_ms: int, actor: str
) -> admin_pb2.CreateTokenResponse:
    role = grant(request.role, request.name, request.lifetime_s)
    cred_id, token, secret_hash = new_token()
    record = CallerCredentialRecord(
        cred_id=cred_id,
        kind="token",
        role=role.value,
        name=request.name,
        secret_hash=secret_hash,
        cert_serial="",
        cert_sha256="",
        created_at_ms=now_ms,
        expires_at_ms=now_ms + request.lifetime_s * 1000 if request.lifetime_s else 0,
        revoked_at_ms=0,
        created_by=actor,
    )
    store.put_caller_credential(record)
    return admin_pb2.CreateTokenResponse(credential=credential_pb(record), token=token)


def _load_public_key(data: bytes) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    if len(data) > MAX_PUBLIC_KEY:
        raise ServiceError("public_key: too large", "MALFORMED")
    try:
        key = (
            serialization.load_pem_public_key(data)
            if data.lstrip().startswith(b"-----")
            else serialization.load_der_public_key(data)
        )
    except ValueError:
        raise ServiceError(
            "public_key: not a SubjectPublicKeyInfo (PEM or DER)", "MALFORMED"
        ) from None
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in ("secp256r1", "secp384r1"):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return key
    raise ServiceError("public_key: EC P-256/P-384 or RSA of 2048 bits or more", "MALFORMED")


def issue_client_certificate(
    store: Store,
    ca: IssuingCA,
    request: admin_pb2.IssueClientCertificateRequest,
    now_ms: int,
    actor: str,
) -> admin_pb2.IssueClientCertificateResponse:
    role = grant(request.role, request.name, request.lifetime_s)
    public_key = _load_public_key(request.public_key)
    lifetime_s = request.lifetime_s or DEFAULT_CERT_LIFETIME_S
    cred_id = (
        "crt-"
        + hashlib.sha256(
            public_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            + now_ms.to_bytes(8, "big")
        ).hexdigest()[:16]
    )
    start_s = now_ms // 1000 - 300
    cert = ca.issue_caller(
        public_key, cred_id, request.name, role.value, start_s, now_ms // 1000 + lifetime_s
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    record = CallerCredentialRecord(
        cred_id=cred_id,
        kind="certificate",
        role=role.value,
        name=request.name,
        secret_hash=b"",
        cert_serial=format(cert.serial_number, "x"),
        cert_sha256=hashlib.sha256(der).hexdigest(),
        created_at_ms=now_ms,
        expires_at_ms=(now_ms // 1000 + lifetime_s) * 1000,
        revoked_at_ms=0,
        created_by=actor,
    )
    store.put_caller_credential(record)
    return admin_pb2.IssueClientCertificateResponse(
        credential=credential_pb(record),
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        ca_certificate_pem=ca.chain_pem(),
    )


def list_credentials(
    store: Store, request: admin_pb2.ListCredentialsRequest
) -> admin_pb2.ListCredentialsResponse:
    return admin_pb2.ListCredentialsResponse(
        credentials=[
            credential_pb(r)
            for r in store.list_caller_credentials()
            if request.include_revoked or not r.revoked_at_ms
        ]
    )


def revoke_credential(
    store: Store, request: admin_pb2.RevokeCredentialRequest, now_ms: int
) -> admin_pb2.CallerCredential:
    if not request.id:
        raise ServiceError("id: required", "MALFORMED")
    return credential_pb(store.revoke_caller_credential(request.id, request.reason[:256], now_ms))


def preregister(
    store: Store, request: admin_pb2.PreregisterDevicesRequest, now_ms: int
) -> admin_pb2.PreregisterDevicesResponse:
    try:
        entries = parse_manifest(request.manifest)
    except ManifestError as e:
        raise ServiceError(f"manifest: {e}", "MANIFEST_INVALID") from None
    added, updated, unchanged = store.preregister(
        [
            Preregistration(e.ek_cert_serial, e.ek_cert_issuer, e.ek_public_sha256, e.name, e.group)
            for e in entries
        ],
        now_ms,
    )
    return admin_pb2.PreregisterDevicesResponse(added=added, updated=updated, unchanged=unchanged)


def verification_jwks(keyring: SigningKeyring) -> str:
    """Every signing key attestd holds (retired ones too: old checkpoints use them)."""
    keys: list[dict[str, Any]] = [
        public_jwk(k.key.public_key()) | {"kid": k.kid, "alg": "ES256"} for k in keyring.keys
    ]
    return json.dumps({"keys": keys}, sort_keys=True)


def audit_items(
    store: Store, request: admin_pb2.ExportAuditRequest
) -> tuple[list[admin_pb2.AuditItem], int]:
    """One batch of exported records from ``request``; (items, last seq or 0 when done)."""
    records = store.audit_records(request.after_seq, request.since_ms, EXPORT_BATCH)
    items = [
        admin_pb2.AuditItem(
            record=admin_pb2.AuditRecord(
                seq=r.seq,
                at_ms=r.at_ms,
                kind=r.kind,
                actor=r.actor,
                subject=r.subject,
                detail_json=json.dumps(r.detail, sort_keys=True, separators=(",", ":")),
                prev_hash=r.prev_hash,
                hash=r.hash,
            )
        )
        for r in records
    ]
    return items, records[-1].seq if len(records) == EXPORT_BATCH else 0


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, state: ServiceState) -> None:
        self.s = state

    async def CreateToken(
        self, request: admin_pb2.CreateTokenRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateTokenResponse:
        return await self.s.store(
            create_token, self.s.store.store, request, self.s.now_ms(), current_actor()
        )

    async def IssueClientCertificate(
        self, request: admin_pb2.IssueClientCertificateRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.IssueClientCertificateResponse:
        return await self.s.store(
            issue_client_certificate,
            self.s.store.store,
            self.s.client_ca,
            request,
            self.s.now_ms(),
            current_actor(),
        )

    async def ListCredentials(
        self, request: admin_pb2.ListCredentialsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListCredentialsResponse:
        return await self.s.store(list_credentials, self.s.store.store, request)

    async def RevokeCredential(
        self, request: admin_pb2.RevokeCredentialRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CallerCredential:
        return await self.s.store(revoke_credential, self.s.store.store, request, self.s.now_ms())

    async def PreregisterDevices(
        self, request: admin_pb2.PreregisterDevicesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PreregisterDevicesResponse:
        return await self.s.store(preregister, self.s.store.store, request, self.s.now_ms())

    async def ExportAudit(
        self, request: admin_pb2.ExportAuditRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.AuditItem]:
        store = self.s.store.store
        yield admin_pb2.AuditItem(verification_keys_jwks=verification_jwks(self.s.keyring))
        cursor = admin_pb2.ExportAuditRequest()
        cursor.CopyFrom(request)
        first_seq = 0
        while True:
            items, last = await self.s.store(audit_items, store, cursor)
            if items and not first_seq:
                first_seq = items[0].record.seq
            for item in items:
                yield item
            if not last:
                break
            cursor.after_seq = last
        # The checkpoints over the exported records (with none exported: those after the
        # requested point, so an emptied log still shows its signed past).
        after = first_seq - 1 if first_seq else request.after_seq
        for cp in await self.s.store(store.audit_checkpoints, after):
            if not first_seq and cp.at_ms < request.since_ms:
                continue
            yield admin_pb2.AuditItem(
                checkpoint=admin_pb2.AuditCheckpoint(
                    seq=cp.seq, at_ms=cp.at_ms, hash=cp.hash, kid=cp.kid, signature=cp.signature
                )
            )
