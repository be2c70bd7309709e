"""The device side of enrollment and boot attestation, over gRPC.

State kept between boots (``--state-dir``), every file 0600:

- ``device.json``: the device id;
- ``tls-key.pem``: the TLS client key, a TSS2 PRIVATE KEY (made once, reused
  on every boot; its private part is wrapped by the TPM, usable only there,
  through the tpm2-openssl provider);
- ``credential.jwt``: the latest session credential;
- ``client-cert.pem``: the X.509 client certificate attestd issued for the TLS
  key with that credential.

The AK itself stays inside the TPM, persisted at a handle.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tpm2_pytss.constants import ESYS_TR

from attestd.agent.tpm import (
    DEFAULT_AK_HANDLE,
    AgentError,
    CertifiedKey,
    DeviceTpm,
    KeyUnusableError,
    tls_key_problem,
)
from attestd.connect import Connection, open_channel
from attestd.core.ear import decode_unverified
from attestd.core.tpm import parse_public
from attestd.privatefile import write_private
from attestd.v1 import (
    attestation_pb2,
    attestation_pb2_grpc,
    common_pb2,
    enrollment_pb2,
    enrollment_pb2_grpc,
)

log = logging.getLogger("attestd.agent")

TLS_KEY_FILE = "tls-key.pem"
CLIENT_CERT_FILE = "client-cert.pem"
CREDENTIAL_FILE = "credential.jwt"
AFFIRMING = 2  # common_pb2 verdict status

# Failures worth trying again: the server or network away, a nonce that went stale.
# Anything else (unknown device, refused, malformed) would fail the same way again.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)


class NotAffirmingError(AgentError):
    """The verifier kept answering with a verdict other than affirming."""

    def __init__(self, message: str, response: attestation_pb2.AttestResponse) -> None:
        super().__init__(message)
        self.response = response


@dataclass(frozen=True)
class AgentConfig:
    server: str
    tcti: str
    state_dir: Path
    ak_handle: int = DEFAULT_AK_HANDLE
    ek_type: str = "rsa"
    timeout_s: float = 30.0
    # The CA that signed attestd's TLS certificate (None: the system's roots).
    ca_cert: Path | None = None
    # Plaintext, for a server run with --insecure only.
    insecure: bool = False


@dataclass(frozen=True)
class RenewalSchedule:
    """When the renewal loop attests again, and how it retries.

    Renew at ``fraction`` of the credential's lifetime, give or take ``jitter``
    of that (so a fleet booted together does not renew together). On failure,
    retry after ``backoff_s``, doubling up to ``backoff_max_s``; after
    ``retries`` failures in a row, give up.
    """

    fraction: float = 0.8
    jitter: float = 0.05
    retries: int = 5
    backoff_s: float = 2.0
    backoff_max_s: float = 300.0

    def renewal_delay(self, lifetime_s: float, rand: Callable[[], float] = random.random) -> float:
        """Seconds until the next renewal, for a credential valid ``lifetime_s`` from now."""
        spread = 1.0 + self.jitter * (2.0 * rand() - 1.0)
        return max(0.0, self.fraction * lifetime_s * spread)

    def retry_delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds before retry number ``failures`` (1, 2, …), jittered likewise."""
        base = min(self.backoff_max_s, self.backoff_s * 2.0 ** max(0, failures - 1))
        return max(0.0, base * (1.0 + self.jitter * (2.0 * rand() - 1.0)))


def credential_lifetime_s(response: attestation_pb2.AttestResponse, now_s: float) -> float | None:
    """How long the credential in ``response`` is good for, as seen from ``now_s``.

    The shorter of: its lifetime as issued (``exp - iat``, both the server's clock, so
    immune to skew) and the time left until ``credential_expires_at_ms`` by the local
    clock (shorter when the device's clock runs ahead). None without a credential.
    """
    if not response.credential:
        return None
    candidates: list[float] = []
    try:
        claims = decode_unverified(response.credential)
        candidates.append(float(claims["exp"]) - float(claims["iat"]))
    except (ValueError, KeyError, TypeError, IndexError):
        pass
    if response.credential_expires_at_ms:
        candidates.append(response.credential_expires_at_ms / 1000.0 - now_s)
    positive = [c for c in candidates if c > 0]
    return min(positive) if positive else None


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.c = config
        self.channel = open_channel(
            Connection(config.server, ca_cert=config.ca_cert, insecure=config.insecure)
        )

    def close(self) -> None:
        self.channel.close()

    @property
    def _state_file(self) -> Path:
        return self.c.state_dir / "device.json"

    @property
    def tls_key_path(self) -> Path:
        return self.c.state_dir / TLS_KEY_FILE

    @property
    def client_cert_path(self) -> Path:
        return self.c.state_dir / CLIENT_CERT_FILE

    @property
    def credential_path(self) -> Path:
        return self.c.state_dir / CREDENTIAL_FILE

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

    def attest(
        self, event_log: bytes = b"", *, bind_key: bool = True
    ) -> attestation_pb2.AttestResponse:
        """GetNonce -> quote the policy's selection over it -> Attest; keep the credential.

        With ``bind_key``, the TLS key (created on first use) is certified by the AK over
        the same nonce and sent along, so that attestd can bind the credential to it and
        issue a client certificate for it.
        """
        device_id = self.device_id()
        stub = attestation_pb2_grpc.AttestationStub(self.channel)
        grant = stub.GetNonce(
            attestation_pb2.GetNonceRequest(device_id=device_id), timeout=self.c.timeout_s
        )
        selection = [(s.bank, list(s.indices)) for s in grant.pcr_selection]
        certified: CertifiedKey | None = None
        with DeviceTpm(self.c.tcti) as tpm:
            quote = tpm.quote(selection, grant.nonce, self.c.ak_handle)
            if bind_key:
                certified = self._certify_tls_key(tpm, grant.nonce)
        request = attestation_pb2.AttestRequest(
            device_id=device_id,
            nonce=grant.nonce,
            quote=quote.attest,
            signature=quote.signature,
            pcrs=[common_pb2.PcrBank(bank=b, values=v) for b, v in quote.pcrs.items()],
            event_log=event_log,
        )
        if certified is not None:
            request.certified_key.CopyFrom(
                attestation_pb2.CertifiedKey(
                    public=certified.public,
                    certify_info=certified.certify_info,
                    certify_signature=certified.signature,
                )
            )
        response: attestation_pb2.AttestResponse = stub.Attest(request, timeout=self.c.timeout_s)
        if response.credential:
            self._keep(response, certified)
        return response

    # -- the TLS key -------------------------------------------------------

    @contextlib.contextmanager
    def _state_lock(self) -> Iterator[None]:
        """Serialize key creation and state writes between agents sharing a state dir."""
        self.c.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.c.state_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def tls_key(self, tpm: DeviceTpm) -> bytes:
        """The TLS key's TSS2 PEM: the saved one, or a new one made now and saved."""
        with self._state_lock():
            try:
                pem = self.tls_key_path.read_bytes()
            except FileNotFoundError:
                pem = None
            if pem is not None:
                problem = tls_key_problem(pem)
                if problem is None:
                    return pem
                log.warning("%s is unusable (%s); making a new key", self.tls_key_path, problem)
            return self._new_tls_key(tpm)

    def _new_tls_key(self, tpm: DeviceTpm) -> bytes:
        pem = tpm.create_tls_key()
        write_private(self.tls_key_path, pem)
        # A certificate for the previous key is of no use with this one.
        self.client_cert_path.unlink(missing_ok=True)
        log.info("created a new TLS key in the TPM, saved as %s", self.tls_key_path)
        return pem

    def _certify_tls_key(self, tpm: DeviceTpm, nonce: bytes) -> CertifiedKey:
        pem = self.tls_key(tpm)
        try:
            return tpm.certify_tls_key(pem, nonce, self.c.ak_handle)
        except KeyUnusableError as e:
            # The TPM no longer takes the saved key (say, its owner hierarchy was
            # cleared): it is lost for good, so make a new one once.
            log.warning("%s: %s; making a new key", self.tls_key_path, e)
            with self._state_lock():
                pem = self._new_tls_key(tpm)
            return tpm.certify_tls_key(pem, nonce, self.c.ak_handle)

    def _keep(
        self, response: attestation_pb2.AttestResponse, certified: CertifiedKey | None
    ) -> None:
        """Save the credential and, when one came, the client certificate (PEM)."""
        with self._state_lock():
            if response.client_certificate:
                pem = _client_cert_pem(response.client_certificate, certified)
                write_private(self.client_cert_path, pem)
            else:
                # The new credential is not bound to the key: drop a certificate that
                # belongs with an earlier one, so the files always go together.
                self.client_cert_path.unlink(missing_ok=True)
            write_private(self.credential_path, response.credential.encode())

    # -- the renewal loop --------------------------------------------------

    def run(
        self,
        event_log: bytes | Callable[[], bytes] = b"",
        *,
        bind_key: bool = True,
        stop: threading.Event | None = None,
        max_renewals: int | None = None,
        schedule: RenewalSchedule | None = None,
        on_attested: Callable[[attestation_pb2.AttestResponse, float | None], None] | None = None,
        clock: Callable[[], float] = time.time,
        wait: Callable[[float], bool] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> attestation_pb2.AttestResponse | None:
        """Attest, then again at about 80% of each credential's lifetime, until stopped.

        ``event_log`` is read anew for each attestation when it is a callable. After
        each affirming attestation ``on_attested(response, seconds_to_next)`` is
        called (``None``: this was the last). Returns the last affirming response,
        after ``max_renewals`` renewals (0: attest once) or when ``stop`` is set
        (``None`` if none was had yet).

        Failures (server unreachable, stale nonce, TPM errors, a verdict other than
        affirming) are retried with backoff; after ``schedule.retries`` in a row the
        last error is raised (NotAffirmingError for verdicts). Errors that would only
        repeat (unknown device, malformed or refused requests) are raised at once.
        ``clock``, ``wait`` (sleep for seconds; True when stopped) and ``rand`` are
        there for tests.
        """
        schedule = schedule or RenewalSchedule()
        stop = stop or threading.Event()
        sleep = wait or stop.wait
        read_log = event_log if callable(event_log) else (lambda: event_log)
        self.device_id()  # not enrolled: say so now, not after retries
        last: attestation_pb2.AttestResponse | None = None
        renewals = failures = 0
        while not stop.is_set():
            problem: Exception
            try:
                response = self.attest(read_log(), bind_key=bind_key)
            except grpc.RpcError as e:
                if not isinstance(e, grpc.Call) or e.code() not in RETRYABLE_CODES:
                    raise
                problem = e
            except KeyUnusableError:
                raise
            except AgentError as e:
                problem = e
            else:
                lifetime = credential_lifetime_s(response, clock())
                if response.verdict.status == AFFIRMING and lifetime is not None:
                    failures = 0
                    last = response
                    done = max_renewals is not None and renewals >= max_renewals
                    delay = None if done else schedule.renewal_delay(lifetime, rand)
                    log.info(
                        "attested (%s); credential good for %.0f s; %s",
                        "renewal" if renewals else "first",
                        lifetime,
                        "done" if delay is None else f"next renewal in {delay:.0f} s",
                    )
                    if on_attested is not None:
                        on_attested(response, delay)
                    if delay is None or sleep(delay):
                        return last
                    renewals += 1
                    continue
                problem = NotAffirmingError(_verdict_summary(response), response)
            failures += 1
            if failures > schedule.retries:
                log.error("giving up after %d failed attempts: %s", failures, _describe(problem))
                raise problem
            delay = schedule.retry_delay(failures, rand)
            log.warning(
                "attestation failed (%d of %d): %s; retrying in %.1f s",
                failures,
                schedule.retries + 1,
                _describe(problem),
                delay,
            )
            if sleep(delay):
                break
        return last


def _verdict_summary(response: attestation_pb2.AttestResponse) -> str:
    v = response.verdict
    names = {1: "none", 2: "affirming", 3: "warning", 4: "contraindicated"}
    codes = ", ".join(f.code for f in v.failures) or "no failures listed"
    return f"verdict {names.get(v.status, str(v.status))} ({codes})"


def _describe(e: Exception) -> str:
    if isinstance(e, grpc.Call):
        return f"{e.code().name}: {e.details()}"
    return str(e)


def _client_cert_pem(der: bytes, certified: CertifiedKey | None) -> bytes:
    """PEM of the issued certificate, refusing one that is not for the key we certified."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise AgentError(f"the client certificate attestd sent is not DER X.509: {e}") from None
    if certified is not None:
        ours = parse_public(certified.public, "tls key").public_key
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(serialization.Encoding.DER, spki) != ours.public_bytes(
            serialization.Encoding.DER, spki
        ):
            raise AgentError("the client certificate attestd sent is not for this device's key")
    return cert.public_bytes(serialization.Encoding.PEM)


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
