"""attestd.v1.Attestation: nonce, then quote appraisal and the session credential."""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass, replace

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestd.core.certify import CertifyEvidence, check_certified_key, parse_certified_key
from attestd.core.ear import b64url, issue_credential, jwk_of
from attestd.core.eventlog import parse_event_log
from attestd.core.groups import GroupChoice
from attestd.core.policy import Policy
from attestd.core.quote import Appraisal, ClockState, appraise_quote, parse_evidence
from attestd.core.tpm import Bank
from attestd.core.verdict import (
    UNTRUSTWORTHY_INSTANCE,
    Claim,
    Code,
    Failure,
    Verdict,
    with_failures,
)
from attestd.service.config import ServerConfig
from attestd.service.effective import effective_policy_in_store
from attestd.service.errors import ServiceError
from attestd.service.security import claimed_audit
from attestd.service.state import ServiceState, cached_public
from attestd.store.base import (
    AttestationRecord,
    CredentialRecord,
    Device,
    DeviceStatus,
    NonceGrant,
    NonceUse,
    PolicyRecord,
    Store,
)
from attestd.v1 import attestation_pb2, attestation_pb2_grpc, common_pb2

log = logging.getLogger("attestd.attestation")

NONCE_SIZE = 32

_STATUS = {
    "none": common_pb2.VERDICT_STATUS_NONE,
    "affirming": common_pb2.VERDICT_STATUS_AFFIRMING,
    "warning": common_pb2.VERDICT_STATUS_WARNING,
    "contraindicated": common_pb2.VERDICT_STATUS_CONTRAINDICATED,
}


# (TrustVector attribute / proto field, EAR claim name) per claim, in order.
_CLAIMS = tuple((claim.name.lower(), claim.value) for claim in Claim)


def failure_pb(f: Failure) -> common_pb2.Failure:
    return common_pb2.Failure(
        code=f.code.value, subject=f.subject, expected=f.expected, got=f.got, detail=f.detail
    )


def verdict_pb(verdict: Verdict, device_id: str) -> common_pb2.Verdict:
    tv = verdict.trust_vector
    return common_pb2.Verdict(
        status=_STATUS[verdict.status.value],
        trust_vector=common_pb2.TrustVector(**{name: getattr(tv, name) for name, _ in _CLAIMS}),
        failures=[failure_pb(f) for f in verdict.failures],
        warnings=[failure_pb(f) for f in verdict.warnings],
        device_id=device_id,
        policy_name=verdict.policy_name,
        policy_version=verdict.policy_version,
        appraised_at_ms=verdict.appraised_at_ms,
    )


def _selection_pb(policy: Policy) -> tuple[common_pb2.PcrSelection, ...]:
    """The PCR selection a nonce's quote must cover, as the API gives it."""
    return tuple(
        common_pb2.PcrSelection(bank=Bank.from_alg(alg).value, indices=sorted(idx))
        for alg, idx in policy.selection()
    )


def _require_device_id(device_id: str) -> None:
    if not device_id or len(device_id) > 128:
        raise ServiceError("device_id: required, at most 128 characters", "MALFORMED")


class AttestationService(attestation_pb2_grpc.AttestationServicer):
    def __init__(self, state: ServiceState) -> None:
        self.s = state
        self._selections: dict[tuple[str, int], tuple[common_pb2.PcrSelection, ...]] = {}

    async def GetNonce(
        self, request: attestation_pb2.GetNonceRequest, context: grpc.aio.ServicerContext
    ) -> attestation_pb2.GetNonceResponse:
        _require_device_id(request.device_id)
        nonce = secrets.token_bytes(NONCE_SIZE)
        # Only a hash is stored: a database reader cannot lift unused nonces.
        choice, record, grant = await self.s.store.fast(
            _grant_nonce,
            self.s.store.store,
            self.s.config,
            request.device_id,
            hashlib.sha256(nonce).digest(),
            self.s.now_ms(),
        )
        if record is None or grant is None:
            where = (
                f"its group {choice.group!r} names a policy that does not exist"
                if choice.group
                else f"it is in no group and the default policy {self.s.config.default_policy!r}"
                " does not exist yet"
            )
            raise ServiceError(
                f"no policy applies to this device: {where}",
                "NO_POLICY",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        return attestation_pb2.GetNonceResponse(
            nonce=nonce,
            expires_at_ms=grant.expires_at_ms,
            pcr_selection=self._selection(record),
            policy_name=record.name,
            policy_version=record.version,
        )

    def _selection(self, record: PolicyRecord) -> tuple[common_pb2.PcrSelection, ...]:
        key = (record.name, record.version)  # versions are immutable
        selection = self._selections.get(key)
        if selection is None:
            selection = self._selections[key] = _selection_pb(self.s.policy_of(record))
        return selection

    async def Attest(
        self, request: attestation_pb2.AttestRequest, context: grpc.aio.ServicerContext
    ) -> attestation_pb2.AttestResponse:
        _require_device_id(request.device_id)
        if len(request.nonce) != NONCE_SIZE:
            raise ServiceError(f"nonce: must be {NONCE_SIZE} bytes", "MALFORMED")
        limits = self.s.config.limits
        if len(request.event_log) > limits.max_event_log_size:
            raise ServiceError(
                f"event_log: larger than {limits.max_event_log_size} bytes",
                "EVENT_LOG_TOO_LARGE",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
        banks: dict[str, dict[int, bytes]] = {}
        for bank in request.pcrs:
            if bank.bank in banks:
                raise ServiceError(f"pcrs.{bank.bank}: bank given twice", "MALFORMED")
            banks[bank.bank] = dict(bank.values)
        # Parse before consuming the nonce: malformed input loses nothing.
        evidence = parse_evidence(request.quote, request.signature, banks, limits)
        event_log = parse_event_log(request.event_log, limits) if request.event_log else None
        certified = None
        if request.HasField("certified_key"):
            ck = request.certified_key
            certified = parse_certified_key(
                ck.public, ck.certify_info, ck.certify_signature, limits
            )
        store = self.s.store.store
        now_ms = self.s.now_ms()
        nonce_hash = hashlib.sha256(request.nonce).digest()
        device, grant, policy, status = await self.s.store.fast(
            _attestation_context, self.s, request.device_id, nonce_hash, now_ms
        )
        previous = ClockState(**device.clock) if device.clock else None
        appraisal = appraise_quote(
            evidence,
            cached_public(device.ak_public),
            nonce=request.nonce,
            policy=policy,
            previous=previous,
            now_ms=now_ms,
            event_log=event_log,
        )
        verdict = replace(appraisal.verdict, policy_version=grant.policy_version)
        ak = cached_public(device.ak_public)
        if certified is not None and verdict.affirming:
            bad = check_certified_key(certified, ak, request.nonce)
            if bad is not None:
                verdict = with_failures(verdict, (bad,), instance_identity=UNTRUSTWORTHY_INSTANCE)
        if status.revoked and verdict.affirming:
            verdict = with_failures(
                verdict,
                (
                    Failure(
                        Code.DEVICE_REVOKED,
                        "device",
                        "admitted",
                        "revoked",
                        f"revoked by an admin ({status.revocation_reason}); no credential "
                        "until the device is readmitted",
                    ),
                ),
                instance_identity=UNTRUSTWORTHY_INSTANCE,
            )
        response = attestation_pb2.AttestResponse(verdict=verdict_pb(verdict, device.device_id))
        issued = None
        if verdict.affirming:
            issued = self._issue(verdict, device.device_id, request.nonce, certified, now_ms)
            response.credential = issued.token
            response.credential_expires_at_ms = issued.record.expires_at_ms
            response.client_certificate = issued.certificate
        record = _record(
            device.device_id,
            verdict,
            appraisal,
            bytes(request.event_log),
            issued.record if issued else None,
        )
        with claimed_audit(self.s, response) as audit:
            await self.s.store.fast(
                store.record_attestation,
                record,
                _clock_dict(appraisal.accepted_clock),
                audit,
                NonceUse(nonce_hash, now_ms),
            )
        self.s.notify()
        log.info(
            "attestation device=%s status=%s failures=%s",
            device.device_id,
            verdict.status.value,
            ",".join(verdict.codes()) or "-",
        )
        return response

    def _issue(
        self,
        verdict: Verdict,
        device_id: str,
        nonce: bytes,
        certified: CertifyEvidence | None,
        now_ms: int,
    ) -> Issued:
        """The session credential (and, for a certified key, its client certificate)."""
        now_s = now_ms // 1000
        lifetime = self.s.config.credential_lifetime_s
        extra: dict[str, object] = {}
        certificate = b""
        serial = fingerprint = ""
        if certified is not None:
            key = certified.public.public_key
            cert = self.s.ca.issue(key, device_id, now_s, now_s + lifetime)
            certificate = cert.public_bytes(serialization.Encoding.DER)
            serial = format(cert.serial_number, "x")
            fingerprint = _spki_sha256(key)
            # RFC 7800 proof-of-possession: the credential is only good with this key.
            extra["cnf"] = {
                "jwk": jwk_of(key),
                "x5t#S256": b64url(hashlib.sha256(certificate).digest()),
            }
        signer = self.s.keyring.current
        cred = issue_credential(
            verdict,
            device_id=device_id,
            nonce=nonce,
            key=signer.key,
            now_s=now_s,
            lifetime_s=lifetime,
            extra_claims=extra,
        )
        record = CredentialRecord(
            jti=str(cred.claims["jti"]),
            device_id=device_id,
            kid=signer.kid,
            cert_serial=serial,
            issued_at_ms=now_ms,
            expires_at_ms=cred.expires_at_ms,
            key_fingerprint=fingerprint,
        )
        return Issued(cred.token, certificate, record)


def _grant_nonce(
    store: Store, config: ServerConfig, device_id: str, nonce_hash: bytes, now_ms: int
) -> tuple[GroupChoice, PolicyRecord | None, NonceGrant | None]:
    """In one store hand-off: the device and its policy (read in one snapshot), then the
    nonce stored."""
    with store.snapshot():
        device = store.get_device(device_id)
        choice, record = effective_policy_in_store(store, config, device)
    if record is None:
        return choice, None, None
    grant = NonceGrant(
        device_id=device_id,
        expires_at_ms=now_ms + config.nonce_ttl_s * 1000,
        policy_name=record.name,
        policy_version=record.version,
    )
    store.put_nonce(nonce_hash, grant, now_ms, config.max_outstanding_nonces)
    return choice, record, grant


def _attestation_context(
    state: ServiceState, device_id: str, nonce_hash: bytes, now_ms: int
) -> tuple[Device, NonceGrant, Policy, DeviceStatus]:
    """In one store hand-off and one snapshot: the device, its nonce's grant (checked
    usable here, spent with the verdict's record), the policy the nonce pinned (parsed
    once per version), the device's revocation status."""
    store = state.store.store
    with store.snapshot():
        device = store.get_device(device_id)
        grant = store.check_nonce(nonce_hash, device_id, now_ms)
        policy = state.cached_policy(grant.policy_name, grant.policy_version)
        if policy is None:
            policy = state.policy_of(store.get_policy(grant.policy_name, grant.policy_version))
        return device, grant, policy, store.device_status(device_id)


@dataclass(frozen=True)
class Issued:
    token: str
    certificate: bytes  # DER, or b"" without a bound key
    record: CredentialRecord


def _spki_sha256(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _clock_dict(state: ClockState | None) -> dict[str, int] | None:
    if state is None:
        return None
    return {
        "reset_count": state.reset_count,
        "restart_count": state.restart_count,
        "clock": state.clock,
        "firmware_version": state.firmware_version,
    }


def _record(
    device_id: str,
    verdict: Verdict,
    appraisal: Appraisal,
    event_log: bytes,
    credential: CredentialRecord | None,
) -> AttestationRecord:
    attest = appraisal.evidence.attest
    return AttestationRecord(
        device_id=device_id,
        at_ms=verdict.appraised_at_ms,
        status=verdict.status.value,
        failures=[f.as_dict() for f in verdict.failures],
        warnings=[f.as_dict() for f in verdict.warnings],
        trust_vector=verdict.trust_vector.as_ear(),
        policy_name=verdict.policy_name,
        policy_version=verdict.policy_version,
        clock=_clock_dict(ClockState.of(attest)) or {},
        pcrs={
            bank.value: {str(i): d.hex() for i, d in sorted(vals.items())}
            for bank, vals in appraisal.evidence.pcrs.items()
        },
        credential_expires_at_ms=credential.expires_at_ms if credential else 0,
        boot_state=appraisal.boot_state,
        values_verified=appraisal.values_verified,
        event_log=event_log,
        credential=credential,
    )


def record_verdict_pb(record: AttestationRecord) -> common_pb2.Verdict:
    """The stored form of an appraisal, back as the API's Verdict."""
    tv = record.trust_vector
    return common_pb2.Verdict(
        status=_STATUS[record.status],
        trust_vector=common_pb2.TrustVector(**{name: tv.get(ear, 0) for name, ear in _CLAIMS}),
        failures=[common_pb2.Failure(**f) for f in record.failures],
        warnings=[common_pb2.Failure(**f) for f in record.warnings],
        device_id=record.device_id,
        policy_name=record.policy_name,
        policy_version=record.policy_version,
        appraised_at_ms=record.at_ms,
    )
