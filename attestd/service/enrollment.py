"""attestd.v1.Enrollment: EK chain -> MakeCredential challenge -> activation."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import secrets

import grpc

from attestd.core.enroll import EnrollmentFacts, make_challenge, verify_enrollment
from attestd.service.errors import ServiceError
from attestd.service.state import ServiceState, cached_public
from attestd.store.base import Challenge, NotFound, Preregistration
from attestd.v1 import enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger("attestd.enrollment")


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(self, state: ServiceState) -> None:
        self.s = state

    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.EnrollResponse:
        now_ms = self.s.now_ms()
        facts = verify_enrollment(
            request.ek_certificate,
            list(request.ek_intermediates),
            request.ek_public,
            request.ak_public,
            self.s.ek_roots,
            datetime.datetime.fromtimestamp(now_ms / 1000, datetime.UTC),
            self.s.config.limits,
            self.s.ek_intermediates,
        )
        prereg = await self._admit(facts)
        secret = secrets.token_bytes(32)
        blob, encrypted = make_challenge(facts.ek, facts.ak.name, secret)
        challenge = Challenge(
            challenge_id=secrets.token_urlsafe(18),
            device_id=facts.device_id,
            ek_fingerprint=facts.ek_fingerprint,
            ek_public=facts.ek.tpm2b(),
            ek_certificate=bytes(request.ek_certificate),
            ak_public=facts.ak.tpm2b(),
            secret_hash=hashlib.sha256(secret).digest(),
            expires_at_ms=now_ms + self.s.config.challenge_ttl_s * 1000,
            facts={
                "ek_cert_issuer": facts.ek_cert_issuer,
                "ek_cert_serial": facts.ek_cert_serial,
                "tpm_manufacturer": facts.tpm_manufacturer,
                "tpm_model": facts.tpm_model,
                "tpm_version": facts.tpm_version,
                **({"name": prereg.name} if prereg is not None and prereg.name else {}),
                **({"preregistered_group": prereg.group} if prereg and prereg.group else {}),
            },
        )
        await self.s.store(self.s.store.store.put_challenge, challenge)
        log.info("enrollment challenge issued device=%s", facts.device_id)
        return enrollment_pb2.EnrollResponse(
            device_id=facts.device_id,
            challenge_id=challenge.challenge_id,
            credential_blob=blob,
            encrypted_secret=encrypted,
            expires_at_ms=challenge.expires_at_ms,
        )

    async def _admit(self, facts: EnrollmentFacts) -> Preregistration | None:
        """Admission control: with "preregistered", only devices an admin listed may enroll."""
        if self.s.config.admission != "preregistered":
            return None
        found = await self.s.store(
            self.s.store.store.find_preregistration,
            facts.ek_cert_serial,
            facts.ek_cert_issuer,
            facts.ek_fingerprint,
        )
        if found is None:
            log.info("enrollment refused: not pre-registered device=%s", facts.device_id)
            raise ServiceError(
                f"this TPM is not pre-registered (EK certificate serial {facts.ek_cert_serial},"
                f" issuer {facts.ek_cert_issuer}, EK public key SHA-256 {facts.ek_fingerprint});"
                " an admin must add it with `attestd device preregister`",
                "DEVICE_NOT_PREREGISTERED",
                grpc.StatusCode.PERMISSION_DENIED,
            )
        return found

    async def Activate(
        self, request: enrollment_pb2.ActivateRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.ActivateResponse:
        if not request.device_id:
            raise ServiceError("device_id: required", "MALFORMED")
        if not request.challenge_id:
            raise ServiceError("challenge_id: required", "MALFORMED")
        if len(request.secret) > 64:
            raise ServiceError("secret: longer than any credential attestd issues", "MALFORMED")
        store = self.s.store.store
        # Consumed before comparing: a wrong guess burns the challenge (single use).
        challenge = await self.s.store(
            store.consume_challenge, request.challenge_id, request.device_id, self.s.now_ms()
        )
        got = hashlib.sha256(request.secret).digest()
        if not hmac.compare_digest(got, challenge.secret_hash):
            log.info("activation refused device=%s", request.device_id)
            raise ServiceError(
                "the activation secret is wrong: the AK is not in the TPM that holds this EK",
                "ACTIVATION_SECRET_MISMATCH",
                grpc.StatusCode.PERMISSION_DENIED,
            )
        ak_name = cached_public(challenge.ak_public).name.hex()
        device = await self.s.store(store.activate_device, challenge, ak_name, self.s.now_ms())
        group = challenge.facts.get("preregistered_group", "")
        if group and await self.s.store(store.assigned_group, device.device_id) is None:
            # The manifest's group applies at first activation; authors may move it later.
            try:
                await self.s.store(store.assign_devices, group, [device.device_id])
            except NotFound:
                # Deleted since the manifest was loaded. The device is activated already:
                # failing now would leave the agent believing it is not, on every retry.
                log.warning(
                    "pre-registered group %r no longer exists; device=%s left unassigned",
                    group,
                    device.device_id,
                )
        log.info("device activated device=%s", device.device_id)
        return enrollment_pb2.ActivateResponse(device_id=device.device_id, ak_name=ak_name)
