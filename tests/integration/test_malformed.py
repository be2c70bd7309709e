"""Malformed requests: refused as INVALID_ARGUMENT (or RESOURCE_EXHAUSTED when too big)
with a message naming the field, never INTERNAL, and nothing lost or broken.

Every case starts from good evidence made by the device's TPM and breaks one
field. Afterwards the untouched request, with the same nonce, must still
affirm: parsing happens before the nonce is consumed, and the server keeps
serving. One server and one device serve the whole module.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest
from conftest import Device, ServerThread, rpc_code, server_config
from tpmsim import Manufacturer

from attestd.agent.client import Agent
from attestd.agent.tpm import DeviceTpm
from attestd.tlsinit import TlsFiles
from attestd.v1 import attestation_pb2, common_pb2, enrollment_pb2

pytestmark = pytest.mark.integration

AFFIRMING = common_pb2.VERDICT_STATUS_AFFIRMING
INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED
MIB = 1024 * 1024


@dataclasses.dataclass
class Rig:
    server: ServerThread
    dev: Device


@pytest.fixture(scope="module")
def rig(
    manufacturer: Manufacturer, tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles
) -> Iterator[Rig]:
    root: Path = tmp_path_factory.mktemp("malformed-rig")
    server = ServerThread(server_config(root / "server", manufacturer, tls_files), tls_files)
    tpm = None
    agent = None
    try:
        tpm = manufacturer.make_tpm(root / "tpm")
        tpm.start()
        tpm.boot()
        agent = Agent(server.agent_config(tpm.tcti, root / "agent"))
        agent.enroll()
        dev = Device(tpm, agent, server, root / "agent")
        server.put_policy(dev.golden_policy())
        yield Rig(server, dev)
    finally:
        if agent is not None:
            agent.close()
        if tpm is not None:
            tpm.stop()
        server.stop()


def good_request(rig: Rig) -> attestation_pb2.AttestRequest:
    """Fresh nonce, quoted by the device's TPM: a request that affirms as it is."""
    grant = rig.server.attestation.GetNonce(
        attestation_pb2.GetNonceRequest(device_id=rig.dev.device_id)
    )
    with DeviceTpm(rig.dev.tpm.tcti) as t:
        q = t.quote([(s.bank, list(s.indices)) for s in grant.pcr_selection], grant.nonce)
    return attestation_pb2.AttestRequest(
        device_id=rig.dev.device_id,
        nonce=grant.nonce,
        quote=q.attest,
        signature=q.signature,
        pcrs=[common_pb2.PcrBank(bank=b, values=v) for b, v in q.pcrs.items()],
    )


def refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, str]:
    """(status, attestd-code, details) of a call that must fail, and never as INTERNAL."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    status, code = rpc_code(info.value)
    details: str = info.value.details() or ""
    assert status != grpc.StatusCode.INTERNAL, details
    assert "Traceback" not in details
    return status, code, details


def assert_still_affirms(rig: Rig, request: attestation_pb2.AttestRequest) -> None:
    response = rig.server.attestation.Attest(request)
    assert response.verdict.status == AFFIRMING, list(response.verdict.failures)
    assert response.credential


# -- byte surgery on TPMS_ATTEST and TPMT_SIGNATURE ---------------------------------


def put(data: bytes, offset: int, value: int, size: int) -> bytes:
    return data[:offset] + value.to_bytes(size, "big") + data[offset + size :]


def extra_data_at(quote: bytes) -> int:
    """Offset of TPM2B extraData: after magic(4), type(2) and TPM2B qualifiedSigner."""
    return 8 + int.from_bytes(quote[6:8], "big")


def clock_info_at(quote: bytes) -> int:
    at = extra_data_at(quote)
    return at + 2 + int.from_bytes(quote[at : at + 2], "big")


def pcr_select_at(quote: bytes) -> int:
    # clockInfo: clock(8) resetCount(4) restartCount(4) safe(1); firmwareVersion(8).
    return clock_info_at(quote) + 17 + 8


def on_quote(change: Callable[[bytes], bytes]) -> Callable[[attestation_pb2.AttestRequest], None]:
    def mutate(r: attestation_pb2.AttestRequest) -> None:
        r.quote = change(r.quote)

    return mutate


def on_signature(
    change: Callable[[bytes], bytes],
) -> Callable[[attestation_pb2.AttestRequest], None]:
    def mutate(r: attestation_pb2.AttestRequest) -> None:
        r.signature = change(r.signature)

    return mutate


def on_sha256(
    change: Callable[[dict[int, bytes]], None],
) -> Callable[[attestation_pb2.AttestRequest], None]:
    def mutate(r: attestation_pb2.AttestRequest) -> None:
        (bank,) = r.pcrs
        values = dict(bank.values)
        change(values)
        bank.ClearField("values")
        bank.values.update(values)

    return mutate


def add_banks(*names: str) -> Callable[[attestation_pb2.AttestRequest], None]:
    def mutate(r: attestation_pb2.AttestRequest) -> None:
        r.pcrs.extend(common_pb2.PcrBank(bank=n, values={0: bytes(32)}) for n in names)

    return mutate


def set_field(name: str, value: object) -> Callable[[attestation_pb2.AttestRequest], None]:
    def mutate(r: attestation_pb2.AttestRequest) -> None:
        setattr(r, name, value)

    return mutate


class Case(NamedTuple):
    mutate: Callable[[attestation_pb2.AttestRequest], None]
    status: grpc.StatusCode
    code: str  # attestd-code; "" where gRPC itself refuses before attestd sees the call
    field: str | None  # what the message must name


def _set_item(index: int, value: bytes) -> Callable[[dict[int, bytes]], None]:
    def change(values: dict[int, bytes]) -> None:
        values[index] = value

    return change


ATTEST_CASES = {
    # quote (TPMS_ATTEST)
    "quote-empty": Case(on_quote(lambda q: b""), INVALID, "MALFORMED", "quote"),
    "quote-truncated-header": Case(on_quote(lambda q: q[:5]), INVALID, "MALFORMED", "quote"),
    "quote-truncated": Case(on_quote(lambda q: q[:-1]), INVALID, "MALFORMED", "quote"),
    "quote-trailing-bytes": Case(on_quote(lambda q: q + b"\0"), INVALID, "MALFORMED", "quote"),
    "quote-extraData-size-past-end": Case(
        on_quote(lambda q: put(q, extra_data_at(q), 256, 2)), INVALID, "MALFORMED", "quote"
    ),
    "quote-pcrDigest-size-past-end": Case(
        on_quote(lambda q: put(q, len(q) - 34, 33, 2)), INVALID, "MALFORMED", "quote"
    ),
    "quote-tpm2b-size-over-limit": Case(
        on_quote(lambda q: put(q, 6, 0xFFFF, 2)), INVALID, "MALFORMED", "quote"
    ),
    "quote-pcrSelect-count-huge": Case(
        on_quote(lambda q: put(q, pcr_select_at(q), 0xFFFFFFFF, 4)), INVALID, "MALFORMED", "quote"
    ),
    "quote-sizeofSelect-huge": Case(
        on_quote(lambda q: put(q, pcr_select_at(q) + 6, 0xFF, 1)), INVALID, "MALFORMED", "quote"
    ),
    "quote-clock-safe-not-boolean": Case(
        on_quote(lambda q: put(q, clock_info_at(q) + 16, 2, 1)), INVALID, "MALFORMED", "quote"
    ),
    "quote-not-a-quote-type": Case(
        on_quote(lambda q: put(q, 4, 0x8014, 2)), INVALID, "QUOTE_TYPE_INVALID", "quote"
    ),
    "quote-over-size-limit": Case(
        on_quote(lambda q: q + bytes(3000)), INVALID, "MALFORMED", "quote"
    ),
    # signature (TPMT_SIGNATURE)
    "signature-empty": Case(on_signature(lambda s: b""), INVALID, "MALFORMED", "signature"),
    "signature-truncated": Case(on_signature(lambda s: s[:-1]), INVALID, "MALFORMED", "signature"),
    "signature-trailing-bytes": Case(
        on_signature(lambda s: s + b"\0"), INVALID, "MALFORMED", "signature"
    ),
    "signature-unknown-sigAlg": Case(
        on_signature(lambda s: put(s, 0, 0x1234, 2)), INVALID, "MALFORMED", "signature"
    ),
    "signature-non-signing-sigAlg": Case(
        on_signature(lambda s: put(s, 0, 0x0005, 2)),
        INVALID,
        "MALFORMED",
        "signature",  # HMAC
    ),
    "signature-size-past-end": Case(
        on_signature(lambda s: put(s, 4, 257, 2)), INVALID, "MALFORMED", "signature"
    ),
    "signature-size-over-limit": Case(
        on_signature(lambda s: put(s, 4, 0xFFFF, 2)), INVALID, "MALFORMED", "signature"
    ),
    "signature-over-size-limit": Case(
        on_signature(lambda s: s + bytes(2000)), INVALID, "MALFORMED", "signature"
    ),
    # pcrs
    "pcrs-unknown-bank": Case(add_banks("md5"), INVALID, "MALFORMED", "pcrs.md5"),
    "pcrs-bank-twice": Case(add_banks("sha256"), INVALID, "MALFORMED", "pcrs.sha256"),
    "pcrs-bank-twice-other-case": Case(add_banks("SHA256"), INVALID, "MALFORMED", "pcrs.SHA256"),
    "pcrs-too-many-banks": Case(
        add_banks("sha1", "sha384", "sha512", "sm3_256"), INVALID, "MALFORMED", "pcrs"
    ),
    "pcrs-index-24": Case(
        on_sha256(_set_item(24, bytes(32))), INVALID, "MALFORMED", "pcrs.sha256.24"
    ),
    "pcrs-digest-short": Case(
        on_sha256(_set_item(3, bytes(31))), INVALID, "MALFORMED", "pcrs.sha256.3"
    ),
    "pcrs-digest-long": Case(
        on_sha256(_set_item(3, bytes(33))), INVALID, "MALFORMED", "pcrs.sha256.3"
    ),
    "pcrs-digest-empty": Case(on_sha256(_set_item(3, b"")), INVALID, "MALFORMED", "pcrs.sha256.3"),
    # nonce and device id
    "nonce-31-bytes": Case(
        lambda r: setattr(r, "nonce", r.nonce[:31]), INVALID, "MALFORMED", "nonce"
    ),
    "nonce-33-bytes": Case(
        lambda r: setattr(r, "nonce", r.nonce + b"\0"), INVALID, "MALFORMED", "nonce"
    ),
    "nonce-empty": Case(set_field("nonce", b""), INVALID, "MALFORMED", "nonce"),
    "device_id-empty": Case(set_field("device_id", ""), INVALID, "MALFORMED", "device_id"),
    "device_id-too-long": Case(
        set_field("device_id", "d" * 129), INVALID, "MALFORMED", "device_id"
    ),
    # size
    "event_log-over-limit": Case(
        set_field("event_log", bytes(MIB + 1)), TOO_BIG, "EVENT_LOG_TOO_LARGE", "event_log"
    ),
    "event_log-over-2MiB": Case(set_field("event_log", bytes(2 * MIB + 1)), TOO_BIG, "", None),
    "quote-over-2MiB": Case(set_field("quote", bytes(2 * MIB + 1)), TOO_BIG, "", None),
}


@pytest.mark.parametrize("case", ATTEST_CASES.values(), ids=ATTEST_CASES.keys())
def test_malformed_attest_is_refused_and_the_nonce_survives(rig: Rig, case: Case) -> None:
    good = good_request(rig)
    bad = attestation_pb2.AttestRequest()
    bad.CopyFrom(good)
    case.mutate(bad)
    assert bad != good

    status, code, details = refusal(lambda: rig.server.attestation.Attest(bad))
    assert (status, code) == (case.status, case.code), details
    if case.field is not None:
        assert details.startswith(f"{case.field}:"), details
    # Nothing was consumed and nothing broke: the good evidence, same nonce, affirms.
    assert_still_affirms(rig, good)


def test_several_malformed_attests_in_a_row_leave_the_nonce_usable(rig: Rig) -> None:
    good = good_request(rig)
    for case in ATTEST_CASES.values():
        bad = attestation_pb2.AttestRequest()
        bad.CopyFrom(good)
        case.mutate(bad)
        status, code, _ = refusal(functools.partial(rig.server.attestation.Attest, bad))
        assert (status, code) == (case.status, case.code)
    assert_still_affirms(rig, good)


@pytest.mark.parametrize(
    "device_id", ["", "d" * 129], ids=["device_id-empty", "device_id-too-long"]
)
def test_malformed_get_nonce_is_refused(rig: Rig, device_id: str) -> None:
    status, code, details = refusal(
        lambda: rig.server.attestation.GetNonce(
            attestation_pb2.GetNonceRequest(device_id=device_id)
        )
    )
    assert (status, code) == (INVALID, "MALFORMED")
    assert details.startswith("device_id:"), details


# -- enrollment ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_enroll(rig: Rig) -> enrollment_pb2.EnrollRequest:
    """The device's real EK certificate, EK and (enrolled) AK: Enroll accepts it."""
    with DeviceTpm(rig.dev.tpm.tcti) as t:
        cert, ek_public = t.endorsement()
        ak_public = t.ak_public()
    assert ak_public is not None
    return enrollment_pb2.EnrollRequest(
        ek_certificate=cert, ek_public=ek_public, ak_public=ak_public
    )


def _field(
    name: str, change: Callable[[bytes], bytes]
) -> Callable[[enrollment_pb2.EnrollRequest], None]:
    def mutate(r: enrollment_pb2.EnrollRequest) -> None:
        setattr(r, name, change(getattr(r, name)))

    return mutate


def _intermediates(*ders: bytes) -> Callable[[enrollment_pb2.EnrollRequest], None]:
    def mutate(r: enrollment_pb2.EnrollRequest) -> None:
        r.ek_intermediates.extend(ders)

    return mutate


def _strip_size(public: bytes) -> bytes:
    """TPM2B_PUBLIC -> TPMT_PUBLIC (attestd accepts both)."""
    assert int.from_bytes(public[:2], "big") == len(public) - 2
    return public[2:]


ENROLL_CASES = {
    "ek_certificate-empty": (_field("ek_certificate", lambda c: b""), "ek_certificate"),
    "ek_certificate-garbage": (
        _field("ek_certificate", lambda c: b"-----BEGIN CERTIFICATE----- not DER"),
        "ek_certificate",
    ),
    "ek_certificate-truncated": (_field("ek_certificate", lambda c: c[:-20]), "ek_certificate"),
    "ek_certificate-trailing-bytes": (
        _field("ek_certificate", lambda c: c + b"\0\0"),
        "ek_certificate",
    ),
    "ek_certificate-oversize": (
        _field("ek_certificate", lambda c: c + bytes(9000)),
        "ek_certificate",
    ),
    "ek_public-empty": (_field("ek_public", lambda p: b""), "ek_public"),
    "ek_public-truncated": (_field("ek_public", lambda p: p[:-10]), "ek_public"),
    "ek_public-truncated-tpmt": (_field("ek_public", lambda p: _strip_size(p)[:-10]), "ek_public"),
    "ek_public-trailing-bytes": (
        _field("ek_public", lambda p: _strip_size(p) + b"\0"),
        "ek_public",
    ),
    "ek_public-garbage": (_field("ek_public", lambda p: b"\xde\xad" * 100), "ek_public"),
    "ak_public-garbage": (_field("ak_public", lambda p: b"\x00\x01" * 40), "ak_public"),
    "ak_public-truncated": (_field("ak_public", lambda p: p[:-1]), "ak_public"),
    "ak_public-keyedhash-type": (
        _field("ak_public", lambda p: put(_strip_size(p), 0, 0x0008, 2)),
        "ak_public",
    ),
    "ek_intermediates-garbage": (_intermediates(b"garbage"), "ek_intermediates[0]"),
    "ek_intermediates-too-many": (_intermediates(*[b"x"] * 5), "ek_intermediates"),
}


def test_the_unmodified_enroll_request_is_accepted(
    rig: Rig, good_enroll: enrollment_pb2.EnrollRequest
) -> None:
    # The baseline every case below breaks (a challenge nobody answers is harmless).
    assert rig.server.enrollment.Enroll(good_enroll).device_id == rig.dev.device_id


@pytest.mark.parametrize(("mutate", "field"), ENROLL_CASES.values(), ids=ENROLL_CASES.keys())
def test_malformed_enroll_is_refused(
    rig: Rig,
    good_enroll: enrollment_pb2.EnrollRequest,
    mutate: Callable[[enrollment_pb2.EnrollRequest], None],
    field: str,
) -> None:
    bad = enrollment_pb2.EnrollRequest()
    bad.CopyFrom(good_enroll)
    mutate(bad)
    status, code, details = refusal(lambda: rig.server.enrollment.Enroll(bad))
    assert (status, code) == (INVALID, "MALFORMED"), details
    assert details.startswith(f"{field}:"), details
    assert_still_affirms(rig, good_request(rig))


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (enrollment_pb2.ActivateRequest(challenge_id="c", secret=bytes(32)), "device_id"),
        (enrollment_pb2.ActivateRequest(device_id="d", secret=bytes(32)), "challenge_id"),
        (
            enrollment_pb2.ActivateRequest(device_id="d", challenge_id="c", secret=bytes(65)),
            "secret",
        ),
    ],
    ids=["device_id-empty", "challenge_id-empty", "secret-too-long"],
)
def test_malformed_activate_is_refused(
    rig: Rig, request_: enrollment_pb2.ActivateRequest, field: str
) -> None:
    status, code, details = refusal(lambda: rig.server.enrollment.Activate(request_))
    assert (status, code) == (INVALID, "MALFORMED"), details
    assert field in details, details
    assert_still_affirms(rig, good_request(rig))
