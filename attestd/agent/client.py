"""The device side of enrollment and boot attestation, over gRPC.

State kept between boots (``--state-dir``): ``device.json`` with the device
id, and ``credential.jwt`` (0600) with the latest session credential. The AK
itself stays inside the TPM, persisted at a handle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from tpm2_pytss.constants import ESYS_TR

from attestd.agent.tpm import DEFAULT_AK_HANDLE, AgentError, DeviceTpm
from attestd.v1 import (
    attestation_pb2,
    attestation_pb2_grpc,
    common_pb2,
    enrollment_pb2,
    enrollment_pb2_grpc,
)


@dataclass(frozen=True)
class AgentConfig:
    server: str
    tcti: str
    state_dir: Path
    ak_handle: int = DEFAULT_AK_HANDLE
    ek_type: str = "rsa"
    timeout_s: float = 30.0


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (created 0600, replaced atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.c = config
        self.channel = grpc.insecure_channel(config.server)

    def close(self) -> None:
        self.channel.close()

    @property
    def _state_file(self) -> Path:
        return self.c.state_dir / "device.json"

    def device_id(self) -> str:
        try:
            return str(json.loads(self._state_file.read_text())["device_id"])
        except (OSError, ValueError, KeyError):
            raise AgentError(
                f"not enrolled yet (no {self._state_file}); run 'enroll' first"
            ) from None

    def enroll(
        self, *, new_ak: bool = False, ak_alg: str = "rsa", intermediates: Sequence[bytes] = ()
    ) -> enrollment_pb2.ActivateResponse:
        """Enroll (or re-enroll) this TPM: EK cert + EK + AK -> challenge -> ActivateCredential."""
        stub = enrollment_pb2_grpc.EnrollmentStub(self.channel)
        with DeviceTpm(self.c.tcti) as tpm:
            cert, ek_public = tpm.endorsement(self.c.ek_type)
            existing = None if new_ak else tpm.ak_public(self.c.ak_handle)
            if existing is not None:
                return self._enroll_with(
                    stub,
                    tpm,
                    cert,
                    ek_public,
                    existing,
                    tpm.persistent_ak(self.c.ak_handle),
                    intermediates,
                )
            with tpm.new_ak(ak_alg) as (ak, ak_public):
                done = self._enroll_with(stub, tpm, cert, ek_public, ak_public, ak, intermediates)
                # Only now, with the server holding the new AK, replace the old one.
                tpm.persist_ak(ak, self.c.ak_handle)
                return done

    def _enroll_with(
        self,
        stub: enrollment_pb2_grpc.EnrollmentStub,
        tpm: DeviceTpm,
        cert: bytes,
        ek_public: bytes,
        ak_public: bytes,
        ak: ESYS_TR,
        intermediates: Sequence[bytes],
    ) -> enrollment_pb2.ActivateResponse:
        challenge = stub.Enroll(
            enrollment_pb2.EnrollRequest(
                ek_certificate=cert,
                ek_public=ek_public,
                ak_public=ak_public,
                ek_intermediates=list(intermediates),
            ),
            timeout=self.c.timeout_s,
        )
        secret = tpm.activate(
            challenge.credential_blob, challenge.encrypted_secret, self.c.ek_type, ak=ak
        )
        done: enrollment_pb2.ActivateResponse = stub.Activate(
            enrollment_pb2.ActivateRequest(
                device_id=challenge.device_id, challenge_id=challenge.challenge_id, secret=secret
            ),
            timeout=self.c.timeout_s,
        )
        write_private(self._state_file, json.dumps({"device_id": done.device_id}).encode())
        return done

    def attest(self, event_log: bytes = b"") -> attestation_pb2.AttestResponse:
        """GetNonce -> quote the policy's selection over it -> Attest; keep the credential."""
        device_id = self.device_id()
        stub = attestation_pb2_grpc.AttestationStub(self.channel)
        grant = stub.GetNonce(
            attestation_pb2.GetNonceRequest(device_id=device_id), timeout=self.c.timeout_s
        )
        selection = [(s.bank, list(s.indices)) for s in grant.pcr_selection]
        with DeviceTpm(self.c.tcti) as tpm:
            quote = tpm.quote(selection, grant.nonce, self.c.ak_handle)
        response: attestation_pb2.AttestResponse = stub.Attest(
            attestation_pb2.AttestRequest(
                device_id=device_id,
                nonce=grant.nonce,
                quote=quote.attest,
                signature=quote.signature,
                pcrs=[common_pb2.PcrBank(bank=b, values=v) for b, v in quote.pcrs.items()],
                event_log=event_log,
            ),
            timeout=self.c.timeout_s,
        )
        if response.credential:
            write_private(self.c.state_dir / "credential.jwt", response.credential.encode())
        return response


def capture_policy(
    tcti: str, name: str, selection: Sequence[tuple[str, Sequence[int]]]
) -> dict[str, object]:
    """A policy document holding this device's current PCR values (golden capture)."""
    with DeviceTpm(tcti) as tpm:
        values = tpm.read_pcrs(selection)
    return {
        "name": name,
        "description": "captured from a known-good device",
        "allow_sha1": "sha1" in values,
        "pcrs": {bank: {i: d.hex() for i, d in sorted(v.items())} for bank, v in values.items()},
    }
