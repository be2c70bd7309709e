"""attestd.v1.Verdicts (relying parties) and attestd.v1.Keys (signing-key rotation)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from attestd.core.ear import b64url_decode, verify_jwt
from attestd.service.attestation import record_verdict_pb
from attestd.service.errors import ServiceError
from attestd.service.keys import device_id_of
from attestd.service.state import ServiceState
from attestd.store.base import CredentialRecord
from attestd.v1 import keys_pb2, keys_pb2_grpc, verdicts_pb2, verdicts_pb2_grpc

log = logging.getLogger("attestd.verdicts")

MAX_TOKEN = 16 * 1024
MAX_CERTIFICATE = 16 * 1024
WATCH_BATCH = 500
MAX_WATCH_DEVICES = 10000
WATCH_POLL_S = 0.5  # other replicas append events too
_KINDS = {
    "AFFIRMED": verdicts_pb2.VERDICT_EVENT_KIND_AFFIRMED,
    "FAILED": verdicts_pb2.VERDICT_EVENT_KIND_FAILED,
    "REVOKED": verdicts_pb2.VERDICT_EVENT_KIND_REVOKED,
    "READMITTED": verdicts_pb2.VERDICT_EVENT_KIND_READMITTED,
    "EXPIRED": verdicts_pb2.VERDICT_EVENT_KIND_EXPIRED,
}
# With CURSOR_EXPIRED: the newest event cursor, where a resynchronised watcher resumes.
LATEST_CURSOR_KEY = "attestd-latest-cursor"
VALID = verdicts_pb2.CREDENTIAL_STATE_VALID
INVALID = verdicts_pb2.CREDENTIAL_STATE_INVALID
EXPIRED = verdicts_pb2.CREDENTIAL_STATE_EXPIRED
REVOKED = verdicts_pb2.CREDENTIAL_STATE_REVOKED


def _answer(
    state: int, code: str = "", why: str = "", **fields: object
) -> verdicts_pb2.VerifyCredentialResponse:
    reason = f"{code}: {why}" if code else ""
    return verdicts_pb2.VerifyCredentialResponse(state=state, reason=reason, **fields)  # type: ignore[arg-type]


class VerdictsService(verdicts_pb2_grpc.VerdictsServicer):
    def __init__(self, state: ServiceState) -> None:
        self.s = state

    async def GetVerdict(
        self, request: verdicts_pb2.GetVerdictRequest, context: grpc.aio.ServicerContext
    ) -> verdicts_pb2.DeviceVerdict:
        if not request.device_id:
            raise ServiceError("device_id: required", "MALFORMED")
        store = self.s.store.store
        device = await self.s.store(store.get_device, request.device_id)
        latest = await self.s.store(store.latest_attestation, device.device_id)
        status = await self.s.store(store.device_status, device.device_id)
        out = verdicts_pb2.DeviceVerdict(
            device_id=device.device_id,
            credential_expires_at_ms=(
                status.live_expires_at_ms if status.live_expires_at_ms > self.s.now_ms() else 0
            ),
            revoked=status.revoked,
            revocation_reason=status.revocation_reason if status.revoked else "",
            revoked_at_ms=status.revoked_at_ms if status.revoked else 0,
        )
        if latest is not None:
            out.verdict.CopyFrom(record_verdict_pb(latest))
        return out

    async def VerifyCredential(
        self, request: verdicts_pb2.VerifyCredentialRequest, context: grpc.aio.ServicerContext
    ) -> verdicts_pb2.VerifyCredentialResponse:
        which = request.WhichOneof("credential")
        if which == "token":
            return await self.verify_token(request.token, request.device_id)
        if which == "certificate":
            return await self._verify_certificate(request.certificate, request.device_id)
        raise ServiceError("credential: give a token or a certificate", "MALFORMED")

    async def verify_token(
        self, token: str, device_id: str
    ) -> verdicts_pb2.VerifyCredentialResponse:
        now_ms = self.s.now_ms()
        if len(token) > MAX_TOKEN or token.count(".") != 2:
            return _answer(INVALID, "MALFORMED_TOKEN", "not a compact JWS")
        try:
            header = json.loads(b64url_decode(token.split(".")[0]))
            kid = str(header["kid"])
        except (ValueError, KeyError, TypeError):
            return _answer(
                INVALID, "MALFORMED_TOKEN", "the JWS header is not valid JSON with a kid"
            )
        signer = self.s.keyring.find(kid, now_ms)
        if signer is None:
            return _answer(
                INVALID, "UNKNOWN_KEY_ID", "the token's kid names no key attestd publishes"
            )
        try:
            claims = verify_jwt(token, signer.key.public_key())
        except (InvalidSignature, ValueError, KeyError, TypeError):
            return _answer(INVALID, "BAD_SIGNATURE", "the token's signature does not verify")
        nbf = claims.get("nbf", 0)
        if not isinstance(nbf, int) or nbf * 1000 > now_ms:
            return _answer(INVALID, "NOT_YET_VALID", "the token is not valid yet (nbf)")
        jti, sub = str(claims.get("jti", "")), str(claims.get("sub", ""))
        record = await self.s.store(self.s.store.store.get_credential, jti=jti)
        if record is None or record.device_id != sub:
            return _answer(INVALID, "UNKNOWN_CREDENTIAL", "attestd has no record of issuing it")
        return await self._judge(record, device_id, now_ms, jti)

    async def _verify_certificate(
        self, data: bytes, device_id: str
    ) -> verdicts_pb2.VerifyCredentialResponse:
        now_ms = self.s.now_ms()
        if len(data) > MAX_CERTIFICATE:
            return _answer(INVALID, "MALFORMED_CERTIFICATE", "too large")
        try:
            cert = (
                x509.load_pem_x509_certificate(data)
                if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_certificate(data)
            )
        except ValueError:
            return _answer(INVALID, "MALFORMED_CERTIFICATE", "not an X.509 certificate")
        try:
            cert.verify_directly_issued_by(self.s.ca.cert)
        except (ValueError, TypeError, InvalidSignature):
            return _answer(INVALID, "UNTRUSTED_ISSUER", "not issued by attestd's device CA")
        serial = format(cert.serial_number, "x")
        record = await self.s.store(self.s.store.store.get_credential, serial=serial)
        if record is None or record.device_id != device_id_of(cert):
            return _answer(INVALID, "UNKNOWN_CREDENTIAL", "attestd has no record of issuing it")
        if now_ms < int(cert.not_valid_before_utc.timestamp() * 1000):
            return _answer(INVALID, "NOT_YET_VALID", "the certificate is not valid yet")
        return await self._judge(record, device_id, now_ms, serial)

    async def _judge(
        self, record: CredentialRecord, device_id: str, now_ms: int, credential_id: str
    ) -> verdicts_pb2.VerifyCredentialResponse:
        fields = {
            "device_id": record.device_id,
            "expires_at_ms": record.expires_at_ms,
            "credential_id": credential_id,
        }
        if device_id and device_id != record.device_id:
            return _answer(
                INVALID, "WRONG_DEVICE", f"the credential is {record.device_id}'s", **fields
            )
        if now_ms >= record.expires_at_ms:
            return _answer(EXPIRED, "EXPIRED", "the credential has expired", **fields)
        status = await self.s.store(self.s.store.store.device_status, record.device_id)
        if status.revoked:
            return _answer(REVOKED, "DEVICE_REVOKED", status.revocation_reason, **fields)
        if record.issued_at_ms < status.credentials_invalid_before_ms:
            if status.revoked_at_ms and record.issued_at_ms <= status.revoked_at_ms:
                # Readmission does not revive credentials issued before the revocation.
                return _answer(
                    REVOKED,
                    "DEVICE_REVOKED",
                    "the device was revoked after this credential was issued",
                    **fields,
                )
            return _answer(
                REVOKED,
                "SUPERSEDED_BY_FAILURE",
                "a later attestation of the device failed",
                **fields,
            )
        return _answer(VALID, **fields)  # type: ignore[arg-type]

    async def WatchVerdicts(
        self, request: verdicts_pb2.WatchVerdictsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[verdicts_pb2.VerdictEvent]:
        cursor = request.after_cursor
        devices = list(request.device_ids)
        if len(devices) > MAX_WATCH_DEVICES:
            raise ServiceError(f"device_ids: at most {MAX_WATCH_DEVICES}", "MALFORMED")
        store = self.s.store.store
        if cursor > 0:
            oldest = await self.s.store(store.oldest_event_cursor)
            if oldest and cursor + 1 < oldest:
                # Events after the cursor were pruned: resuming would silently skip them
                # (a REVOKED among them). The watcher must read the current verdicts of
                # the devices it knows again, then watch after the newest cursor, which
                # comes with the refusal (read before those verdicts, so nothing between
                # is missed).
                latest = await self.s.store(store.last_event_cursor)
                raise ServiceError(
                    f"after_cursor {cursor}: events up to {oldest - 1} are no longer kept"
                    " (event_retention); read the current verdicts again and watch after"
                    f" cursor {latest} (trailing metadata {LATEST_CURSOR_KEY})",
                    "CURSOR_EXPIRED",
                    grpc.StatusCode.OUT_OF_RANGE,
                    metadata=((LATEST_CURSOR_KEY, str(latest)),),
                )
        while True:
            events = await self.s.store(store.events_after, cursor, devices, WATCH_BATCH)
            for e in events:
                yield verdicts_pb2.VerdictEvent(
                    cursor=e.cursor,
                    kind=_KINDS.get(e.kind, verdicts_pb2.VERDICT_EVENT_KIND_UNSPECIFIED),
                    device_id=e.device_id,
                    status=e.status,
                    at_ms=e.at_ms,
                    reason=e.reason,
                    credential_expires_at_ms=e.credential_expires_at_ms,
                )
            if events:
                cursor = events[-1].cursor
            else:
                await self.s.changed(WATCH_POLL_S)

    async def GetTrustBundle(
        self, request: verdicts_pb2.GetTrustBundleRequest, context: grpc.aio.ServicerContext
    ) -> verdicts_pb2.TrustBundle:
        return verdicts_pb2.TrustBundle(
            jwks=json.dumps(self.s.keyring.jwks(self.s.now_ms()), sort_keys=True),
            ca_certificates_pem=self.s.ca.chain_pem(),
        )


class KeysService(keys_pb2_grpc.KeysServicer):
    def __init__(self, state: ServiceState) -> None:
        self.s = state

    def _keys(self) -> keys_pb2.SigningKeys:
        ring = self.s.keyring
        return keys_pb2.SigningKeys(
            keys=[
                keys_pb2.SigningKey(
                    kid=k.kid,
                    created_at_ms=k.created_at_ms,
                    retired_at_ms=k.retired_at_ms,
                    publish_until_ms=k.publish_until_ms(ring.lifetime_s),
                    current=k is ring.current,
                )
                for k in ring.keys
            ]
        )

    async def RotateSigningKey(
        self, request: keys_pb2.RotateSigningKeyRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.SigningKeys:
        new = self.s.keyring.rotate(self.s.now_ms())
        log.info("signing key rotated: new kid %s", new.kid)
        return self._keys()

    async def ListSigningKeys(
        self, request: keys_pb2.ListSigningKeysRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.SigningKeys:
        return self._keys()
