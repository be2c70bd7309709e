"""attestd.v1.Devices: an enrolled device and its latest verdict."""

from __future__ import annotations

import json
import logging

import grpc

from attestd.service.attestation import record_verdict_pb
from attestd.service.effective import effective_policy
from attestd.service.errors import ServiceError
from attestd.service.state import ServiceState
from attestd.v1 import enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger("attestd.devices")


class DevicesService(enrollment_pb2_grpc.DevicesServicer):
    def __init__(self, state: ServiceState) -> None:
        self.s = state

    async def GetDevice(
        self, request: enrollment_pb2.GetDeviceRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.DeviceInfo:
        if not request.device_id:
            raise ServiceError("device_id: required", "MALFORMED")
        store = self.s.store.store
        device = await self.s.store(store.get_device, request.device_id)
        latest = await self.s.store(store.latest_attestation, request.device_id)
        info = enrollment_pb2.DeviceInfo(
            device_id=device.device_id,
            ek_fingerprint=device.ek_fingerprint,
            ak_name=device.ak_name,
            enrolled_at_ms=device.enrolled_at_ms,
            activated_at_ms=device.activated_at_ms,
            ek_cert_issuer=device.facts.get("ek_cert_issuer", ""),
            ek_cert_serial=device.facts.get("ek_cert_serial", ""),
            tpm_manufacturer=device.facts.get("tpm_manufacturer", ""),
            tpm_model=device.facts.get("tpm_model", ""),
            tpm_version=device.facts.get("tpm_version", ""),
            name=device.facts.get("name", ""),
        )
        if latest is not None:
            info.latest_verdict.CopyFrom(record_verdict_pb(latest))
            info.credential_expires_at_ms = latest.credential_expires_at_ms
            if latest.boot_state is not None:
                info.boot_state_json = json.dumps(latest.boot_state, sort_keys=True)
        status = await self.s.store(store.device_status, device.device_id)
        info.revoked = status.revoked
        if status.revoked:
            info.revocation_reason = status.revocation_reason
            info.revoked_at_ms = status.revoked_at_ms
        # The live credential, not merely the latest issued one (revocation, failure and
        # expiry end it).
        live = status.live_expires_at_ms
        info.credential_expires_at_ms = live if live > self.s.now_ms() else 0
        choice, policy = await effective_policy(self.s, device)
        info.group = choice.group or ""
        info.group_source = choice.source
        if policy is not None:
            info.effective_policy_name = policy.name
            info.effective_policy_version = policy.version
        return info

    async def RevokeDevice(
        self, request: enrollment_pb2.RevokeDeviceRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.DeviceInfo:
        return await self._set_revoked(request.device_id, request.reason, revoked=True)

    async def ReadmitDevice(
        self, request: enrollment_pb2.ReadmitDeviceRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.DeviceInfo:
        return await self._set_revoked(request.device_id, request.reason, revoked=False)

    async def _set_revoked(
        self, device_id: str, reason: str, *, revoked: bool
    ) -> enrollment_pb2.DeviceInfo:
        if not device_id:
            raise ServiceError("device_id: required", "MALFORMED")
        reason = reason.strip()
        if not reason or len(reason) > 1024:
            raise ServiceError("reason: required, at most 1024 characters", "MALFORMED")
        store = self.s.store.store
        await self.s.store(store.set_revoked, device_id, revoked, reason, self.s.now_ms())
        self.s.notify()
        log.info("device %s device=%s", "revoked" if revoked else "readmitted", device_id)
        return await self.GetDevice(enrollment_pb2.GetDeviceRequest(device_id=device_id), None)
