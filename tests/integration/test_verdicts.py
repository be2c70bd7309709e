"""What a gateway sees: key-bound credentials, their checks, revocation, the verdict feed, keys.

Everything goes through the real server (and the real ``attestd`` CLI where a
command exists). Evidence is made by hand on the device's (simulated) TPM:
a quote over the granted nonce and, for key binding, a fresh ECDSA key
certified by the enrolled AK (TPM2_Certify), so these tests do not depend on
the agent's own key handling.

Tests that only add attestations share one module-wide server and two
devices (``rig``); tests that revoke, tamper, watch the event feed, rotate
keys or depend on the credential lifetime get their own server.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import json
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from testclients import cli_env
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMT_PUBLIC, TPMT_SIG_SCHEME
from tpmsim import Manufacturer

from attestd.agent.client import Agent
from attestd.agent.tpm import DeviceTpm
from attestd.tlsinit import TlsFiles
from attestd.v1 import attestation_pb2, common_pb2, enrollment_pb2, keys_pb2, verdicts_pb2

if TYPE_CHECKING:
    from conftest import Device, ServerThread

pytestmark = pytest.mark.integration

AFFIRMING = common_pb2.VERDICT_STATUS_AFFIRMING
CONTRAINDICATED = common_pb2.VERDICT_STATUS_CONTRAINDICATED
VALID = verdicts_pb2.CREDENTIAL_STATE_VALID
AFFIRMED_EVENT = verdicts_pb2.VERDICT_EVENT_KIND_AFFIRMED
FAILED_EVENT = verdicts_pb2.VERDICT_EVENT_KIND_FAILED
REVOKED_EVENT = verdicts_pb2.VERDICT_EVENT_KIND_REVOKED
READMITTED_EVENT = verdicts_pb2.VERDICT_EVENT_KIND_READMITTED
UNTRUSTWORTHY_INSTANCE = 96  # AR4SI instance-identity tier of a refused key
LIFETIME_S = 3600  # ServerConfig's default credential lifetime

# A plain signing key that never leaves the TPM: what attestd binds credentials to.
PLAIN_KEY = (
    TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
KEY_ALG = "ecc256:ecdsa-sha256"


# -- base64url and an independent ES256 (not attestd.core.ear) -------------------------


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    head, body, sig = token.split(".")
    return json.loads(b64u_decode(head)), json.loads(b64u_decode(body)), b64u_decode(sig)


def es256_sign(
    header: dict[str, Any], claims: dict[str, Any], key: ec.EllipticCurvePrivateKey
) -> str:
    signing_input = b64u(json.dumps(header).encode()) + "." + b64u(json.dumps(claims).encode())
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return signing_input + "." + b64u(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def ec_key_of_jwk(jwk: dict[str, str]) -> ec.EllipticCurvePublicKey:
    assert (jwk["kty"], jwk["crv"]) == ("EC", "P-256"), jwk
    return ec.EllipticCurvePublicNumbers(
        int.from_bytes(b64u_decode(jwk["x"]), "big"),
        int.from_bytes(b64u_decode(jwk["y"]), "big"),
        ec.SECP256R1(),
    ).public_key()


def es256_verify(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """Offline, as a gateway would: the JWKS key named by kid, then the signature."""
    header, claims, sig = jwt_parts(token)
    assert header["alg"] == "ES256"
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    head, body, _ = token.split(".")
    ec_key_of_jwk(jwk).verify(der, f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
    return claims


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 kid of an EC JWK."""
    members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return b64u(hashlib.sha256(canonical).digest())


def ec_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    nums = key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64u(nums.x.to_bytes(32, "big")),
        "y": b64u(nums.y.to_bytes(32, "big")),
    }


def flip_b64(text: str, index: int) -> str:
    """``text`` (base64url) with one bit of decoded byte ``index`` flipped."""
    raw = bytearray(b64u_decode(text))
    raw[index] ^= 0x01
    return b64u(bytes(raw))


# -- keys in the device's TPM, certified by its AK --------------------------------------


def create_key(t: DeviceTpm, attrs: TPMA_OBJECT, alg: str) -> tuple[ESYS_TR, bytes]:
    """A new primary key in the owner hierarchy: (handle, TPM2B_PUBLIC). Flush it."""
    template = TPMT_PUBLIC.parse(alg=alg, objectAttributes=attrs)
    # A new key each time, not one re-derived from the template.
    if alg.startswith("rsa"):
        template.unique.rsa = secrets.token_bytes(256)
    else:
        template.unique.ecc.x = secrets.token_bytes(32)
    handle, public, _, _, _ = t.ectx.create_primary(
        TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=template), ESYS_TR.OWNER
    )
    return handle, bytes(public.marshal())


def certified_key(
    tcti: str, nonce: bytes, attrs: TPMA_OBJECT = PLAIN_KEY, alg: str = KEY_ALG
) -> attestation_pb2.CertifiedKey:
    """A new key in the TPM at ``tcti``, TPM2_Certify'd by that TPM's AK over ``nonce``."""
    with DeviceTpm(tcti) as t:
        handle, public = create_key(t, attrs, alg)
        try:
            attest, signature = t.ectx.certify(
                handle,
                t.persistent_ak(),
                nonce,
                TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                session1=ESYS_TR.PASSWORD,
                session2=ESYS_TR.PASSWORD,
            )
        finally:
            t.ectx.flush_context(handle)
    return attestation_pb2.CertifiedKey(
        public=public, certify_info=bytes(attest), certify_signature=bytes(signature.marshal())
    )


def tpm_key_point(public: bytes) -> tuple[bytes, bytes]:
    area = TPM2B_PUBLIC.unmarshal(public)[0].publicArea
    return bytes(area.unique.ecc.x).rjust(32, b"\0"), bytes(area.unique.ecc.y).rjust(32, b"\0")


def tpm_key_jwk(public: bytes) -> dict[str, str]:
    x, y = tpm_key_point(public)
    return {"kty": "EC", "crv": "P-256", "x": b64u(x), "y": b64u(y)}


def tpm_key_public(public: bytes) -> ec.EllipticCurvePublicKey:
    x, y = tpm_key_point(public)
    return ec.EllipticCurvePublicNumbers(
        int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
    ).public_key()


# -- attestation by hand ----------------------------------------------------------------

# (device, granted nonce) -> the certified key to send, or None for none.
KeyMaker = Callable[["Device", bytes], "attestation_pb2.CertifiedKey | None"]


def good_key(dev: Device, nonce: bytes) -> attestation_pb2.CertifiedKey:
    return certified_key(dev.tpm.tcti, nonce)


def grant_for(dev: Device) -> attestation_pb2.GetNonceResponse:
    grant: attestation_pb2.GetNonceResponse = dev.server.attestation.GetNonce(
        attestation_pb2.GetNonceRequest(device_id=dev.device_id)
    )
    return grant


def attest(
    dev: Device,
    make_key: KeyMaker | None = good_key,
    grant: attestation_pb2.GetNonceResponse | None = None,
) -> tuple[attestation_pb2.AttestResponse, attestation_pb2.CertifiedKey | None]:
    """GetNonce (unless given); quote the granted PCRs over it (and certify a key); Attest."""
    grant = grant or grant_for(dev)
    key = make_key(dev, grant.nonce) if make_key is not None else None
    with DeviceTpm(dev.tpm.tcti) as t:
        q = t.quote([(s.bank, list(s.indices)) for s in grant.pcr_selection], grant.nonce)
    request = attestation_pb2.AttestRequest(
        device_id=dev.device_id,
        nonce=grant.nonce,
        quote=q.attest,
        signature=q.signature,
        pcrs=[common_pb2.PcrBank(bank=b, values=v) for b, v in q.pcrs.items()],
    )
    if key is not None:
        request.certified_key.CopyFrom(key)
    response: attestation_pb2.AttestResponse = dev.server.attestation.Attest(request)
    return response, key


def affirm(dev: Device, make_key: KeyMaker | None = good_key) -> attestation_pb2.AttestResponse:
    response, _ = attest(dev, make_key)
    assert response.verdict.status == AFFIRMING, [f.code for f in response.verdict.failures]
    assert response.credential
    return response


def assert_refused(response: attestation_pb2.AttestResponse, code: str) -> common_pb2.Failure:
    """Contraindicated for exactly ``code``; no credential, no client certificate."""
    codes = [f.code for f in response.verdict.failures]
    assert response.verdict.status == CONTRAINDICATED, codes
    assert codes == [code]
    assert response.credential == ""
    assert response.credential_expires_at_ms == 0
    assert response.client_certificate == b""
    failure: common_pb2.Failure = response.verdict.failures[0]
    return failure


def verify(
    server: ServerThread, *, token: str = "", certificate: bytes = b"", device_id: str = ""
) -> verdicts_pb2.VerifyCredentialResponse:
    if certificate:
        request = verdicts_pb2.VerifyCredentialRequest(certificate=certificate, device_id=device_id)
    else:
        request = verdicts_pb2.VerifyCredentialRequest(token=token, device_id=device_id)
    response: verdicts_pb2.VerifyCredentialResponse = server.verdicts.VerifyCredential(request)
    return response


def state_of(response: verdicts_pb2.VerifyCredentialResponse) -> tuple[str, str]:
    """(state name, reason code) of a VerifyCredential answer."""
    name = verdicts_pb2.CredentialState.Name(response.state).removeprefix("CREDENTIAL_STATE_")
    return name, response.reason.split(":", 1)[0]


def both_states(
    server: ServerThread, response: attestation_pb2.AttestResponse, device_id: str = ""
) -> list[tuple[str, str]]:
    """state_of for the response's token and then its client certificate."""
    return [
        state_of(verify(server, token=response.credential, device_id=device_id)),
        state_of(verify(server, certificate=response.client_certificate, device_id=device_id)),
    ]


def trust_bundle(server: ServerThread) -> verdicts_pb2.TrustBundle:
    bundle: verdicts_pb2.TrustBundle = server.verdicts.GetTrustBundle(
        verdicts_pb2.GetTrustBundleRequest()
    )
    return bundle


def get_verdict(server: ServerThread, device_id: str) -> verdicts_pb2.DeviceVerdict:
    out: verdicts_pb2.DeviceVerdict = server.verdicts.GetVerdict(
        verdicts_pb2.GetVerdictRequest(device_id=device_id)
    )
    return out


def revoke(server: ServerThread, device_id: str, reason: str) -> None:
    server.devices.RevokeDevice(
        enrollment_pb2.RevokeDeviceRequest(device_id=device_id, reason=reason)
    )


def readmit(server: ServerThread, device_id: str, reason: str) -> None:
    server.devices.ReadmitDevice(
        enrollment_pb2.ReadmitDeviceRequest(device_id=device_id, reason=reason)
    )


def cli(
    *args: str, server: ServerThread, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed ``attestd ARGS --server ADDR``, as a user runs it (``stdin`` fed to it)."""
    exe = Path(sys.executable).parent / "attestd"
    argv = (*args, "--server", server.address)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTESTD_")}
    return subprocess.run(
        [str(exe), *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env=env | cli_env(argv),
        timeout=60,
        check=False,
    )


def rpc_code(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """(status, attestd-code) of a failed call."""
    assert isinstance(exc, grpc.Call)
    return exc.code(), dict(exc.trailing_metadata() or ()).get("attestd-code", "")


def integration_conftest(config: pytest.Config) -> ModuleType:
    """tests/integration/conftest.py, as pytest loaded it.

    Conftests outside packages are all named ``conftest``: collected together with
    tests/unit (``pytest tests/integration/x.py tests/unit/...``), ``from conftest import``
    finds tests/unit's. So its classes are taken from pytest's own plugin instead.
    """
    path = Path(__file__).with_name("conftest.py").resolve()
    for plugin in config.pluginmanager.get_plugins():
        file = getattr(plugin, "__file__", None)
        if isinstance(plugin, ModuleType) and file and Path(file).resolve() == path:
            return plugin
    raise AssertionError(f"{path} is not loaded")


# -- the verdict feed -------------------------------------------------------------------


class Watcher:
    """A WatchVerdicts stream read on a thread into a queue."""

    def __init__(self, server: ServerThread, after: int = 0, devices: tuple[str, ...] = ()) -> None:
        self.call = server.verdicts.WatchVerdicts(
            verdicts_pb2.WatchVerdictsRequest(after_cursor=after, device_ids=list(devices))
        )
        self.events: queue.Queue[verdicts_pb2.VerdictEvent | BaseException] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.events.put(e)

    def take(self, n: int, timeout_s: float = 5.0) -> list[verdicts_pb2.VerdictEvent]:
        """The next ``n`` events, each within ``timeout_s``."""
        got: list[verdicts_pb2.VerdictEvent] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < n:
            try:
                item = self.events.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"{len(got)} of {n} events arrived: {describe(got)}") from None
            if isinstance(item, BaseException):
                raise item
            got.append(item)
        return got

    def assert_quiet(self, seconds: float = 0.8) -> None:
        """No further event within ``seconds`` (longer than the server's 0.5 s poll)."""
        try:
            item = self.events.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected event: {item}")

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(5)


@pytest.fixture
def watchers() -> Iterator[Callable[..., Watcher]]:
    made: list[Watcher] = []

    def make(server: ServerThread, after: int = 0, devices: tuple[str, ...] = ()) -> Watcher:
        w = Watcher(server, after, devices)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def describe(events: list[verdicts_pb2.VerdictEvent]) -> list[tuple[int, str, str, str, str]]:
    return [
        (
            e.cursor,
            verdicts_pb2.VerdictEventKind.Name(e.kind).removeprefix("VERDICT_EVENT_KIND_"),
            e.device_id,
            e.status,
            e.reason,
        )
        for e in events
    ]


def kinds(events: list[verdicts_pb2.VerdictEvent]) -> list[tuple[str, str]]:
    return [(k, d) for _, k, d, _, _ in describe(events)]


# -- the shared rig ---------------------------------------------------------------------


@dataclasses.dataclass
class Rig:
    server: ServerThread
    dev: Device  # its boot is the server's golden 'default' policy
    dev2: Device  # another enrolled TPM, booted the same way


def _make_device(ct: ModuleType, maker: Manufacturer, server: ServerThread, where: Path) -> Device:
    tpm = maker.make_tpm(where / "tpm")
    tpm.start()
    tpm.boot()
    agent = Agent(server.agent_config(tpm.tcti, where / "agent"))
    agent.enroll()
    device: Device = ct.Device(tpm, agent, server, where / "agent")
    return device


@pytest.fixture(scope="module")
def rig(
    manufacturer: Manufacturer,
    tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
    tls_files: TlsFiles,
) -> Iterator[Rig]:
    ct = integration_conftest(pytestconfig)
    root = tmp_path_factory.mktemp("verdicts-rig")
    server: ServerThread = ct.ServerThread(
        ct.server_config(root / "server", manufacturer, tls_files), tls_files
    )
    devices: list[Device] = []
    try:
        devices.append(_make_device(ct, manufacturer, server, root / "dev1"))
        devices.append(_make_device(ct, manufacturer, server, root / "dev2"))
        server.put_policy(devices[0].golden_policy())
        yield Rig(server, devices[0], devices[1])
    finally:
        for d in devices:
            d.agent.close()
            d.tpm.stop()
        server.stop()


@pytest.fixture
def rewound(rig: Rig) -> Iterator[Callable[[float], None]]:
    """rewind(seconds): move the rig's clock back; put forward again at teardown."""
    total = 0.0

    def rewind(seconds: float) -> None:
        nonlocal total
        total += seconds
        rig.server.advance(-seconds)

    yield rewind
    rig.server.advance(total)


# == key-bound credentials ==============================================================


def test_key_bound_credential_and_client_certificate(rig: Rig) -> None:
    response, key = attest(rig.dev)
    assert response.verdict.status == AFFIRMING and key is not None
    header, claims, _ = jwt_parts(response.credential)
    cert_der = response.client_certificate
    cert = x509.load_der_x509_certificate(cert_der)

    # The credential is bound to the certified key (RFC 7800) and to this certificate.
    assert claims["cnf"] == {
        "jwk": tpm_key_jwk(key.public),
        "x5t#S256": b64u(hashlib.sha256(cert_der).digest()),
    }
    assert claims["sub"] == rig.dev.device_id
    assert claims["exp"] * 1000 == response.credential_expires_at_ms
    assert claims["exp"] - claims["iat"] == LIFETIME_S

    # The certificate: the TPM key, the device id in CN and SAN URI, the JWT's lifetime.
    assert cert.public_key() == tpm_key_public(key.public)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == [rig.dev.device_id]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [f"urn:attestd:device:{rig.dev.device_id}"]
    assert san.get_values_for_type(x509.DNSName) == []
    assert cert.not_valid_before_utc.timestamp() == claims["iat"]
    assert cert.not_valid_after_utc.timestamp() == claims["exp"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    # It chains to the CA the trust bundle publishes (RFC 5280 path validation), and the
    # token verifies offline with the bundle's JWKS.
    bundle = trust_bundle(rig.server)
    cas = x509.load_pem_x509_certificates(bundle.ca_certificates_pem.encode())
    cert.verify_directly_issued_by(cas[0])
    verifier = (
        PolicyBuilder()
        .store(Store(cas))
        .time(datetime.datetime.fromtimestamp(claims["iat"] + 1, datetime.UTC))
        .build_client_verifier()
    )
    verified = verifier.verify(cert, [])
    assert verified.chain[0] == cert and verified.chain[-1] in cas
    assert es256_verify(response.credential, json.loads(bundle.jwks)) == claims

    # And attestd says both are valid, for this device.
    device_id = rig.dev.device_id
    for answer in (
        verify(rig.server, token=response.credential, device_id=device_id),
        verify(rig.server, certificate=cert_der, device_id=device_id),
    ):
        assert answer.state == VALID, answer.reason
        assert answer.reason == ""
        assert answer.device_id == rig.dev.device_id
        assert answer.expires_at_ms == response.credential_expires_at_ms
    assert verify(rig.server, token=response.credential).credential_id == claims["jti"]
    pem = cert.public_bytes(serialization.Encoding.PEM)
    answer = verify(rig.server, certificate=pem)
    assert answer.state == VALID, answer.reason
    assert answer.credential_id == format(cert.serial_number, "x")
    assert header["kid"] in {k["kid"] for k in json.loads(bundle.jwks)["keys"]}


def test_rsa_key_is_bound_too(rig: Rig) -> None:
    def rsa_key(dev: Device, nonce: bytes) -> attestation_pb2.CertifiedKey:
        return certified_key(dev.tpm.tcti, nonce, alg="rsa2048:rsassa-sha256")

    response, key = attest(rig.dev, rsa_key)
    assert response.verdict.status == AFFIRMING and key is not None
    area = TPM2B_PUBLIC.unmarshal(key.public)[0].publicArea
    modulus = bytes(area.unique.rsa)
    cnf = jwt_parts(response.credential)[1]["cnf"]
    assert cnf["jwk"] == {"kty": "RSA", "n": b64u(modulus), "e": "AQAB"}
    cert = x509.load_der_x509_certificate(response.client_certificate)
    assert cert.public_key().public_numbers().n == int.from_bytes(modulus, "big")  # type: ignore[union-attr]
    assert both_states(rig.server, response) == [("VALID", ""), ("VALID", "")]


def test_credential_without_a_certified_key_is_unbound(rig: Rig) -> None:
    response = affirm(rig.dev, make_key=None)
    _, claims, _ = jwt_parts(response.credential)
    assert "cnf" not in claims
    assert response.client_certificate == b""
    assert state_of(verify(rig.server, token=response.credential)) == ("VALID", "")


def test_each_attestation_binds_its_own_key_and_certificate(rig: Rig) -> None:
    first, second = affirm(rig.dev), affirm(rig.dev)
    cnf1, cnf2 = (jwt_parts(r.credential)[1]["cnf"] for r in (first, second))
    assert cnf1["jwk"] != cnf2["jwk"] and cnf1["x5t#S256"] != cnf2["x5t#S256"]
    serials = {
        x509.load_der_x509_certificate(r.client_certificate).serial_number for r in (first, second)
    }
    assert len(serials) == 2
    # A newer affirming attestation does not end the older credential.
    assert both_states(rig.server, first) == [("VALID", ""), ("VALID", "")]


# == refusals of a credential ============================================================


def _tamper_payload(token: str) -> str:
    head, body, sig = token.split(".")
    claims = json.loads(b64u_decode(body))
    claims["exp"] += 86400
    return f"{head}.{b64u(json.dumps(claims).encode())}.{sig}"


def _tamper_signature(token: str) -> str:
    head, body, sig = token.split(".")
    return f"{head}.{body}.{flip_b64(sig, 10)}"


def _tamper_signature_s(token: str) -> str:
    head, body, sig = token.split(".")
    return f"{head}.{body}.{flip_b64(sig, 63)}"


def _forge_with_real_kid(token: str) -> str:
    header, claims, _ = jwt_parts(token)
    return es256_sign(header, claims, ec.generate_private_key(ec.SECP256R1()))


def _alg_none(token: str) -> str:
    header, claims, _ = jwt_parts(token)
    head = b64u(json.dumps(header | {"alg": "none"}).encode())
    return f"{head}.{b64u(json.dumps(claims).encode())}."


def _truncate_signature(token: str) -> str:
    head, body, sig = token.split(".")
    return f"{head}.{body}.{b64u(b64u_decode(sig)[:32])}"


@pytest.mark.parametrize(
    "tamper",
    [
        _tamper_payload,
        _tamper_signature,
        _tamper_signature_s,
        _forge_with_real_kid,
        _alg_none,
        _truncate_signature,
    ],
    ids=[
        "payload",
        "signature-r",
        "signature-s",
        "another-key-same-kid",
        "alg-none",
        "short-signature",
    ],
)
def test_tampered_token_has_a_bad_signature(rig: Rig, tamper: Callable[[str], str]) -> None:
    response = affirm(rig.dev)
    assert state_of(verify(rig.server, token=response.credential)) == ("VALID", "")
    answer = verify(rig.server, token=tamper(response.credential))
    assert state_of(answer) == ("INVALID", "BAD_SIGNATURE"), answer.reason
    assert answer.device_id == ""  # nothing read from an unverified token


@pytest.mark.parametrize("kid", ["made-up-kid", None], ids=["made-up", "thumbprint"])
def test_token_signed_by_an_unknown_key(rig: Rig, kid: str | None) -> None:
    response = affirm(rig.dev)
    _, claims, _ = jwt_parts(response.credential)
    key = ec.generate_private_key(ec.SECP256R1())
    header = {"alg": "ES256", "typ": "JWT", "kid": kid or thumbprint(ec_jwk(key.public_key()))}
    answer = verify(rig.server, token=es256_sign(header, claims, key))
    assert state_of(answer) == ("INVALID", "UNKNOWN_KEY_ID"), answer.reason


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c.d",
        "!!!.???.***",
        b64u(b"not json") + ".e30.c2ln",
        b64u(b'{"alg":"ES256","typ":"JWT"}') + ".e30.c2ln",  # no kid
        b64u(b'["kid"]') + ".e30.c2ln",
        b64u(b'"kid"') + ".e30.c2ln",
        b64u(b"\xff\xfe") + ".e30.c2ln",
        "x" * 20000 + "." + "y.z",
    ],
    ids=[
        "empty",
        "garbage",
        "two-parts",
        "four-parts",
        "not-base64",
        "header-not-json",
        "no-kid",
        "header-list",
        "header-string",
        "header-not-utf8",
        "too-long",
    ],
)
def test_garbage_is_a_malformed_token(rig: Rig, token: str) -> None:
    answer = verify(rig.server, token=token)
    assert state_of(answer) == ("INVALID", "MALFORMED_TOKEN"), answer.reason


@pytest.mark.parametrize(
    "data",
    [
        b"garbage",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"\x30\x03\x02\x01\x01",
        b"\x30" * 20000,
    ],
    ids=["garbage", "bad-pem", "bad-der", "too-large"],
)
def test_garbage_is_a_malformed_certificate(rig: Rig, data: bytes) -> None:
    answer = verify(rig.server, certificate=data)
    assert state_of(answer) == ("INVALID", "MALFORMED_CERTIFICATE"), answer.reason


def test_verify_needs_a_credential(rig: Rig) -> None:
    with pytest.raises(grpc.RpcError) as info:
        rig.server.verdicts.VerifyCredential(verdicts_pb2.VerifyCredentialRequest())
    assert rpc_code(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED")


def test_credential_presented_for_another_device(rig: Rig) -> None:
    response = affirm(rig.dev)
    assert both_states(rig.server, response, device_id=rig.dev2.device_id) == [
        ("INVALID", "WRONG_DEVICE"),
        ("INVALID", "WRONG_DEVICE"),
    ]
    answer = verify(rig.server, certificate=response.client_certificate, device_id="dev-x")
    assert rig.dev.device_id in answer.reason  # names whose it is
    assert both_states(rig.server, response, device_id=rig.dev.device_id) == [
        ("VALID", ""),
        ("VALID", ""),
    ]


def _self_made_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _reissue(
    cert: x509.Certificate,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    *,
    serial: int | None = None,
    device_id: str | None = None,
) -> bytes:
    """``cert``'s contents signed by ``key`` (optionally another serial or device id)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(issuer)
        .public_key(cert.public_key())  # type: ignore[arg-type]
        .serial_number(cert.serial_number if serial is None else serial)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        if device_id is not None and isinstance(ext.value, x509.SubjectAlternativeName):
            uri = ext.value.get_values_for_type(x509.UniformResourceIdentifier)[0]
            prefix = uri[: len(uri) - len(uri.rsplit(":", 1)[-1])]
            value: x509.ExtensionType = x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(prefix + device_id)]
            )
        else:
            value = ext.value
        builder = builder.add_extension(value, ext.critical)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("ca_name", ["attestd device CA", "someone else's CA"])
def test_certificate_from_a_self_made_ca_is_untrusted(rig: Rig, ca_name: str) -> None:
    response = affirm(rig.dev)
    real = x509.load_der_x509_certificate(response.client_certificate)
    key, ca = _self_made_ca(ca_name)
    # Same serial, subject, SAN and key as a certificate attestd really issued.
    forged = _reissue(real, ca.subject, key)
    for device_id in ("", rig.dev.device_id):
        answer = verify(rig.server, certificate=forged, device_id=device_id)
        assert state_of(answer) == ("INVALID", "UNTRUSTED_ISSUER"), answer.reason
    assert state_of(verify(rig.server, certificate=response.client_certificate)) == ("VALID", "")


def test_credentials_attestd_never_issued_are_unknown(rig: Rig) -> None:
    # Signed with attestd's own keys (read from its data dir), but never recorded.
    response = affirm(rig.dev)
    header, claims, _ = jwt_parts(response.credential)
    data_dir = rig.server.config.data_dir
    signer = serialization.load_pem_private_key(
        (data_dir / "keys" / f"{header['kid']}.pem").read_bytes(), None
    )
    ca_key = serialization.load_pem_private_key((data_dir / "ca-key.pem").read_bytes(), None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    assert state_of(verify(rig.server, token=es256_sign(header, claims, signer))) == ("VALID", "")

    tokens = [
        es256_sign(header, claims | {"jti": b64u(secrets.token_bytes(16))}, signer),
        es256_sign(header, claims | {"sub": rig.dev2.device_id}, signer),
    ]
    for token in tokens:
        answer = verify(rig.server, token=token)
        assert state_of(answer) == ("INVALID", "UNKNOWN_CREDENTIAL"), answer.reason

    real = x509.load_der_x509_certificate(response.client_certificate)
    assert state_of(verify(rig.server, certificate=_reissue(real, real.issuer, ca_key))) == (
        "VALID",
        "",
    )
    certificates = [
        _reissue(real, real.issuer, ca_key, serial=x509.random_serial_number()),
        _reissue(real, real.issuer, ca_key, device_id=rig.dev2.device_id),
    ]
    for certificate in certificates:
        answer = verify(rig.server, certificate=certificate)
        assert state_of(answer) == ("INVALID", "UNKNOWN_CREDENTIAL"), answer.reason


def test_expired_credential(rig: Rig) -> None:
    response = affirm(rig.dev)
    assert get_verdict(rig.server, rig.dev.device_id).credential_expires_at_ms == (
        response.credential_expires_at_ms
    )
    rig.server.advance(LIFETIME_S - 5)
    assert both_states(rig.server, response) == [("VALID", ""), ("VALID", "")]
    rig.server.advance(6)
    assert both_states(rig.server, response) == [("EXPIRED", "EXPIRED"), ("EXPIRED", "EXPIRED")]
    answer = verify(rig.server, token=response.credential)
    assert answer.expires_at_ms == response.credential_expires_at_ms
    assert answer.device_id == rig.dev.device_id
    verdict = get_verdict(rig.server, rig.dev.device_id)
    assert verdict.credential_expires_at_ms == 0
    assert verdict.verdict.status == AFFIRMING  # expiry ends the credential, not the verdict


def test_certificate_not_valid_yet(rig: Rig, rewound: Callable[[float], None]) -> None:
    response = affirm(rig.dev)
    rewound(120)  # as a replica whose clock is two minutes behind would see it
    answer = verify(rig.server, certificate=response.client_certificate)
    assert state_of(answer) == ("INVALID", "NOT_YET_VALID"), answer.reason


# == refusals of a certified key ========================================================


def _restricted(dev: Device, nonce: bytes) -> attestation_pb2.CertifiedKey:
    # A restricted signing key needs a scheme (and no symmetric algorithm).
    return certified_key(
        dev.tpm.tcti, nonce, PLAIN_KEY | TPMA_OBJECT.RESTRICTED, "ecc256:ecdsa-sha256:null"
    )


def _not_fixed_tpm(dev: Device, nonce: bytes) -> attestation_pb2.CertifiedKey:
    # A duplicable key: fixedTPM clear needs fixedParent clear too.
    attrs = PLAIN_KEY & ~(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT)
    return certified_key(dev.tpm.tcti, nonce, attrs)


def _decrypt_too(dev: Device, nonce: bytes) -> attestation_pb2.CertifiedKey:
    # Sign and decrypt together: the TPM wants a NULL scheme for that.
    return certified_key(dev.tpm.tcti, nonce, PLAIN_KEY | TPMA_OBJECT.DECRYPT, "ecc256:null:null")


def _other_nonce(dev: Device, nonce: bytes) -> attestation_pb2.CertifiedKey:
    return certified_key(dev.tpm.tcti, secrets.token_bytes(len(nonce)))


def _other_key(dev: Device, nonce: bytes) -> attestation_pb2.CertifiedKey:
    key = certified_key(dev.tpm.tcti, nonce)
    with DeviceTpm(dev.tpm.tcti) as t:
        handle, other = create_key(t, PLAIN_KEY, KEY_ALG)
        t.ectx.flush_context(handle)
    key.public = other
    return key


def _quote_as_certify(dev: Device, nonce: bytes) -> attestation_pb2.CertifiedKey:
    # A real key, but "certified" by a quote the AK signed over the nonce.
    key = certified_key(dev.tpm.tcti, nonce)
    with DeviceTpm(dev.tpm.tcti) as t:
        q = t.quote([("sha256", [0])], nonce)
    key.certify_info, key.certify_signature = q.attest, q.signature
    return key


@pytest.mark.parametrize(
    ("make_key", "code", "subject", "got"),
    [
        (
            _restricted,
            "CERTIFIED_KEY_ATTRIBUTES",
            "certified_key.public.objectAttributes",
            "has restricted",
        ),
        (
            _not_fixed_tpm,
            "CERTIFIED_KEY_ATTRIBUTES",
            "certified_key.public.objectAttributes",
            "missing fixed_tpm, fixed_parent",
        ),
        (
            _decrypt_too,
            "CERTIFIED_KEY_ATTRIBUTES",
            "certified_key.public.objectAttributes",
            "has decrypt",
        ),
        (_other_nonce, "CERTIFY_NONCE_MISMATCH", "certified_key.certify_info.extraData", None),
        (_other_key, "CERTIFY_NAME_MISMATCH", "certified_key.public", None),
        (_quote_as_certify, "CERTIFY_TYPE_INVALID", "certified_key.certify_info", "0x8018"),
    ],
    ids=["restricted", "fixedtpm-clear", "decrypt", "other-nonce", "other-name", "quote"],
)
def test_refused_certified_key(
    rig: Rig, make_key: KeyMaker, code: str, subject: str, got: str | None
) -> None:
    earlier = affirm(rig.dev)
    response, _ = attest(rig.dev, make_key)
    failure = assert_refused(response, code)
    assert failure.subject == subject
    if got is not None:
        assert failure.got == got
    assert response.verdict.trust_vector.instance_identity == UNTRUSTWORTHY_INSTANCE
    verdict = get_verdict(rig.server, rig.dev.device_id)
    assert verdict.verdict.status == CONTRAINDICATED
    assert [f.code for f in verdict.verdict.failures] == [code]
    assert verdict.credential_expires_at_ms == 0
    # Like any failed attestation, it ends the device's live credentials.
    assert both_states(rig.server, earlier) == [
        ("REVOKED", "SUPERSEDED_BY_FAILURE"),
        ("REVOKED", "SUPERSEDED_BY_FAILURE"),
    ]


def test_certification_over_another_nonce_names_both(rig: Rig) -> None:
    other = secrets.token_bytes(32)
    granted: list[bytes] = []

    def make(dev: Device, nonce: bytes) -> attestation_pb2.CertifiedKey:
        granted.append(nonce)
        return certified_key(dev.tpm.tcti, other)

    response, _ = attest(rig.dev, make)
    failure = assert_refused(response, "CERTIFY_NONCE_MISMATCH")
    assert (failure.expected, failure.got) == (granted[0].hex(), other.hex())


def test_certification_by_another_tpms_ak(rig: Rig) -> None:
    # dev2's TPM makes and certifies the key with its own (enrolled) AK; dev presents it.
    response, _ = attest(rig.dev, lambda dev, nonce: certified_key(rig.dev2.tpm.tcti, nonce))
    failure = assert_refused(response, "CERTIFY_SIGNATURE_INVALID")
    assert failure.subject == "certified_key.signature"
    assert response.verdict.trust_vector.instance_identity == UNTRUSTWORTHY_INSTANCE


@pytest.mark.parametrize("field", ["public", "certify_info", "certify_signature"])
def test_malformed_certified_key_is_refused_before_the_nonce_is_spent(rig: Rig, field: str) -> None:
    def broken(dev: Device, nonce: bytes) -> attestation_pb2.CertifiedKey:
        key = certified_key(dev.tpm.tcti, nonce)
        setattr(key, field, getattr(key, field)[:-3])
        return key

    grant = grant_for(rig.dev)
    with pytest.raises(grpc.RpcError) as info:
        attest(rig.dev, broken, grant)
    assert rpc_code(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED")
    named = {"certify_signature": "certified_key.signature"}.get(field, f"certified_key.{field}")
    assert (info.value.details() or "").startswith(named + ":"), info.value.details()
    # The nonce was not consumed: the same grant still earns a bound credential.
    response, _ = attest(rig.dev, good_key, grant)
    assert response.verdict.status == AFFIRMING
    assert response.client_certificate


# == the CLI on the rig =================================================================


def test_cli_credential_verify(rig: Rig, tmp_path: Path) -> None:
    response = affirm(rig.dev)
    token = response.credential
    pem = tmp_path / "client.pem"
    pem.write_bytes(
        x509.load_der_x509_certificate(response.client_certificate).public_bytes(
            serialization.Encoding.PEM
        )
    )
    token_file = tmp_path / "token.jwt"
    token_file.write_text(token + "\n")

    # Exit 0 for a valid credential: from stdin, from a file, a certificate.
    out = cli("credential", "verify", "-", server=rig.server, stdin=token + "\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"valid (device {rig.dev.device_id})"
    out = cli(
        "credential", "verify", str(token_file), "--device", rig.dev.device_id, server=rig.server
    )
    assert (out.returncode, out.stdout.split(" ")[0]) == (0, "valid"), out
    out = cli("credential", "verify", "--certificate", str(pem), server=rig.server)
    assert (out.returncode, out.stdout.split(" ")[0]) == (0, "valid"), out
    out = cli("credential", "verify", "--json", "-", server=rig.server, stdin=token)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert (doc["state"], doc["device_id"]) == ("CREDENTIAL_STATE_VALID", rig.dev.device_id)

    # Exit 1 otherwise, with the reason.
    out = cli("credential", "verify", "-", server=rig.server, stdin=_tamper_signature(token))
    assert out.returncode == 1, out.stderr
    assert out.stdout.startswith("invalid: BAD_SIGNATURE: "), out.stdout
    args = ("credential", "verify", "--certificate", str(pem), "--device", rig.dev2.device_id)
    out = cli(*args, server=rig.server)
    assert out.returncode == 1, out.stderr
    assert out.stdout.startswith("invalid: WRONG_DEVICE: "), out.stdout
    # Exit 2 when there is nothing to check.
    out = cli(
        "credential", "verify", "--certificate", str(tmp_path / "missing.pem"), server=rig.server
    )
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_cli_credential_verify_token_argument(rig: Rig) -> None:
    response = affirm(rig.dev)
    assert len(response.credential) > 255
    out = cli("credential", "verify", response.credential, server=rig.server)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"valid (device {rig.dev.device_id})"


def test_cli_trust_bundle(rig: Rig, tmp_path: Path) -> None:
    response = affirm(rig.dev)
    jwks_file, ca_file = tmp_path / "jwks.json", tmp_path / "ca.pem"
    out = cli("trust-bundle", "--jwks", str(jwks_file), "--ca", str(ca_file), server=rig.server)
    assert out.returncode == 0, out.stderr
    bundle = trust_bundle(rig.server)
    assert json.loads(jwks_file.read_text()) == json.loads(bundle.jwks)
    assert ca_file.read_text() == bundle.ca_certificates_pem

    # What a gateway does with the two files, offline.
    jwks = json.loads(jwks_file.read_text())
    for jwk in jwks["keys"]:
        assert (jwk["alg"], jwk["use"], jwk["kid"]) == ("ES256", "sig", thumbprint(jwk))
        assert "d" not in jwk
    claims = es256_verify(response.credential, jwks)
    assert claims["sub"] == rig.dev.device_id
    (ca,) = x509.load_pem_x509_certificates(ca_file.read_bytes())
    x509.load_der_x509_certificate(response.client_certificate).verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    out = cli("trust-bundle", server=rig.server)  # without files: both on stdout
    assert out.returncode == 0
    assert bundle.ca_certificates_pem in out.stdout


def test_cli_verdict_get(rig: Rig) -> None:
    response = affirm(rig.dev)
    out = cli("verdict", "get", rig.dev.device_id, server=rig.server)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{rig.dev.device_id}: AFFIRMING"
    assert str(response.credential_expires_at_ms) in out.stdout
    assert "revoked" not in out.stdout
    out = cli("verdict", "get", "--json", rig.dev.device_id, server=rig.server)
    doc = json.loads(out.stdout)
    assert doc["device_id"] == rig.dev.device_id
    assert doc["verdict"]["status"] == "VERDICT_STATUS_AFFIRMING"
    assert int(doc["credential_expires_at_ms"]) == response.credential_expires_at_ms
    out = cli("verdict", "get", "no-such-device", server=rig.server)
    assert out.returncode != 0


# == revocation and supersession (own server) ===========================================


def test_revocation_and_readmission(
    device: Device, server: ServerThread, watchers: Callable[..., Watcher]
) -> None:
    dev = device
    first = affirm(dev)
    watcher = watchers(server, devices=(dev.device_id,))
    assert kinds(watcher.take(1)) == [("AFFIRMED", dev.device_id)]

    out = cli(
        "device", "revoke", dev.device_id, "--reason", "laptop reported stolen", server=server
    )
    assert out.returncode == 0, out.stderr
    assert dev.device_id in out.stdout

    # Both credentials end at once, with the admin's reason.
    for answer in (
        verify(server, token=first.credential),
        verify(server, certificate=first.client_certificate),
    ):
        assert state_of(answer) == ("REVOKED", "DEVICE_REVOKED")
        assert "laptop reported stolen" in answer.reason
        assert answer.device_id == dev.device_id
    verdict = get_verdict(server, dev.device_id)
    assert verdict.revoked
    assert verdict.revocation_reason == "laptop reported stolen"
    assert verdict.revoked_at_ms > 0
    assert verdict.credential_expires_at_ms == 0
    info = server.devices.GetDevice(enrollment_pb2.GetDeviceRequest(device_id=dev.device_id))
    assert (info.revoked, info.revocation_reason) == (True, "laptop reported stolen")
    assert info.revoked_at_ms == verdict.revoked_at_ms
    (event,) = watcher.take(1)
    assert (event.kind, event.device_id, event.reason) == (
        REVOKED_EVENT,
        dev.device_id,
        "laptop reported stolen",
    )
    assert event.at_ms == verdict.revoked_at_ms
    assert event.credential_expires_at_ms == 0
    out = cli("verdict", "get", dev.device_id, server=server)
    assert "revoked: laptop reported stolen" in out.stdout
    out = cli("credential", "verify", "-", server=server, stdin=first.credential)
    assert out.returncode == 1 and out.stdout.startswith("revoked: DEVICE_REVOKED")

    # A good boot does not earn a credential while revoked.
    response, _ = attest(dev)
    failure = assert_refused(response, "DEVICE_REVOKED")
    assert "laptop reported stolen" in failure.detail
    assert response.verdict.trust_vector.instance_identity == UNTRUSTWORTHY_INSTANCE
    (event,) = watcher.take(1)
    assert (event.kind, event.reason, event.status) == (
        FAILED_EVENT,
        "DEVICE_REVOKED",
        "contraindicated",
    )

    out = cli("device", "readmit", dev.device_id, "--reason", "found it", server=server)
    assert out.returncode == 0, out.stderr
    (event,) = watcher.take(1)
    assert (event.kind, event.reason) == (READMITTED_EVENT, "found it")
    verdict = get_verdict(server, dev.device_id)
    assert (verdict.revoked, verdict.revocation_reason, verdict.revoked_at_ms) == (False, "", 0)
    info = server.devices.GetDevice(enrollment_pb2.GetDeviceRequest(device_id=dev.device_id))
    assert not info.revoked
    # Readmission lets the device earn new credentials; it does not revive old ones.
    assert both_states(server, first) == [
        ("REVOKED", "DEVICE_REVOKED"),
        ("REVOKED", "DEVICE_REVOKED"),
    ]
    second = affirm(dev)
    assert second.client_certificate
    assert both_states(server, second) == [("VALID", ""), ("VALID", "")]
    (event,) = watcher.take(1)
    assert (event.kind, event.credential_expires_at_ms) == (
        AFFIRMED_EVENT,
        second.credential_expires_at_ms,
    )
    watcher.assert_quiet(0.6)


def test_revoke_needs_a_reason_and_a_known_device(rig: Rig) -> None:
    try:
        out = cli("device", "revoke", rig.dev2.device_id, "--reason", "   ", server=rig.server)
        assert out.returncode != 0
        assert "reason" in out.stderr
        assert not get_verdict(rig.server, rig.dev2.device_id).revoked
    finally:
        if get_verdict(rig.server, rig.dev2.device_id).revoked:
            readmit(rig.server, rig.dev2.device_id, "undo")
    with pytest.raises(grpc.RpcError) as info:
        revoke(rig.server, "no-such-device", "why not")
    assert rpc_code(info.value) == (grpc.StatusCode.NOT_FOUND, "DEVICE_UNKNOWN")


def test_readmission_does_not_revive_credentials(rig: Rig) -> None:
    before = affirm(rig.dev2)
    revoke(rig.server, rig.dev2.device_id, "audit")
    readmit(rig.server, rig.dev2.device_id, "audit passed")
    # Ended by the revocation (no attestation failed), and still so after readmission.
    assert both_states(rig.server, before) == [
        ("REVOKED", "DEVICE_REVOKED"),
        ("REVOKED", "DEVICE_REVOKED"),
    ]
    answer = verify(rig.server, token=before.credential)
    assert (
        answer.reason == "DEVICE_REVOKED: the device was revoked after this credential was issued"
    )
    # A credential earned after readmission is ended by a later failure as usual.
    after = affirm(rig.dev2)
    assert both_states(rig.server, after) == [("VALID", ""), ("VALID", "")]
    assert_refused(attest(rig.dev2, _other_key)[0], "CERTIFY_NAME_MISMATCH")
    assert both_states(rig.server, after) == [
        ("REVOKED", "SUPERSEDED_BY_FAILURE"),
        ("REVOKED", "SUPERSEDED_BY_FAILURE"),
    ]
    assert state_of(verify(rig.server, token=before.credential)) == ("REVOKED", "DEVICE_REVOKED")


def test_failed_reattestation_supersedes_the_credential(
    device: Device, server: ServerThread, watchers: Callable[..., Watcher]
) -> None:
    dev = device
    good = affirm(dev)
    watcher = watchers(server)
    assert kinds(watcher.take(1)) == [("AFFIRMED", dev.device_id)]

    dev.tpm.powercycle()
    dev.tpm.boot(tamper=True)
    bad, _ = attest(dev)
    assert_refused(bad, "PCR_VALUE_NOT_ALLOWED")
    assert both_states(server, good) == [
        ("REVOKED", "SUPERSEDED_BY_FAILURE"),
        ("REVOKED", "SUPERSEDED_BY_FAILURE"),
    ]
    (event,) = watcher.take(1)
    assert describe([event])[0][1:] == (
        "FAILED",
        dev.device_id,
        "contraindicated",
        "PCR_VALUE_NOT_ALLOWED",
    )
    assert event.at_ms == bad.verdict.appraised_at_ms
    verdict = get_verdict(server, dev.device_id)
    assert verdict.verdict.status == CONTRAINDICATED
    assert verdict.credential_expires_at_ms == 0
    assert not verdict.revoked  # superseded, not revoked by an admin
    out = cli("credential", "verify", "-", server=server, stdin=good.credential)
    assert out.returncode == 1 and "SUPERSEDED_BY_FAILURE" in out.stdout

    # A clean boot earns a new credential; the superseded one stays ended.
    dev.tpm.powercycle()
    dev.tpm.boot()
    again = affirm(dev)
    assert both_states(server, again) == [("VALID", ""), ("VALID", "")]
    assert [s for s, _ in both_states(server, good)] == ["REVOKED", "REVOKED"]
    assert kinds(watcher.take(1)) == [("AFFIRMED", dev.device_id)]


# == the verdict feed (own servers) =====================================================


def test_watch_delivers_events_in_order_with_cursors(
    device_factory: Callable[..., Device],
    server: ServerThread,
    watchers: Callable[..., Watcher],
) -> None:
    a, b = device_factory(), device_factory()
    server.put_policy(a.golden_policy())
    live = watchers(server)  # connected before anything happens

    ra = affirm(a)
    rb = affirm(b)
    failed, _ = attest(a, _restricted)
    assert_refused(failed, "CERTIFIED_KEY_ATTRIBUTES")
    revoke(server, b.device_id, "decommissioned")
    readmit(server, b.device_id, "recommissioned")

    expected = [
        (1, "AFFIRMED", a.device_id, "affirming", ""),
        (2, "AFFIRMED", b.device_id, "affirming", ""),
        (3, "FAILED", a.device_id, "contraindicated", "CERTIFIED_KEY_ATTRIBUTES"),
        (4, "REVOKED", b.device_id, "", "decommissioned"),
        (5, "READMITTED", b.device_id, "", "recommissioned"),
    ]
    events = live.take(5)
    assert describe(events) == expected
    assert [e.credential_expires_at_ms for e in events] == [
        ra.credential_expires_at_ms,
        rb.credential_expires_at_ms,
        0,
        0,
        0,
    ]
    assert events[0].at_ms == ra.verdict.appraised_at_ms
    assert [e.at_ms for e in events] == sorted(e.at_ms for e in events)
    live.assert_quiet()

    # A late watcher replays the same history; after_cursor skips what it has seen.
    assert describe(watchers(server).take(5)) == expected
    assert describe(watchers(server, after=3).take(2)) == expected[3:]
    # Only the devices asked for.
    only_b = watchers(server, devices=(b.device_id,))
    assert describe(only_b.take(3)) == [e for e in expected if e[2] == b.device_id]
    both = watchers(server, devices=(a.device_id, b.device_id))
    assert describe(both.take(5)) == expected
    nobody = watchers(server, devices=("no-such-device",))
    only_b.assert_quiet(0.1)
    nobody.assert_quiet(0.6)

    # Live events reach a filtered watcher too, and no one else's.
    affirm(a)
    revoke(server, b.device_id, "again")
    (event,) = only_b.take(1)
    assert (event.cursor, event.kind, event.reason) == (7, REVOKED_EVENT, "again")
    assert [e.cursor for e in live.take(2)] == [6, 7]
    only_b.assert_quiet(0.1)
    nobody.assert_quiet(0.6)

    # The CLI: text lines and JSON, filtered and resumed.
    out = cli("verdict", "watch", "--device", b.device_id, "--max-events", "4", server=server)
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("2", "affirmed", b.device_id),
        ("4", "revoked", b.device_id),
        ("5", "readmitted", b.device_id),
        ("7", "revoked", b.device_id),
    ]
    out = cli("verdict", "watch", "--json", "--after", "5", "--max-events", "2", server=server)
    docs = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(int(d["cursor"]), d["kind"]) for d in docs] == [
        (6, "VERDICT_EVENT_KIND_AFFIRMED"),
        (7, "VERDICT_EVENT_KIND_REVOKED"),
    ]


def test_watcher_that_reconnects_with_its_cursor_misses_nothing(
    device: Device, server: ServerThread, watchers: Callable[..., Watcher]
) -> None:
    dev = device
    first = watchers(server)
    affirm(dev)
    (seen,) = first.take(1)
    first.close()  # the gateway goes away...

    # ... and meanwhile the device attests again, fails, and is revoked.
    affirm(dev)
    failed, _ = attest(dev, _other_nonce)
    assert_refused(failed, "CERTIFY_NONCE_MISMATCH")
    revoke(server, dev.device_id, "lost")

    again = watchers(server, after=seen.cursor)
    missed = again.take(3)
    assert [(k, d) for k, d in kinds(missed)] == [
        ("AFFIRMED", dev.device_id),
        ("FAILED", dev.device_id),
        ("REVOKED", dev.device_id),
    ]
    cursors = [seen.cursor] + [e.cursor for e in missed]
    assert cursors == sorted(set(cursors))  # strictly increasing: nothing twice
    again.assert_quiet()
    # Then it goes on live.
    readmit(server, dev.device_id, "found")
    (live,) = again.take(1)
    assert live.kind == READMITTED_EVENT and live.cursor > cursors[-1]
    again.assert_quiet(0.6)
    # Resuming from the middle gives exactly the rest.
    resumed = watchers(server, after=missed[1].cursor)
    assert [e.cursor for e in resumed.take(2)] == [missed[2].cursor, live.cursor]
    resumed.assert_quiet(0.6)


def test_filtered_watcher_sees_its_device_behind_many_other_events(
    device_factory: Callable[..., Device], server: ServerThread, watchers: Callable[..., Watcher]
) -> None:
    # The stream reads events in batches of 500: a filter must not lose a match behind a
    # full batch of other devices' events.
    busy, quiet = device_factory(boot=False), device_factory(boot=False)
    for i in range(250):  # 500 events of another device
        revoke(server, busy.device_id, f"drill {i}")
        readmit(server, busy.device_id, f"drill {i}")
    revoke(server, quiet.device_id, "the one that matters")
    # The event is there (unfiltered, it is number 501) ...
    (event,) = watchers(server, after=500).take(1)
    assert (event.cursor, event.device_id) == (501, quiet.device_id)
    # ... but a watcher of just that device must see it too.
    (event,) = watchers(server, devices=(quiet.device_id,)).take(1, timeout_s=2)
    assert (event.cursor, event.reason) == (501, "the one that matters")


def test_filtered_watcher_misses_nothing_appended_between_its_reads(
    device_factory: Callable[..., Device],
    server: ServerThread,
    watchers: Callable[..., Watcher],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An event of the watched device appended right after the stream's read found none
    # (another RPC's store job, or another replica, running in between) still arrives.
    watched = device_factory(boot=False)
    store = server.running.state.store.store
    real_events_after = store.events_after
    armed = threading.Event()
    armed.set()

    def events_after(cursor: int, device_ids: list[str], limit: int) -> Any:
        found = real_events_after(cursor, device_ids, limit)
        if device_ids and not found and armed.is_set():
            armed.clear()
            # The interleaving: a revocation is stored right after this read.
            store.set_revoked(watched.device_id, True, "in between", server.running.state.now_ms())
        return found

    monkeypatch.setattr(store, "events_after", events_after)
    filtered = watchers(server, devices=(watched.device_id,))
    deadline = time.monotonic() + 5
    while armed.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not armed.is_set(), "the watcher never read"
    # The event exists (cursor 1) ...
    (event,) = watchers(server).take(1)
    assert (event.cursor, event.device_id, event.reason) == (1, watched.device_id, "in between")
    # ... and a watcher of that very device must get it.
    (event,) = filtered.take(1, timeout_s=2)
    assert event.cursor == 1


def test_watch_refuses_an_oversized_filter(rig: Rig) -> None:
    ids = [f"dev-{i}" for i in range(10001)]
    stream = rig.server.verdicts.WatchVerdicts(verdicts_pb2.WatchVerdictsRequest(device_ids=ids))
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert rpc_code(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED")
    assert "device_ids" in (info.value.details() or "")


def test_expired_event_after_the_lifetime(
    server_factory: Callable[..., ServerThread],
    device_factory: Callable[..., Device],
    watchers: Callable[..., Watcher],
) -> None:
    short = server_factory(credential_lifetime_s=2)
    dev = device_factory(target=short)
    short.put_policy(dev.golden_policy())
    watcher = watchers(short)
    response = affirm(dev)
    (affirmed,) = watcher.take(1)
    assert affirmed.credential_expires_at_ms == response.credential_expires_at_ms
    _, claims, _ = jwt_parts(response.credential)
    assert claims["exp"] - claims["iat"] == 2

    # The sweep runs every second: the event comes within ~1 s of expiry.
    (event,) = watcher.take(1, timeout_s=4.5)
    assert describe([event])[0][1:] == ("EXPIRED", dev.device_id, "", "credential expired")
    assert event.credential_expires_at_ms == response.credential_expires_at_ms
    assert event.at_ms == response.credential_expires_at_ms
    assert time.time() * 1000 >= response.credential_expires_at_ms
    assert both_states(short, response) == [("EXPIRED", "EXPIRED"), ("EXPIRED", "EXPIRED")]
    assert get_verdict(short, dev.device_id).credential_expires_at_ms == 0
    watcher.assert_quiet(1.2)  # announced once


# == signing-key rotation (own server) ==================================================


def test_key_rotation(device: Device, server: ServerThread, tmp_path: Path) -> None:
    dev = device
    old = affirm(dev)
    old_kid = jwt_parts(old.credential)[0]["kid"]

    out = cli("keys", "rotate", "--json", server=server)
    assert out.returncode == 0, out.stderr
    keys = json.loads(out.stdout)["keys"]
    current = [k for k in keys if k.get("current")]
    retired = [k for k in keys if not k.get("current")]
    assert len(current) == 1 and [k["kid"] for k in retired] == [old_kid]
    new_kid = current[0]["kid"]
    assert new_kid != old_kid
    publish_until = int(retired[0]["publish_until_ms"])
    assert publish_until == int(retired[0]["retired_at_ms"]) + LIFETIME_S * 1000
    out = cli("keys", "list", server=server)
    assert out.stdout.splitlines() == [
        f"{new_kid}\tcurrent",
        f"{old_kid}\tretired, published until {publish_until} (ms)",
    ]

    # Old credentials still verify; the JWKS carries both keys; new ones use the new key.
    assert both_states(server, old) == [("VALID", ""), ("VALID", "")]
    jwks_file = tmp_path / "jwks.json"
    assert cli("trust-bundle", "--jwks", str(jwks_file), server=server).returncode == 0
    jwks = json.loads(jwks_file.read_text())
    assert {k["kid"] for k in jwks["keys"]} == {old_kid, new_kid}
    new = affirm(dev)
    assert jwt_parts(new.credential)[0]["kid"] == new_kid
    assert es256_verify(new.credential, jwks)["sub"] == dev.device_id
    assert es256_verify(old.credential, jwks)["sub"] == dev.device_id
    assert both_states(server, new) == [("VALID", ""), ("VALID", "")]

    # Just before the window closes the old key is still published.
    server.advance(LIFETIME_S - 30)
    assert {k["kid"] for k in json.loads(trust_bundle(server).jwks)["keys"]} == {old_kid, new_kid}
    assert state_of(verify(server, token=old.credential)) == ("VALID", "")
    # After it, the old key is gone and so are its tokens; the new key stays.
    server.advance(31)
    assert [k["kid"] for k in json.loads(trust_bundle(server).jwks)["keys"]] == [new_kid]
    assert state_of(verify(server, token=old.credential)) == ("INVALID", "UNKNOWN_KEY_ID")
    assert state_of(verify(server, token=new.credential))[0] in ("VALID", "EXPIRED")
    out = cli("credential", "verify", "-", server=server, stdin=old.credential)
    assert out.returncode == 1 and out.stdout.startswith("invalid: UNKNOWN_KEY_ID")
    listed = server.keys.ListSigningKeys(keys_pb2.ListSigningKeysRequest())
    assert [k.kid for k in listed.keys if k.current] == [new_kid]
