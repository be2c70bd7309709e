"""Every way Attest and enrollment must say no, each with the reason code it names.

A refused attestation is a verdict (OK, contraindicated, the failed check named,
no credential); a refused request is an RPC error with ``attestd-code``. The
evidence here is made by hand on the device's real (simulated) TPM and then
altered, so each test shows one rule of DESIGN.md "What Attest must check".

Tests that leave the device as it was share one module-wide server and two
enrolled devices (``rig``); tests that reboot, tamper or rewind a TPM, or
travel in time, get their own.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import BOOT_SELECTION, Device, ServerThread, rpc_code, server_config
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMS_PCR_SELECTION,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
)
from tpmsim import Manufacturer, SimTpm

from attestd.agent.client import Agent
from attestd.agent.tpm import DEFAULT_AK_HANDLE, DeviceTpm, Quote
from attestd.core.tpm import parse_attest
from attestd.tlsinit import TlsFiles
from attestd.v1 import admin_pb2, attestation_pb2, common_pb2, enrollment_pb2

pytestmark = pytest.mark.integration

CONTRAINDICATED = common_pb2.VERDICT_STATUS_CONTRAINDICATED
AFFIRMING = common_pb2.VERDICT_STATUS_AFFIRMING

# A restricted signing key that never leaves the TPM: what an AK must be.
AK_ATTRS = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
_TSS_ENV = {**os.environ, "TSS2_LOG": "all+none"}


# -- the shared rig ------------------------------------------------------------


@dataclasses.dataclass
class Rig:
    server: ServerThread
    dev: Device  # its boot is the server's golden 'default' policy
    dev2: Device  # another enrolled TPM, booted the same way


def _make_device(maker: Manufacturer, server: ServerThread, where: Path) -> Device:
    tpm = maker.make_tpm(where / "tpm")
    tpm.start()
    tpm.boot()
    agent = Agent(server.agent_config(tpm.tcti, where / "agent"))
    agent.enroll()
    return Device(tpm, agent, server, where / "agent")


@pytest.fixture(scope="module")
def rig(
    manufacturer: Manufacturer, tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles
) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("rejections-rig")
    server = ServerThread(server_config(root / "server", manufacturer, tls_files), tls_files)
    devices: list[Device] = []
    try:
        devices.append(_make_device(manufacturer, server, root / "dev1"))
        devices.append(_make_device(manufacturer, server, root / "dev2"))
        server.put_policy(devices[0].golden_policy())
        yield Rig(server, devices[0], devices[1])
    finally:
        for d in devices:
            d.agent.close()
            d.tpm.stop()
        server.stop()


@pytest.fixture(scope="module")
def ecc_dev(
    rig: Rig, manufacturer: Manufacturer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Device]:
    """A third device on the rig's server, with an ECDSA P-256 AK (same golden boot)."""
    where = tmp_path_factory.mktemp("rejections-ecc")
    tpm = manufacturer.make_tpm(where / "tpm")
    agent = None
    try:
        tpm.start()
        tpm.boot()
        agent = Agent(rig.server.agent_config(tpm.tcti, where / "agent"))
        agent.enroll(ak_alg="ecc")
        yield Device(tpm, agent, rig.server, where / "agent")
    finally:
        if agent is not None:
            agent.close()
        tpm.stop()


# -- evidence by hand ----------------------------------------------------------


def grant_for(server: ServerThread, device_id: str) -> attestation_pb2.GetNonceResponse:
    grant: attestation_pb2.GetNonceResponse = server.attestation.GetNonce(
        attestation_pb2.GetNonceRequest(device_id=device_id)
    )
    return grant


def selection_of(grant: attestation_pb2.GetNonceResponse) -> list[tuple[str, list[int]]]:
    return [(s.bank, list(s.indices)) for s in grant.pcr_selection]


def quote_on(
    tpm: SimTpm, selection: Sequence[tuple[str, Sequence[int]]], qualifying: bytes
) -> Quote:
    with DeviceTpm(tpm.tcti) as t:
        return t.quote(selection, qualifying)


def attest_request(
    device_id: str,
    nonce: bytes,
    q: Quote,
    pcrs: dict[str, dict[int, bytes]] | None = None,
    *,
    quote: bytes | None = None,
    signature: bytes | None = None,
) -> attestation_pb2.AttestRequest:
    values = q.pcrs if pcrs is None else pcrs
    return attestation_pb2.AttestRequest(
        device_id=device_id,
        nonce=nonce,
        quote=q.attest if quote is None else quote,
        signature=q.signature if signature is None else signature,
        pcrs=[common_pb2.PcrBank(bank=b, values=v) for b, v in values.items()],
    )


def attest(
    server: ServerThread, request: attestation_pb2.AttestRequest
) -> attestation_pb2.AttestResponse:
    response: attestation_pb2.AttestResponse = server.attestation.Attest(request)
    return response


def good_attestation(dev: Device) -> tuple[attestation_pb2.AttestResponse, Quote]:
    """GetNonce, quote the granted selection over it on the device's TPM, Attest."""
    grant = grant_for(dev.server, dev.device_id)
    q = quote_on(dev.tpm, selection_of(grant), grant.nonce)
    return attest(dev.server, attest_request(dev.device_id, grant.nonce, q)), q


def assert_refused(response: attestation_pb2.AttestResponse, code: str) -> common_pb2.Failure:
    """Contraindicated for exactly one reason, ``code``, and no credential; that failure."""
    verdict = response.verdict
    codes = [f.code for f in verdict.failures]
    assert verdict.status == CONTRAINDICATED, codes
    assert codes == [code]
    assert response.credential == ""
    assert response.credential_expires_at_ms == 0
    failure: common_pb2.Failure = verdict.failures[0]
    return failure


def rpc_error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, str]:
    """(status, attestd-code, details) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    status, code = rpc_code(info.value)
    return status, code, info.value.details() or ""


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def clock_info_offset(attest_bytes: bytes) -> int:
    """Where TPMS_CLOCK_INFO starts in a TPMS_ATTEST (after magic, type, two TPM2Bs)."""
    signer = int.from_bytes(attest_bytes[6:8], "big")
    extra_at = 8 + signer
    extra = int.from_bytes(attest_bytes[extra_at : extra_at + 2], "big")
    return extra_at + 2 + extra


def create_transient(
    t: DeviceTpm, alg: str, attrs: TPMA_OBJECT, name_alg: str = "sha256"
) -> tuple[ESYS_TR, bytes]:
    """A primary RSA key under the endorsement hierarchy: (handle, TPM2B_PUBLIC). Flush it."""
    tmpl = TPMT_PUBLIC.parse(alg=alg, objectAttributes=attrs, nameAlg=name_alg)
    tmpl.unique.rsa = secrets.token_bytes(32)  # a new key, not a re-derived one
    handle, public, _, _, _ = t.ectx.create_primary(
        TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=tmpl), ESYS_TR.ENDORSEMENT
    )
    return handle, bytes(public.marshal())


def pcr_selection(bank_alg: TPM2_ALG, indices: Sequence[int]) -> TPML_PCR_SELECTION:
    bitmap = bytearray(3)
    for i in indices:
        bitmap[i // 8] |= 1 << (i % 8)
    return TPML_PCR_SELECTION(
        [TPMS_PCR_SELECTION(hash=bank_alg, sizeofSelect=3, pcrSelect=bytes(bitmap))]
    )


def sha1_rsassa() -> TPMT_SIG_SCHEME:
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.RSASSA)
    scheme.details.any.hashAlg = TPM2_ALG.SHA1
    return scheme


def enroll_request(t: DeviceTpm, ak_public: bytes) -> enrollment_pb2.EnrollRequest:
    cert, ek_public = t.endorsement()
    return enrollment_pb2.EnrollRequest(
        ek_certificate=cert, ek_public=ek_public, ak_public=ak_public
    )


def enrolled_ak_public(t: DeviceTpm) -> bytes:
    ak = t.ak_public()
    assert ak is not None
    return ak


def challenge_for(server: ServerThread, tpm: SimTpm) -> tuple[enrollment_pb2.EnrollResponse, bytes]:
    """Enroll by hand: a new AK, the server's challenge, and the secret the TPM recovers."""
    with DeviceTpm(tpm.tcti) as t:
        request = enroll_request(t, t.create_ak())
        challenge: enrollment_pb2.EnrollResponse = server.enrollment.Enroll(request)
        secret = t.activate(challenge.credential_blob, challenge.encrypted_secret)
    return challenge, secret


def activate(
    server: ServerThread, device_id: str, challenge_id: str, secret: bytes
) -> enrollment_pb2.ActivateResponse:
    done: enrollment_pb2.ActivateResponse = server.enrollment.Activate(
        enrollment_pb2.ActivateRequest(
            device_id=device_id, challenge_id=challenge_id, secret=secret
        )
    )
    return done


# -- the nonce: issued here, for this device, unexpired, used once ----------------


def test_one_nonce_used_concurrently_affirms_once(rig: Rig) -> None:
    grant = grant_for(rig.server, rig.dev.device_id)
    q = quote_on(rig.dev.tpm, selection_of(grant), grant.nonce)
    request = attest_request(rig.dev.device_id, grant.nonce, q)

    def one() -> str:
        try:
            response = attest(rig.server, request)
        except grpc.RpcError as e:
            return rpc_code(e)[1]
        return "affirmed" if response.verdict.status == AFFIRMING else "refused"

    before = _audit_seqs(rig.server)
    with ThreadPoolExecutor(8) as pool:
        outcomes = sorted(pool.map(lambda _: one(), range(8)))
    assert outcomes == ["NONCE_REUSED"] * 7 + ["affirmed"]
    # The nonce is spent in the verdict's own transaction: the losers of the race wrote
    # nothing but their refusal to the audit log (seven), the winner its verdict (one).
    records = [
        json.loads(r.detail_json)["outcome"]
        for r in _audit_records(rig.server)
        if r.seq > before and r.kind == "attestation.verdict" and r.subject == rig.dev.device_id
    ]
    assert sorted(records) == ["NONCE_REUSED"] * 7 + ["ok"]


def _audit_records(server: ServerThread) -> list[admin_pb2.AuditRecord]:
    items = server.admin.ExportAudit(admin_pb2.ExportAuditRequest())
    return [i.record for i in items if i.WhichOneof("item") == "record"]


def _audit_seqs(server: ServerThread) -> int:
    return max((r.seq for r in _audit_records(server)), default=0)


def test_reused_nonce_is_refused(rig: Rig) -> None:
    grant = grant_for(rig.server, rig.dev.device_id)
    q = quote_on(rig.dev.tpm, selection_of(grant), grant.nonce)
    request = attest_request(rig.dev.device_id, grant.nonce, q)
    assert attest(rig.server, request).verdict.status == AFFIRMING

    status, code, _ = rpc_error(lambda: attest(rig.server, request))
    assert (status, code) == (grpc.StatusCode.FAILED_PRECONDITION, "NONCE_REUSED")


def test_expired_nonce_is_refused(rig: Rig) -> None:
    grant = grant_for(rig.server, rig.dev.device_id)
    q = quote_on(rig.dev.tpm, selection_of(grant), grant.nonce)
    rig.server.advance(61)  # the nonce lives 60 s

    status, code, _ = rpc_error(
        lambda: attest(rig.server, attest_request(rig.dev.device_id, grant.nonce, q))
    )
    assert (status, code) == (grpc.StatusCode.FAILED_PRECONDITION, "NONCE_EXPIRED")


def test_another_devices_nonce_is_refused_and_stays_usable_by_its_owner(rig: Rig) -> None:
    grant = grant_for(rig.server, rig.dev.device_id)
    stolen = quote_on(rig.dev2.tpm, selection_of(grant), grant.nonce)

    status, code, _ = rpc_error(
        lambda: attest(rig.server, attest_request(rig.dev2.device_id, grant.nonce, stolen))
    )
    assert (status, code) == (grpc.StatusCode.FAILED_PRECONDITION, "NONCE_WRONG_DEVICE")

    # The refusal did not burn the owner's nonce.
    q = quote_on(rig.dev.tpm, selection_of(grant), grant.nonce)
    response = attest(rig.server, attest_request(rig.dev.device_id, grant.nonce, q))
    assert response.verdict.status == AFFIRMING
    assert response.credential


def test_nonce_never_issued_is_refused(rig: Rig) -> None:
    grant = grant_for(rig.server, rig.dev.device_id)  # only for the selection
    invented = secrets.token_bytes(32)
    q = quote_on(rig.dev.tpm, selection_of(grant), invented)

    status, code, _ = rpc_error(
        lambda: attest(rig.server, attest_request(rig.dev.device_id, invented, q))
    )
    assert (status, code) == (grpc.StatusCode.FAILED_PRECONDITION, "NONCE_UNKNOWN")


def test_no_nonce_before_a_policy_is_published(
    device_factory: Callable[..., Device], server: ServerThread
) -> None:
    dev = device_factory()  # enrolled; the server has no 'default' policy yet
    status, code, details = rpc_error(lambda: grant_for(server, dev.device_id))
    assert (status, code) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_POLICY")
    assert "default" in details


def test_unknown_device_gets_no_nonce(rig: Rig) -> None:
    stranger = "dev-" + "0" * 32
    status, code, _ = rpc_error(lambda: grant_for(rig.server, stranger))
    assert (status, code) == (grpc.StatusCode.NOT_FOUND, "DEVICE_UNKNOWN")


def test_unknown_device_cannot_attest(rig: Rig) -> None:
    grant = grant_for(rig.server, rig.dev.device_id)
    q = quote_on(rig.dev.tpm, selection_of(grant), grant.nonce)
    stranger = "dev-" + "0" * 32

    status, code, _ = rpc_error(
        lambda: attest(rig.server, attest_request(stranger, grant.nonce, q))
    )
    assert (status, code) == (grpc.StatusCode.NOT_FOUND, "DEVICE_UNKNOWN")


# -- the signature: by the enrolled AK, over exactly these bytes --------------------


def test_quote_signed_by_another_tpms_ak_is_refused(rig: Rig) -> None:
    grant = grant_for(rig.server, rig.dev.device_id)
    # dev2 booted identically, so only the signing key differs.
    forged = quote_on(rig.dev2.tpm, selection_of(grant), grant.nonce)
    response = attest(rig.server, attest_request(rig.dev.device_id, grant.nonce, forged))
    failure = assert_refused(response, "SIGNATURE_INVALID")
    assert failure.subject == "signature"


# Each returns (quote, signature) with one bit changed.
def _flip_clock(q: Quote) -> tuple[bytes, bytes]:
    return flip(q.attest, clock_info_offset(q.attest) + 7), q.signature  # clock's low byte


def _flip_reset_count(q: Quote) -> tuple[bytes, bytes]:
    return flip(q.attest, clock_info_offset(q.attest) + 11), q.signature


def _flip_firmware(q: Quote) -> tuple[bytes, bytes]:
    return flip(q.attest, clock_info_offset(q.attest) + 17), q.signature


def _flip_pcr_digest(q: Quote) -> tuple[bytes, bytes]:
    return flip(q.attest, len(q.attest) - 1), q.signature


def _flip_signature_body(q: Quote) -> tuple[bytes, bytes]:
    # TPMT_SIGNATURE (RSASSA): sigAlg(2) hash(2) size(2) then the signature itself.
    return q.attest, flip(q.signature, 6 + 100)


@pytest.mark.parametrize(
    "tamper",
    [_flip_clock, _flip_reset_count, _flip_firmware, _flip_pcr_digest, _flip_signature_body],
    ids=[
        "quote.clockInfo.clock",
        "quote.clockInfo.resetCount",
        "quote.firmwareVersion",
        "quote.pcrDigest",
        "signature.sig",
    ],
)
def test_one_flipped_byte_breaks_the_signature(
    rig: Rig, tamper: Callable[[Quote], tuple[bytes, bytes]]
) -> None:
    grant = grant_for(rig.server, rig.dev.device_id)
    q = quote_on(rig.dev.tpm, selection_of(grant), grant.nonce)
    quote, signature = tamper(q)
    assert (quote, signature) != (q.attest, q.signature)
    request = attest_request(rig.dev.device_id, grant.nonce, q, quote=quote, signature=signature)
    assert_refused(attest(rig.server, request), "SIGNATURE_INVALID")


@pytest.mark.parametrize(
    ("header", "subject", "expected", "got"),
    [
        (b"\x00\x16\x00\x0b", "signature.sigAlg", "rsassa", "rsapss"),
        (b"\x00\x14\x00\x0c", "signature.hash", "sha256", "sha384"),
    ],
    ids=["rsapss-label", "sha384-label"],
)
def test_signature_of_another_scheme_than_the_aks_is_refused(
    rig: Rig, header: bytes, subject: str, expected: str, got: str
) -> None:
    # TPMT_SIGNATURE starts with sigAlg(2) and hash(2): relabel a good signature.
    grant = grant_for(rig.server, rig.dev.device_id)
    q = quote_on(rig.dev.tpm, selection_of(grant), grant.nonce)
    assert q.signature[:4] == b"\x00\x14\x00\x0b"  # rsassa, sha256: the AK's scheme
    relabelled = header + q.signature[4:]
    response = attest(
        rig.server, attest_request(rig.dev.device_id, grant.nonce, q, signature=relabelled)
    )
    failure = assert_refused(response, "SIGNATURE_SCHEME_MISMATCH")
    assert (failure.subject, failure.expected, failure.got) == (subject, expected, got)


def _ecdsa_parts(signature: bytes) -> tuple[bytes, bytes, bytes]:
    """TPMT_SIGNATURE (ECDSA) -> (sigAlg + hash, r, s)."""
    r_size = int.from_bytes(signature[4:6], "big")
    r = signature[6 : 6 + r_size]
    s = signature[6 + r_size + 2 :]
    return signature[:4], r, s


def _ecdsa(head: bytes, r: bytes, s: bytes) -> bytes:
    return head + len(r).to_bytes(2, "big") + r + len(s).to_bytes(2, "big") + s


P256_ORDER = bytes.fromhex("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551")


@pytest.mark.parametrize(
    "forge",
    [
        lambda h, r, s: _ecdsa(h, flip(r, 5), s),
        lambda h, r, s: _ecdsa(h, r, flip(s, 5)),
        lambda h, r, s: _ecdsa(h, b"", s),
        lambda h, r, s: _ecdsa(h, r, b"\0"),
        lambda h, r, s: _ecdsa(h, P256_ORDER, s),
        lambda h, r, s: _ecdsa(h, s, r),
    ],
    ids=["r-flipped", "s-flipped", "r-zero", "s-zero", "r-is-the-order", "r-s-swapped"],
)
def test_ecdsa_signature_tampering_is_refused(
    ecc_dev: Device, forge: Callable[[bytes, bytes, bytes], bytes]
) -> None:
    server = ecc_dev.server
    grant = grant_for(server, ecc_dev.device_id)
    q = quote_on(ecc_dev.tpm, selection_of(grant), grant.nonce)
    head, r, s = _ecdsa_parts(q.signature)
    assert head == b"\x00\x18\x00\x0b"  # ecdsa, sha256
    assert _ecdsa(head, r, s) == q.signature
    forged = forge(head, r, s)
    response = attest(server, attest_request(ecc_dev.device_id, grant.nonce, q, signature=forged))
    failure = assert_refused(response, "SIGNATURE_INVALID")
    assert failure.subject == "signature"


def test_ecdsa_quote_affirms_unaltered(ecc_dev: Device) -> None:
    # The baseline of the ECDSA cases above.
    response, _ = good_attestation(ecc_dev)
    assert response.verdict.status == AFFIRMING


def test_quote_by_a_retired_ak_is_refused(device: Device, server: ServerThread) -> None:
    grant = grant_for(server, device.device_id)
    old = quote_on(device.tpm, selection_of(grant), grant.nonce)
    device.agent.enroll(new_ak=True)  # the server now holds only the new AK
    response = attest(server, attest_request(device.device_id, grant.nonce, old))
    assert_refused(response, "SIGNATURE_INVALID")
    assert good_attestation(device)[0].verdict.status == AFFIRMING


def test_quote_with_a_wrong_magic_is_refused(rig: Rig) -> None:
    grant = grant_for(rig.server, rig.dev.device_id)
    q = quote_on(rig.dev.tpm, selection_of(grant), grant.nonce)
    bad = b"\xff\x54\x43\x46" + q.attest[4:]  # TPM_GENERATED_VALUE is ff544347
    response = attest(rig.server, attest_request(rig.dev.device_id, grant.nonce, q, quote=bad))
    failure = assert_refused(response, "QUOTE_MAGIC_INVALID")
    assert (failure.subject, failure.expected, failure.got) == (
        "quote.magic",
        "0xff544347",
        "0xff544346",
    )


def test_certify_signed_by_the_ak_is_not_a_quote(rig: Rig) -> None:
    # A genuine TPMS_ATTEST, signed by the enrolled AK over the nonce, but of
    # type certify (TPM2_Certify of the AK by itself): no PCRs were attested.
    grant = grant_for(rig.server, rig.dev.device_id)
    with DeviceTpm(rig.dev.tpm.tcti) as t:
        ak = t.ectx.tr_from_tpmpublic(DEFAULT_AK_HANDLE)
        certify, sig = t.ectx.certify(ak, ak, grant.nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
        values = t.read_pcrs(selection_of(grant))
    q = Quote(bytes(certify), bytes(sig.marshal()), values)
    response = attest(rig.server, attest_request(rig.dev.device_id, grant.nonce, q))
    failure = assert_refused(response, "QUOTE_TYPE_INVALID")
    assert (failure.subject, failure.expected, failure.got) == ("quote.type", "0x8018", "0x8017")


def test_quote_over_another_nonce_is_refused(rig: Rig) -> None:
    grant = grant_for(rig.server, rig.dev.device_id)
    other = secrets.token_bytes(32)
    q = quote_on(rig.dev.tpm, selection_of(grant), other)
    response = attest(rig.server, attest_request(rig.dev.device_id, grant.nonce, q))
    failure = assert_refused(response, "NONCE_MISMATCH")
    assert failure.subject == "quote.extraData"
    assert (failure.expected, failure.got) == (grant.nonce.hex(), other.hex())


# -- PCRs: the signed selection, the signed digest, the reference values ------------


def test_pcr_value_not_matching_the_signed_digest_is_refused(rig: Rig) -> None:
    grant = grant_for(rig.server, rig.dev.device_id)
    q = quote_on(rig.dev.tpm, selection_of(grant), grant.nonce)
    pcrs = {bank: dict(values) for bank, values in q.pcrs.items()}
    pcrs["sha256"][4] = bytes(32)  # not what the TPM signed (and not in the policy)
    response = attest(rig.server, attest_request(rig.dev.device_id, grant.nonce, q, pcrs))
    # Only the digest: unverified values are not judged against the policy.
    failure = assert_refused(response, "PCR_DIGEST_MISMATCH")
    assert failure.subject == "quote.pcrDigest"
    assert failure.expected == parse_attest(q.attest).pcr_digest.hex()


@pytest.mark.parametrize(
    "signed",
    [[("sha256", list(range(9)))], [("sha256", list(range(11)))], [("sha1", list(range(10)))]],
    ids=["fewer-pcrs", "more-pcrs", "another-bank"],
)
def test_signed_selection_other_than_requested_is_refused(
    rig: Rig, signed: list[tuple[str, list[int]]]
) -> None:
    grant = grant_for(rig.server, rig.dev.device_id)
    assert selection_of(grant) == BOOT_SELECTION
    # The quote covers another selection and the submitted values match it exactly,
    # so only the signed pcrSelect tells the verifier it is not what it asked for.
    q = quote_on(rig.dev.tpm, signed, grant.nonce)
    response = attest(rig.server, attest_request(rig.dev.device_id, grant.nonce, q))
    failure = assert_refused(response, "PCR_SELECTION_MISMATCH")
    assert failure.subject == "quote.pcrSelect"
    assert failure.expected == "sha256:0,1,2,3,4,5,6,7,8,9"
    assert failure.got == " ".join(f"{b}:{','.join(map(str, i))}" for b, i in signed)


def test_signed_selection_repeating_a_bank_is_refused(rig: Rig) -> None:
    grant = grant_for(rig.server, rig.dev.device_id)
    split = [("sha256", list(range(5))), ("sha256", list(range(5, 10)))]  # the TPM signs it
    q = quote_on(rig.dev.tpm, split, grant.nonce)
    with DeviceTpm(rig.dev.tpm.tcti) as t:
        pcrs = t.read_pcrs(selection_of(grant))  # all ten values, once
    response = attest(rig.server, attest_request(rig.dev.device_id, grant.nonce, q, pcrs))
    failure = assert_refused(response, "PCR_SELECTION_MISMATCH")
    assert (failure.subject, failure.expected, failure.got) == ("quote.pcrSelect", "", "")


@pytest.mark.parametrize(
    "signed",
    [
        [("sha1", []), ("sha256", list(range(10)))],
        [("sha256", list(range(10))), ("sha1", [])],
    ],
    ids=["empty-entry-first", "empty-entry-last"],
)
def test_signed_selection_with_an_empty_entry_is_judged_not_crashed(
    rig: Rig, signed: list[tuple[str, list[int]]]
) -> None:
    # The TPM keeps an entry that selects nothing in the signed pcrSelect. The
    # API asks agents not to send one; whether attestd reads it as the same
    # selection (affirming) or refuses it (PCR_SELECTION_MISMATCH), it must be
    # a verdict, never INTERNAL with the nonce already consumed.
    grant = grant_for(rig.server, rig.dev.device_id)
    q = quote_on(rig.dev.tpm, signed, grant.nonce)
    assert q.pcrs["sha1"] == {}
    pcrs = {"sha256": q.pcrs["sha256"]}
    response = attest(rig.server, attest_request(rig.dev.device_id, grant.nonce, q, pcrs))
    codes = [f.code for f in response.verdict.failures]
    if codes:
        assert_refused(response, "PCR_SELECTION_MISMATCH")
    else:
        assert response.verdict.status == AFFIRMING
        assert response.credential


def _drop_pcr9(pcrs: dict[str, dict[int, bytes]]) -> None:
    del pcrs["sha256"][9]


def _add_pcr10(pcrs: dict[str, dict[int, bytes]]) -> None:
    pcrs["sha256"][10] = bytes(32)


def _add_sha1_bank(pcrs: dict[str, dict[int, bytes]]) -> None:
    pcrs["sha1"] = {0: bytes(20)}


@pytest.mark.parametrize(
    "change", [_drop_pcr9, _add_pcr10, _add_sha1_bank], ids=["one-less", "one-more", "extra-bank"]
)
def test_values_of_another_selection_than_signed_are_refused(
    rig: Rig, change: Callable[[dict[str, dict[int, bytes]]], None]
) -> None:
    grant = grant_for(rig.server, rig.dev.device_id)
    q = quote_on(rig.dev.tpm, selection_of(grant), grant.nonce)
    pcrs = {bank: dict(values) for bank, values in q.pcrs.items()}
    change(pcrs)
    response = attest(rig.server, attest_request(rig.dev.device_id, grant.nonce, q, pcrs))
    failure = assert_refused(response, "PCR_VALUES_SELECTION_MISMATCH")
    assert failure.subject == "pcrs"
    assert failure.expected == "sha256:0,1,2,3,4,5,6,7,8,9"


def test_pcr_value_not_in_the_policy_is_refused(device: Device, server: ServerThread) -> None:
    golden = device.tpm.pcrs()["sha256"][4]
    device.tpm.powercycle()
    device.tpm.boot(tamper=True)
    tampered = device.tpm.pcrs()["sha256"][4]
    assert tampered != golden

    response, _ = good_attestation(device)
    failure = assert_refused(response, "PCR_VALUE_NOT_ALLOWED")
    assert failure.subject == "pcr[sha256:4]"
    assert (failure.expected, failure.got) == (golden.hex(), tampered.hex())


# -- SHA-1: only where a policy explicitly allows it ----------------------------------


def test_policy_without_allow_sha1_cannot_list_a_sha1_bank(rig: Rig) -> None:
    doc: dict[str, object] = {
        "name": "sha1-sneak",
        "pcrs": {"sha1": {0: "00" * 20}, "sha256": {0: "00" * 32}},
    }
    status, code, details = rpc_error(lambda: rig.server.put_policy(doc))
    assert (status, code) == (grpc.StatusCode.INVALID_ARGUMENT, "POLICY_INVALID")
    assert "pcrs.sha1" in details
    doc["allow_sha1"] = True
    assert rig.server.put_policy(doc).version == 1


def test_ak_with_a_sha256_scheme_cannot_sign_a_sha1_quote(rig: Rig) -> None:
    # The enrolled AK's scheme is rsassa-sha256: the TPM itself refuses SHA-1.
    with DeviceTpm(rig.dev.tpm.tcti) as t:
        ak = t.ectx.tr_from_tpmpublic(DEFAULT_AK_HANDLE)
        with pytest.raises(TSS2_Exception, match="scheme"):
            t.ectx.quote(ak, pcr_selection(TPM2_ALG.SHA256, range(10)), b"n" * 32, sha1_rsassa())


def test_sha1_signed_quote_is_refused(rig: Rig) -> None:
    # A SHA-1 signature from a (not enrolled) rsassa-sha1 key of the same TPM:
    # its hash is not the enrolled AK's scheme hash, judged before the RSA math.
    grant = grant_for(rig.server, rig.dev.device_id)
    with DeviceTpm(rig.dev.tpm.tcti) as t:
        key, _ = create_transient(t, "rsa2048:rsassa-sha1:null", AK_ATTRS)
        try:
            attest_bytes, sig = t.ectx.quote(
                key, pcr_selection(TPM2_ALG.SHA256, range(10)), grant.nonce, sha1_rsassa()
            )
        finally:
            t.ectx.flush_context(key)
        values = t.read_pcrs(selection_of(grant))
    q = Quote(bytes(attest_bytes), bytes(sig.marshal()), values)
    response = attest(rig.server, attest_request(rig.dev.device_id, grant.nonce, q))
    failure = assert_refused(response, "SIGNATURE_SCHEME_MISMATCH")
    assert (failure.subject, failure.expected, failure.got) == ("signature.hash", "sha256", "sha1")


@pytest.mark.parametrize(
    ("alg", "name_alg", "named"),
    [
        ("rsa2048:rsassa-sha1:null", "sha256", "SHA1"),
        ("rsa1024:rsassa-sha256:null", "sha256", "1024"),
        ("rsa2048:rsassa-sha256:null", "sha1", "nameAlg"),
    ],
    ids=["sha1-scheme", "rsa1024", "sha1-nameAlg"],
)
def test_enroll_refuses_an_ak_of_a_weak_algorithm(
    rig: Rig, alg: str, name_alg: str, named: str
) -> None:
    with DeviceTpm(rig.dev.tpm.tcti) as t:
        key, ak_public = create_transient(t, alg, AK_ATTRS, name_alg)
        t.ectx.flush_context(key)
        request = enroll_request(t, ak_public)
    status, code, details = rpc_error(lambda: rig.server.enrollment.Enroll(request))
    assert (status, code) == (grpc.StatusCode.INVALID_ARGUMENT, "AK_ALGORITHM")
    assert details.startswith("ak_public:") and named in details, details


def test_sha1_quote_from_an_ak_with_a_null_scheme_is_refused(
    device_factory: Callable[..., Device], server: ServerThread
) -> None:
    # An AK whose scheme is NULL lets the caller pick the hash per signature, so
    # only the verifier's own hash rule stands between it and a SHA-1 quote.
    dev = device_factory(enroll=False)
    with DeviceTpm(dev.tpm.tcti) as t:
        try:
            key, _ = create_transient(t, "rsa2048:null:null", AK_ATTRS)
        except TSS2_Exception as e:
            # TPM 2.0 Part 1: a restricted signing key must name its scheme, so a
            # conforming TPM (swtpm is one) never makes such an AK.
            pytest.skip(f"the TPM refuses a restricted signing key with a NULL scheme ({e})")
        t.ectx.evict_control(ESYS_TR.OWNER, key, DEFAULT_AK_HANDLE)
        t.ectx.flush_context(key)
    dev.agent.enroll()  # enrolls the AK persisted at the handle
    server.put_policy(dev.golden_policy())
    grant = grant_for(server, dev.device_id)
    with DeviceTpm(dev.tpm.tcti) as t:
        ak = t.ectx.tr_from_tpmpublic(DEFAULT_AK_HANDLE)
        attest_bytes, sig = t.ectx.quote(
            ak, pcr_selection(TPM2_ALG.SHA256, range(10)), grant.nonce, sha1_rsassa()
        )
        values = t.read_pcrs(selection_of(grant))
    q = Quote(bytes(attest_bytes), bytes(sig.marshal()), values)
    response = attest(server, attest_request(dev.device_id, grant.nonce, q))
    failure = assert_refused(response, "SIGNATURE_HASH_NOT_ALLOWED")
    assert (failure.subject, failure.got) == ("signature.hash", "sha1")


# -- enrollment ------------------------------------------------------------------------


def test_ek_certificate_from_an_untrusted_ca_is_refused(
    device_factory: Callable[..., Device], other_manufacturer: Manufacturer
) -> None:
    dev = device_factory(other_manufacturer, enroll=False)
    status, code, details = rpc_error(dev.agent.enroll)
    assert (status, code) == (grpc.StatusCode.PERMISSION_DENIED, "EK_CHAIN_UNTRUSTED")
    assert "ek_certificate" in details


@pytest.mark.parametrize(
    ("set_bits", "clear_bits"),
    [(TPMA_OBJECT.SIGN_ENCRYPT, 0), (0, TPMA_OBJECT.RESTRICTED), (0, TPMA_OBJECT.FIXEDTPM)],
    ids=["sign-set", "not-restricted", "not-fixedTPM"],
)
def test_ek_public_with_wrong_attributes_is_refused(
    rig: Rig, set_bits: int, clear_bits: int
) -> None:
    # The certificate's key, but an area that does not describe an EK: the
    # verifier cannot ask the TPM, so it must read the attributes itself.
    with DeviceTpm(rig.dev.tpm.tcti) as t:
        request = enroll_request(t, enrolled_ak_public(t))
    ek = request.ek_public
    at = 2 + 2 + 2  # TPM2B size, type, nameAlg, then objectAttributes (UINT32)
    attrs = (int.from_bytes(ek[at : at + 4], "big") | set_bits) & ~clear_bits
    request.ek_public = ek[:at] + attrs.to_bytes(4, "big") + ek[at + 4 :]
    status, code, details = rpc_error(lambda: rig.server.enrollment.Enroll(request))
    assert (status, code) == (grpc.StatusCode.INVALID_ARGUMENT, "EK_ATTRIBUTES")
    assert "ek_public" in details


def reissue(
    leaf_der: bytes,
    maker: Manufacturer,
    *,
    eku: list[x509.ObjectIdentifier] | None = None,
    not_after: datetime.datetime | None = None,
    signer: rsa.RSAPrivateKey | None = None,
) -> bytes:
    """The EK certificate again, signed by ``maker``'s issuing CA key (or ``signer``),
    with at most the EKU or the expiry changed."""
    leaf = x509.load_der_x509_certificate(leaf_der)
    issuer = x509.load_pem_x509_certificate(maker.intermediate_cert_path.read_bytes())
    if signer is None:
        key = serialization.load_pem_private_key(
            (maker.ca_dir / "signkey.pem").read_bytes(), password=None
        )
        assert isinstance(key, rsa.RSAPrivateKey)
        signer = key
    not_after = not_after or leaf.not_valid_after_utc
    not_before = min(leaf.not_valid_before_utc, not_after - datetime.timedelta(days=365))
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(issuer.subject)
        .public_key(leaf.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for ext in leaf.extensions:
        value = ext.value
        if eku is not None and isinstance(value, x509.ExtendedKeyUsage):
            value = x509.ExtendedKeyUsage(eku)
        builder = builder.add_extension(value, ext.critical)
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


_YESTERDAY = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)


@pytest.mark.parametrize(
    ("changes", "outcome"),
    [
        ({}, None),  # the re-issuing itself is sound: accepted
        ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, ("INVALID_ARGUMENT", "EK_CERT_NOT_EK")),
        ({"not_after": _YESTERDAY}, ("PERMISSION_DENIED", "EK_CHAIN_UNTRUSTED")),
        ({"signer": "forger"}, ("PERMISSION_DENIED", "EK_CHAIN_UNTRUSTED")),
    ],
    ids=["reissued-unchanged", "not-an-ek-eku", "expired", "issuer-name-but-another-key"],
)
def test_ek_certificate_from_the_trusted_ca_with_one_defect_is_refused(
    rig: Rig,
    manufacturer: Manufacturer,
    changes: dict[str, object],
    outcome: tuple[str, str] | None,
) -> None:
    if changes.get("signer") == "forger":
        changes = {"signer": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
    with DeviceTpm(rig.dev.tpm.tcti) as t:
        request = enroll_request(t, enrolled_ak_public(t))
    request.ek_certificate = reissue(request.ek_certificate, manufacturer, **changes)  # type: ignore[arg-type]
    if outcome is None:
        assert rig.server.enrollment.Enroll(request).device_id == rig.dev.device_id
        return
    status, code, details = rpc_error(lambda: rig.server.enrollment.Enroll(request))
    assert (status.name, code) == outcome
    assert details.startswith("ek_certificate:"), details


def test_ek_certificate_of_another_tpm_is_refused(rig: Rig) -> None:
    with DeviceTpm(rig.dev.tpm.tcti) as a:
        cert_a, _ = a.endorsement()
    with DeviceTpm(rig.dev2.tpm.tcti) as b:
        _, ek_b = b.endorsement()
        ak_b = enrolled_ak_public(b)
    request = enrollment_pb2.EnrollRequest(ek_certificate=cert_a, ek_public=ek_b, ak_public=ak_b)
    status, code, details = rpc_error(lambda: rig.server.enrollment.Enroll(request))
    assert (status, code) == (grpc.StatusCode.INVALID_ARGUMENT, "EK_CERT_KEY_MISMATCH")
    assert "ek_public" in details


@pytest.mark.parametrize(
    "attrs",
    [
        AK_ATTRS & ~TPMA_OBJECT.RESTRICTED,
        # The TPM only makes a key without fixedTPM if fixedParent is clear too.
        AK_ATTRS & ~(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT),
    ],
    ids=["not-restricted", "not-fixedTPM"],
)
def test_ak_with_wrong_attributes_is_refused(rig: Rig, attrs: TPMA_OBJECT) -> None:
    with DeviceTpm(rig.dev.tpm.tcti) as t:
        key, ak_public = create_transient(t, "rsa2048:rsassa-sha256:null", attrs)
        t.ectx.flush_context(key)
        request = enroll_request(t, ak_public)
    status, code, details = rpc_error(lambda: rig.server.enrollment.Enroll(request))
    assert (status, code) == (grpc.StatusCode.INVALID_ARGUMENT, "AK_ATTRIBUTES")
    assert "ak_public" in details


def test_wrong_activation_secret_is_refused_and_burns_the_challenge(
    tpm_factory: Callable[..., SimTpm], rig: Rig
) -> None:
    tpm = tpm_factory()
    challenge, secret = challenge_for(rig.server, tpm)
    wrong = secrets.token_bytes(32)
    assert wrong != secret

    status, code, _ = rpc_error(
        lambda: activate(rig.server, challenge.device_id, challenge.challenge_id, wrong)
    )
    assert (status, code) == (grpc.StatusCode.PERMISSION_DENIED, "ACTIVATION_SECRET_MISMATCH")
    # Single use: the right secret is too late now, and no device came to be.
    status, code, _ = rpc_error(
        lambda: activate(rig.server, challenge.device_id, challenge.challenge_id, secret)
    )
    assert (status, code) == (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_USED")
    status, code, _ = rpc_error(
        lambda: rig.server.devices.GetDevice(
            enrollment_pb2.GetDeviceRequest(device_id=challenge.device_id)
        )
    )
    assert (status, code) == (grpc.StatusCode.NOT_FOUND, "DEVICE_UNKNOWN")
    status, code, _ = rpc_error(lambda: grant_for(rig.server, challenge.device_id))
    assert (status, code) == (grpc.StatusCode.NOT_FOUND, "DEVICE_UNKNOWN")


def test_expired_challenge_is_refused(
    device_factory: Callable[..., Device], server: ServerThread
) -> None:
    dev = device_factory(enroll=False)
    challenge, secret = challenge_for(server, dev.tpm)
    server.advance(301)  # challenges live 300 s
    status, code, _ = rpc_error(
        lambda: activate(server, challenge.device_id, challenge.challenge_id, secret)
    )
    assert (status, code) == (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_EXPIRED")


def test_another_ek_cannot_take_over_a_device_id(
    tpm_factory: Callable[..., SimTpm], rig: Rig
) -> None:
    victim = rig.server.devices.GetDevice(
        enrollment_pb2.GetDeviceRequest(device_id=rig.dev.device_id)
    )
    intruder = tpm_factory()
    challenge, secret = challenge_for(rig.server, intruder)
    assert challenge.device_id != victim.device_id  # ids derive from the EK

    status, code, _ = rpc_error(
        lambda: activate(rig.server, victim.device_id, challenge.challenge_id, secret)
    )
    assert (status, code) == (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_UNKNOWN")
    after = rig.server.devices.GetDevice(
        enrollment_pb2.GetDeviceRequest(device_id=victim.device_id)
    )
    assert (after.ek_fingerprint, after.ak_name) == (victim.ek_fingerprint, victim.ak_name)
    # The intruder's TPM may still enroll, as itself.
    done = activate(rig.server, challenge.device_id, challenge.challenge_id, secret)
    assert done.device_id == challenge.device_id != victim.device_id


# -- the TPM clock: never backwards ----------------------------------------------------


def _power_off(tpm: SimTpm) -> None:
    # Orderly TPM2_Shutdown first, as firmware does: a TPM that just loses power
    # comes back with clockInfo.safe = 0, which would be a finding of its own.
    subprocess.run(
        ["tpm2_shutdown", "-c", "-T", tpm.tcti], check=True, capture_output=True, env=_TSS_ENV
    )
    tpm.stop()


def _power_loss(tpm: SimTpm) -> None:
    """Reset without TPM2_Shutdown: TPM_Init on the control port, then Startup(CLEAR)."""
    assert tpm.port is not None
    subprocess.run(
        ["swtpm_ioctl", "--tcp", f"127.0.0.1:{tpm.port + 1}", "-i"], check=True, capture_output=True
    )
    subprocess.run(
        ["tpm2_startup", "-c", "-T", tpm.tcti], check=True, capture_output=True, env=_TSS_ENV
    )


def _reset_count(q: Quote) -> int:
    return parse_attest(q.attest).clock_info.reset_count


def test_reset_count_going_backwards_is_refused(
    device: Device, server: ServerThread, tmp_path: Path
) -> None:
    snapshot = tmp_path / "tpm-snapshot"
    _power_off(device.tpm)
    shutil.copytree(device.tpm.state_dir, snapshot)  # holds the enrolled AK
    device.tpm.start()
    device.tpm.boot()
    response, q1 = good_attestation(device)
    assert response.verdict.status == AFFIRMING

    device.tpm.powercycle()
    device.tpm.boot()
    response, q2 = good_attestation(device)
    assert response.verdict.status == AFFIRMING
    assert _reset_count(q2) > _reset_count(q1)

    # Put the old TPM state back: the TPM forgets the reboots since the snapshot.
    _power_off(device.tpm)
    shutil.rmtree(device.tpm.state_dir)
    shutil.copytree(snapshot, device.tpm.state_dir)
    device.tpm.start()
    device.tpm.boot()
    response, q3 = good_attestation(device)
    assert _reset_count(q3) < _reset_count(q2)
    failure = assert_refused(response, "RESET_COUNT_ROLLBACK")
    assert failure.subject == "quote.clockInfo.resetCount"
    assert (failure.expected, failure.got) == (f">= {_reset_count(q2)}", str(_reset_count(q3)))


def test_clock_not_known_to_be_safe_is_refused(device: Device, server: ServerThread) -> None:
    response, _ = good_attestation(device)
    assert response.verdict.status == AFFIRMING
    # Power lost without TPM2_Shutdown: the TPM cannot vouch for its clock
    # (clockInfo.safe = 0) until it next writes the clock to NV.
    _power_loss(device.tpm)
    device.tpm.boot()
    response, q = good_attestation(device)
    assert not parse_attest(q.attest).clock_info.safe
    failure = assert_refused(response, "CLOCK_UNSAFE")
    assert (failure.subject, failure.expected, failure.got) == ("quote.clockInfo.safe", "1", "0")


def _stored_clock(rig: Rig) -> dict[str, int]:
    device = rig.server.running.state.store.store.get_device(rig.dev.device_id)
    assert device.clock is not None
    return dict(device.clock)


def test_clock_is_recorded_and_a_later_quote_is_not_mistaken_for_a_replay(rig: Rig) -> None:
    # Replaying a (quote, signature) pair is stopped by the nonce (see above);
    # here: the clock is remembered, and an honest next quote is not refused.
    first, q1 = good_attestation(rig.dev)
    assert first.verdict.status == AFFIRMING
    c1 = parse_attest(q1.attest).clock_info
    assert _stored_clock(rig) == {
        "reset_count": c1.reset_count,
        "restart_count": c1.restart_count,
        "clock": c1.clock,
        "firmware_version": parse_attest(q1.attest).firmware_version,
    }

    second, q2 = good_attestation(rig.dev)
    assert second.verdict.status == AFFIRMING
    assert list(second.verdict.failures) == []
    assert second.credential
    c2 = parse_attest(q2.attest).clock_info
    assert (c2.reset_count, c2.clock) > (c1.reset_count, c1.clock)
    assert _stored_clock(rig)["clock"] == c2.clock


def test_refused_quote_does_not_move_the_stored_clock(rig: Rig) -> None:
    good_attestation(rig.dev)
    before = _stored_clock(rig)
    grant = grant_for(rig.server, rig.dev.device_id)
    q = quote_on(rig.dev.tpm, selection_of(grant), secrets.token_bytes(32))
    assert_refused(
        attest(rig.server, attest_request(rig.dev.device_id, grant.nonce, q)), "NONCE_MISMATCH"
    )
    assert _stored_clock(rig) == before
