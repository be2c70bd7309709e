"""attestd.core.quote.appraise_quote: every check of DESIGN.md "What Attest
must check", each shown by the reason code it reports.

Real evidence comes from the session swtpm (RSA and ECC AKs). Evidence a TPM
will not produce (a wrong magic, an unsafe clock, a SHA-1 or PSS signature)
is forged with a software key standing in for the AK (tests/unit/forge.py).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

import forge
import pytest
from realquotes import GcpQuote
from sessiontpm import ECC_AK_HANDLE, RSA_AK_HANDLE, tpml_selection
from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.types import TPMT_SIG_SCHEME

from attestd.agent.tpm import DeviceTpm
from attestd.core import verdict as v
from attestd.core.errors import MalformedError
from attestd.core.policy import Policy, policy_from_document
from attestd.core.quote import (
    Appraisal,
    ClockState,
    QuoteEvidence,
    _clock_failure,
    appraise_quote,
    parse_evidence,
)
from attestd.core.toolformats import load_ak
from attestd.core.tpm import Alg, PublicArea, parse_attest, parse_public
from attestd.core.verdict import Status

SELECTION = [("sha256", [0, 1, 2, 4, 7])]
NOW_MS = 1_700_000_000_000


@dataclass(frozen=True)
class Made:
    """One quote and everything needed to appraise it."""

    ak: PublicArea
    quote: bytes
    signature: bytes
    pcrs: dict[str, dict[int, bytes]]
    nonce: bytes

    def evidence(
        self,
        *,
        quote: bytes | None = None,
        signature: bytes | None = None,
        pcrs: dict[str, dict[int, bytes]] | None = None,
    ) -> QuoteEvidence:
        return parse_evidence(
            self.quote if quote is None else quote,
            self.signature if signature is None else signature,
            self.pcrs if pcrs is None else pcrs,
        )

    def appraise(self, evidence: QuoteEvidence | None = None, **kw: Any) -> Appraisal:
        ak = kw.pop("ak", self.ak)
        args: dict[str, Any] = {
            "nonce": self.nonce,
            "policy": None,
            "previous": None,
            "now_ms": NOW_MS,
        }
        args.update(kw)
        return appraise_quote(evidence or self.evidence(), ak, **args)


def _quote(device: DeviceTpm, ak_public: bytes, handle: int, selection: Any = SELECTION) -> Made:
    nonce = secrets.token_bytes(32)
    q = device.quote(selection, nonce, handle)
    return Made(parse_public(ak_public), q.attest, q.signature, q.pcrs, nonce)


@pytest.fixture(scope="module", params=["rsa", "ecc"])
def made(request: pytest.FixtureRequest, device: DeviceTpm, rsa_ak: bytes, ecc_ak: bytes) -> Made:
    if request.param == "rsa":
        return _quote(device, rsa_ak, RSA_AK_HANDLE)
    return _quote(device, ecc_ak, ECC_AK_HANDLE)


@pytest.fixture(scope="module")
def rsa_made(device: DeviceTpm, rsa_ak: bytes) -> Made:
    return _quote(device, rsa_ak, RSA_AK_HANDLE)


def policy_for(
    pcrs: dict[str, dict[int, bytes]], *, only: list[int] | None = None, **overrides: Any
) -> Policy:
    """A policy whose reference values are ``pcrs`` (restricted to ``only``), with overrides.

    ``overrides`` maps a PCR index to the digest (hex) or list of digests to allow instead.
    """
    doc: dict[str, Any] = {"name": "lab", "pcrs": {}}
    for bank, values in pcrs.items():
        doc["pcrs"][bank] = {i: d.hex() for i, d in values.items() if only is None or i in only}
    for key, value in overrides.items():
        if key == "allow_sha1":
            doc["allow_sha1"] = value
        else:
            doc["pcrs"]["sha256"][int(key.removeprefix("pcr"))] = value
    return policy_from_document(doc)


def codes(appraisal: Appraisal) -> list[str]:
    return appraisal.verdict.codes()


def warning_codes(appraisal: Appraisal) -> list[str]:
    return [w.code.value for w in appraisal.verdict.warnings]


def other_pcrs(pcrs: dict[str, dict[int, bytes]], index: int) -> dict[str, dict[int, bytes]]:
    out = {bank: dict(values) for bank, values in pcrs.items()}
    out["sha256"][index] = forge.flip(out["sha256"][index], 0)
    return out


# --- success ----------------------------------------------------------------


def test_real_quote_with_matching_policy_is_affirming(made: Made) -> None:
    policy = policy_for(made.pcrs)
    a = made.appraise(policy=policy)
    verdict = a.verdict
    assert verdict.status is Status.AFFIRMING
    assert verdict.failures == () and verdict.warnings == ()
    assert verdict.trust_vector.as_ear() == {
        "instance-identity": v.TRUSTWORTHY_INSTANCE,
        "configuration": v.APPROVED_CONFIG,
        "executables": v.APPROVED_BOOT,
        "hardware": v.GENUINE_HARDWARE,
    }
    assert verdict.policy_name == "lab"
    assert verdict.appraised_at_ms == NOW_MS
    assert a.accepted_clock == ClockState.of(parse_attest(made.quote))
    assert a.evidence.attest.extra_data == made.nonce


def test_without_policy_only_integrity_is_claimed(made: Made) -> None:
    a = made.appraise(policy=None)
    assert a.verdict.status is Status.AFFIRMING
    assert a.verdict.trust_vector.as_ear() == {"instance-identity": 2, "hardware": 2}
    assert a.verdict.policy_name == ""


def test_without_nonce_freshness_is_not_checked_and_says_so(made: Made) -> None:
    a = made.appraise(nonce=None)
    assert a.verdict.failures == ()
    assert warning_codes(a) == ["NONCE_NOT_CHECKED"]
    assert a.verdict.warnings[0].got == made.nonce.hex()


def test_several_allowed_values_per_pcr(made: Made) -> None:
    good = made.pcrs["sha256"][4].hex()
    policy = policy_for(made.pcrs, pcr4=["00" * 32, good, "11" * 32])
    assert made.appraise(policy=policy).verdict.status is Status.AFFIRMING


# --- 1-2: structure and signature -------------------------------------------


def _assert_crypto_failure(a: Appraisal, code: str) -> None:
    assert codes(a) == [code]
    assert a.verdict.status is Status.CONTRAINDICATED
    # Nothing past the signature was judged: identity is the only claim.
    assert a.verdict.trust_vector.as_ear() == {"instance-identity": v.CRYPTO_VALIDATION_FAILED}
    assert a.accepted_clock is None


def test_flipped_byte_in_the_signed_message_is_signature_invalid(made: Made) -> None:
    # The last byte is inside pcrDigest: the structure still parses.
    quote = forge.flip(made.quote, len(made.quote) - 1)
    a = made.appraise(made.evidence(quote=quote), policy=policy_for(made.pcrs))
    _assert_crypto_failure(a, "SIGNATURE_INVALID")
    assert a.verdict.failures[0].subject == "signature"


def test_flipped_byte_in_the_signature_is_signature_invalid(made: Made) -> None:
    sig = forge.flip(made.signature, len(made.signature) - 1)
    _assert_crypto_failure(made.appraise(made.evidence(signature=sig)), "SIGNATURE_INVALID")


def test_a_bad_signature_stops_the_appraisal(made: Made) -> None:
    # Nothing in unauthenticated bytes is judged: no nonce or PCR findings follow.
    sig = forge.flip(made.signature, len(made.signature) - 1)
    a = made.appraise(
        made.evidence(signature=sig, pcrs=other_pcrs(made.pcrs, 7)),
        nonce=b"another nonce",
        policy=policy_for(made.pcrs, pcr7="00" * 32),
        previous=ClockState(10**9, 0, 2**62, 2**63),
    )
    _assert_crypto_failure(a, "SIGNATURE_INVALID")


def test_quote_signed_by_another_key_of_the_same_kind(made: Made) -> None:
    key = forge.SoftKey.rsa() if made.ak.type == Alg.RSA else forge.SoftKey.ecc()
    other = parse_public(key.public_area())
    _assert_crypto_failure(made.appraise(ak=other), "SIGNATURE_INVALID")


def test_quote_checked_against_an_ak_of_the_other_type(rsa_made: Made, ecc_ak: bytes) -> None:
    a = rsa_made.appraise(ak=parse_public(ecc_ak))
    _assert_crypto_failure(a, "SIGNATURE_SCHEME_MISMATCH")
    f = a.verdict.failures[0]
    assert (f.subject, f.expected, f.got) == ("signature.sigAlg", "ecdsa", "rsassa")


def test_required_hash_differs(made: Made) -> None:
    a = made.appraise(required_hash=Alg.SHA384)
    _assert_crypto_failure(a, "SIGNATURE_HASH_NOT_ALLOWED")
    f = a.verdict.failures[0]
    assert (f.expected, f.got) == ("sha384", "sha256")
    assert made.appraise(required_hash=Alg.SHA256).verdict.failures == ()


# --- forged evidence: software keys ------------------------------------------

SW_VALUES = {"sha256": {i: bytes([i]) * 32 for i in (0, 1, 2, 4, 7)}}
SW_NONCE = b"forged-nonce-0123456789abcdef!!!"


@pytest.fixture(scope="module")
def sw_rsa() -> forge.SoftKey:
    return forge.SoftKey.rsa()


@pytest.fixture(scope="module")
def sw_ecc() -> forge.SoftKey:
    return forge.SoftKey.ecc()


def forged(
    key: forge.SoftKey,
    *,
    ak: PublicArea | None = None,
    hash_alg: int = forge.SHA256,
    scheme: int | None = None,
    values: dict[str, dict[int, bytes]] = SW_VALUES,
    **attest_fields: Any,
) -> Made:
    """A quote over ``values`` made and signed in software; the AK defaults to the PEM."""
    selection = [(forge.BANK_ALG[b], sorted(vals)) for b, vals in values.items()]
    digest = forge.pcr_digest(hash_alg, selection, values)
    attest_fields.setdefault("extra_data", SW_NONCE)
    message = forge.attest(selection=selection, digest=digest, **attest_fields)
    return Made(
        ak or load_ak(key.pem()),
        message,
        key.sign(message, hash_alg, scheme),
        values,
        SW_NONCE,
    )


def test_forged_quote_baseline_is_affirming(sw_rsa: forge.SoftKey, sw_ecc: forge.SoftKey) -> None:
    # The forgery machinery itself is right: a well-formed quote passes.
    for key in (sw_rsa, sw_ecc):
        a = forged(key).appraise(policy=policy_for(SW_VALUES))
        assert a.verdict.status is Status.AFFIRMING, a.verdict.failures


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
def test_sha1_signature_needs_explicit_permission(
    kind: str, sw_rsa: forge.SoftKey, sw_ecc: forge.SoftKey
) -> None:
    m = forged(sw_rsa if kind == "rsa" else sw_ecc, hash_alg=forge.SHA1)
    refused = m.appraise()
    _assert_crypto_failure(refused, "SIGNATURE_HASH_NOT_ALLOWED")
    f = refused.verdict.failures[0]
    assert f.got == "sha1" and "sha1" not in f.expected.split("/")
    assert "SHA-1" in f.detail

    assert m.appraise(allow_sha1=True).verdict.status is Status.AFFIRMING
    # The policy can grant it; an explicit allow_sha1=False overrides the policy.
    lenient = policy_for(SW_VALUES, allow_sha1=True)
    assert m.appraise(policy=lenient).verdict.status is Status.AFFIRMING
    _assert_crypto_failure(
        m.appraise(policy=lenient, allow_sha1=False), "SIGNATURE_HASH_NOT_ALLOWED"
    )


def test_rsapss_and_stronger_hashes_verify(sw_rsa: forge.SoftKey) -> None:
    for hash_alg in (forge.SHA256, forge.SHA384, forge.SHA512):
        m = forged(sw_rsa, hash_alg=hash_alg, scheme=forge.RSAPSS)
        assert m.appraise().verdict.status is Status.AFFIRMING, hash_alg


def test_signature_scheme_must_match_the_keys(sw_rsa: forge.SoftKey) -> None:
    # The AK's TPMT_PUBLIC fixes RSASSA-SHA256: PSS, or another hash, is refused.
    ak = parse_public(sw_rsa.public_area(scheme=forge.RSASSA, scheme_hash=forge.SHA256))
    assert forged(sw_rsa, ak=ak).appraise().verdict.failures == ()

    pss = forged(sw_rsa, ak=ak, scheme=forge.RSAPSS).appraise()
    _assert_crypto_failure(pss, "SIGNATURE_SCHEME_MISMATCH")
    f = pss.verdict.failures[0]
    assert (f.subject, f.expected, f.got) == ("signature.sigAlg", "rsassa", "rsapss")

    sha384 = forged(sw_rsa, ak=ak, hash_alg=forge.SHA384).appraise()
    _assert_crypto_failure(sha384, "SIGNATURE_SCHEME_MISMATCH")
    f = sha384.verdict.failures[0]
    assert (f.subject, f.expected, f.got) == ("signature.hash", "sha256", "sha384")


def test_rsa_signature_for_an_ecc_key_is_a_scheme_mismatch(
    sw_rsa: forge.SoftKey, sw_ecc: forge.SoftKey
) -> None:
    m = forged(sw_rsa, ak=load_ak(sw_ecc.pem()))
    _assert_crypto_failure(m.appraise(), "SIGNATURE_SCHEME_MISMATCH")


def test_wrong_magic_is_reported_and_stops_the_appraisal(sw_rsa: forge.SoftKey) -> None:
    a = forged(sw_rsa, magic=0xFF544348, extra_data=b"other").appraise()
    _assert_crypto_failure(a, "QUOTE_MAGIC_INVALID")
    f = a.verdict.failures[0]
    assert (f.subject, f.expected, f.got) == ("quote.magic", "0xff544347", "0xff544348")


def test_certify_attestation_is_not_a_quote(sw_rsa: forge.SoftKey) -> None:
    body = forge.tpm2b(b"\x00\x0b" + bytes(32)) + forge.tpm2b(b"\x00\x0b" + bytes(32))
    message = forge.attest(st=forge.ST_ATTEST_CERTIFY, extra_data=SW_NONCE, body=body)
    m = Made(load_ak(sw_rsa.pem()), message, sw_rsa.sign(message), {}, SW_NONCE)
    a = m.appraise()
    _assert_crypto_failure(a, "QUOTE_TYPE_INVALID")
    assert a.verdict.failures[0].got == "0x8017"


def test_unsafe_clock_is_refused(sw_rsa: forge.SoftKey) -> None:
    a = forged(sw_rsa, safe=0).appraise(policy=policy_for(SW_VALUES))
    assert codes(a) == ["CLOCK_UNSAFE"]
    assert a.verdict.trust_vector.hardware == v.CONTRAINDICATED_HARDWARE
    assert a.verdict.status is Status.CONTRAINDICATED
    assert a.accepted_clock is None


def test_repeated_bank_in_the_signed_selection(sw_rsa: forge.SoftKey) -> None:
    values = SW_VALUES["sha256"]
    selection = [(forge.SHA256, [0, 1]), (forge.SHA256, [2])]
    digest = forge.pcr_digest(forge.SHA256, selection, SW_VALUES)
    message = forge.attest(extra_data=SW_NONCE, selection=selection, digest=digest)
    pcrs = {"sha256": {i: values[i] for i in (0, 1, 2)}}
    m = Made(load_ak(sw_rsa.pem()), message, sw_rsa.sign(message), pcrs, SW_NONCE)
    a = m.appraise()
    assert codes(a) == ["PCR_SELECTION_MISMATCH"]
    assert "repeats a bank" in a.verdict.failures[0].detail


def test_unknown_bank_in_the_signed_selection(sw_rsa: forge.SoftKey) -> None:
    sm3 = 0x0012
    digest = forge.pcr_digest(forge.SHA256, [(forge.SHA256, [0])], SW_VALUES)
    message = forge.attest(
        extra_data=SW_NONCE, selection=[(forge.SHA256, [0]), (sm3, [0])], digest=digest
    )
    pcrs = {"sha256": {0: SW_VALUES["sha256"][0]}}
    m = Made(load_ak(sw_rsa.pem()), message, sw_rsa.sign(message), pcrs, SW_NONCE)
    assert codes(m.appraise()) == ["PCR_SELECTION_MISMATCH"]


# --- 3: freshness -----------------------------------------------------------


@pytest.mark.parametrize(
    "wrong",
    [
        lambda n: forge.flip(n, 31),
        lambda n: n[:-1],
        lambda n: n + b"\x00",
        lambda n: b"",
    ],
    ids=["one-bit", "prefix", "longer", "empty"],
)
def test_nonce_mismatch(made: Made, wrong: Any) -> None:
    expected = wrong(made.nonce)
    a = made.appraise(nonce=expected, policy=policy_for(made.pcrs))
    assert codes(a) == ["NONCE_MISMATCH"]
    f = a.verdict.failures[0]
    assert (f.subject, f.expected, f.got) == ("quote.extraData", expected.hex(), made.nonce.hex())
    assert a.verdict.trust_vector.instance_identity == v.UNTRUSTWORTHY_INSTANCE
    assert a.accepted_clock is None


# --- 4: signed selection and digest -----------------------------------------


def test_submitted_value_not_the_signed_one_is_pcr_digest_mismatch(made: Made) -> None:
    pcrs = other_pcrs(made.pcrs, 7)
    a = made.appraise(made.evidence(pcrs=pcrs), policy=policy_for(made.pcrs))
    # Only the digest: values the signature does not vouch for are not judged.
    assert codes(a) == ["PCR_DIGEST_MISMATCH"]
    f = a.verdict.failures[0]
    assert f.subject == "quote.pcrDigest"
    assert f.expected == parse_attest(made.quote).pcr_digest.hex()
    # Unverified values say nothing about configuration or code.
    assert a.verdict.trust_vector.as_ear() == {
        "instance-identity": v.UNTRUSTWORTHY_INSTANCE,
        "hardware": v.GENUINE_HARDWARE,
    }


@pytest.mark.parametrize(
    "change",
    [
        lambda p: {"sha256": {i: d for i, d in p["sha256"].items() if i != 4}},
        lambda p: {"sha256": {**p["sha256"], 9: bytes(32)}},
        lambda p: {**p, "sha1": {0: bytes(20)}},
        lambda p: {"sha1": {i: bytes(20) for i in p["sha256"]}},
    ],
    ids=["missing-pcr", "extra-pcr", "extra-bank", "other-bank"],
)
def test_submitted_values_not_the_quoted_selection(made: Made, change: Any) -> None:
    a = made.appraise(made.evidence(pcrs=change(made.pcrs)), policy=policy_for(made.pcrs))
    assert codes(a) == ["PCR_VALUES_SELECTION_MISMATCH"]
    assert a.verdict.failures[0].expected == "sha256:0,1,2,4,7"
    assert a.verdict.status is Status.CONTRAINDICATED


def test_quote_covers_more_than_the_policy_asks(made: Made) -> None:
    a = made.appraise(policy=policy_for(made.pcrs, only=[0, 1, 2, 7]))
    assert codes(a) == ["PCR_SELECTION_MISMATCH"]
    f = a.verdict.failures[0]
    assert (f.subject, f.expected, f.got) == (
        "quote.pcrSelect",
        "sha256:0,1,2,7",
        "sha256:0,1,2,4,7",
    )
    assert a.verdict.status is Status.CONTRAINDICATED


@pytest.mark.parametrize("case", ["policy-lists-pcr-9", "policy-in-sha1-bank"])
def test_quote_covers_less_than_the_policy_asks(made: Made, case: str) -> None:
    # Regression: the reference-value step used to index the PCR the quote lacks
    # (KeyError out of appraise_quote; fixed in 7c354f3).
    if case == "policy-lists-pcr-9":
        policy = policy_for(made.pcrs, pcr9="00" * 32)
    else:
        policy = policy_from_document(
            {"name": "lab", "allow_sha1": True, "pcrs": {"sha1": {0: "00" * 20}}}
        )
    a = made.appraise(policy=policy)
    assert codes(a) == ["PCR_SELECTION_MISMATCH"]
    assert a.verdict.status is Status.CONTRAINDICATED
    assert a.accepted_clock is None


@pytest.fixture(scope="module")
def with_empty_bank(device: DeviceTpm, rsa_ak: bytes) -> Made:
    """A real quote whose signed selection carries an empty sha1 entry."""
    nonce = secrets.token_bytes(32)
    ectx = device.ectx
    attest, sig = ectx.quote(
        ectx.tr_from_tpmpublic(RSA_AK_HANDLE),
        tpml_selection([*SELECTION, ("sha1", [])]),
        nonce,
        TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
    )
    return Made(
        parse_public(rsa_ak),
        bytes(attest),
        bytes(sig.marshal()),
        device.read_pcrs(SELECTION),
        nonce,
    )


def test_empty_bank_entry_with_its_bank_submitted_empty(with_empty_bank: Made) -> None:
    m = with_empty_bank
    pcrs = {**m.pcrs, "sha1": {}}
    a = m.appraise(m.evidence(pcrs=pcrs), policy=policy_for(m.pcrs))
    assert a.verdict.status is Status.AFFIRMING, a.verdict.failures


def test_empty_bank_entry_without_values_for_it(with_empty_bank: Made) -> None:
    # Regression: pcr_digest looked the empty entry's bank up among the submitted
    # values (KeyError out of appraise_quote; fixed in 8bfa8b9).
    m = with_empty_bank
    a = m.appraise(policy=policy_for(m.pcrs))
    assert a.verdict.status is Status.AFFIRMING


# --- 5: reference values ----------------------------------------------------


def test_configuration_pcr_not_allowed_lowers_configuration(made: Made) -> None:
    a = made.appraise(policy=policy_for(made.pcrs, pcr7="ab" * 32))
    assert codes(a) == ["PCR_VALUE_NOT_ALLOWED"]
    f = a.verdict.failures[0]
    assert (f.subject, f.expected, f.got) == (
        "pcr[sha256:7]",
        "ab" * 32,
        made.pcrs["sha256"][7].hex(),
    )
    tv = a.verdict.trust_vector
    assert tv.configuration == v.UNSUPPORTABLE_CONFIG
    assert tv.executables == v.APPROVED_BOOT
    # The values were signed: the instance itself is trustworthy.
    assert tv.instance_identity == v.TRUSTWORTHY_INSTANCE
    assert a.verdict.status is Status.CONTRAINDICATED
    assert a.accepted_clock is None


def test_code_pcr_not_allowed_lowers_executables(made: Made) -> None:
    a = made.appraise(policy=policy_for(made.pcrs, pcr4="cd" * 32))
    assert codes(a) == ["PCR_VALUE_NOT_ALLOWED"]
    assert a.verdict.failures[0].subject == "pcr[sha256:4]"
    tv = a.verdict.trust_vector
    assert tv.executables == v.CONTRAINDICATED_EXECUTABLES
    assert tv.configuration == v.APPROVED_CONFIG
    assert a.verdict.status is Status.CONTRAINDICATED


def test_every_disallowed_pcr_is_reported(made: Made) -> None:
    policy = policy_for(made.pcrs, pcr0="01" * 32, pcr4="02" * 32, pcr7="03" * 32)
    a = made.appraise(policy=policy)
    assert [f.subject for f in a.verdict.failures] == [
        "pcr[sha256:0]",
        "pcr[sha256:4]",
        "pcr[sha256:7]",
    ]


# --- 6: clock and firmware ----------------------------------------------------


def test_clock_failure_table(rsa_made: Made) -> None:
    attest = parse_attest(rsa_made.quote)
    now = ClockState.of(attest)
    r, s, c = now.reset_count, now.restart_count, now.clock
    assert _clock_failure(now, attest) is not None  # the same state again: a replay

    def code(prev: ClockState) -> str | None:
        f = _clock_failure(prev, attest)
        return None if f is None else f.code.value

    fw = now.firmware_version
    assert code(ClockState(r + 1, s, c - 1, fw)) == "RESET_COUNT_ROLLBACK"
    assert code(ClockState(r + 1, 0, 0, fw)) == "RESET_COUNT_ROLLBACK"
    assert code(ClockState(r, s + 1, c - 1, fw)) == "RESTART_COUNT_ROLLBACK"
    assert code(ClockState(r, s, c, fw)) == "CLOCK_NOT_ADVANCING"
    assert code(ClockState(r, s, c + 10**6, fw)) == "CLOCK_NOT_ADVANCING"
    assert code(ClockState(r, s, c - 1, fw)) is None
    # After a TPM reset the clock is not compared (it may lag after a power loss).
    if r > 0:
        assert code(ClockState(r - 1, s + 5, c + 10**6, fw)) is None


@pytest.mark.parametrize(
    "delta, code, subject",
    [
        ((1, 0, -1), "RESET_COUNT_ROLLBACK", "quote.clockInfo.resetCount"),
        ((0, 1, -1), "RESTART_COUNT_ROLLBACK", "quote.clockInfo.restartCount"),
        ((0, 0, 0), "CLOCK_NOT_ADVANCING", "quote.clockInfo.clock"),
        ((0, 0, 1000), "CLOCK_NOT_ADVANCING", "quote.clockInfo.clock"),
    ],
)
def test_clock_going_backwards_is_refused(
    rsa_made: Made, delta: tuple[int, int, int], code: str, subject: str
) -> None:
    now = ClockState.of(parse_attest(rsa_made.quote))
    prev = ClockState(
        now.reset_count + delta[0],
        now.restart_count + delta[1],
        now.clock + delta[2],
        now.firmware_version,
    )
    a = rsa_made.appraise(policy=policy_for(rsa_made.pcrs), previous=prev)
    assert codes(a) == [code]
    assert a.verdict.failures[0].subject == subject
    assert a.verdict.trust_vector.hardware == v.CONTRAINDICATED_HARDWARE
    assert a.verdict.status is Status.CONTRAINDICATED
    assert a.accepted_clock is None


def test_firmware_downgrade_is_a_warning(rsa_made: Made) -> None:
    now = ClockState.of(parse_attest(rsa_made.quote))
    prev = replace(now, clock=now.clock - 1, firmware_version=now.firmware_version + 1)
    a = rsa_made.appraise(policy=policy_for(rsa_made.pcrs), previous=prev)
    assert a.verdict.failures == ()
    assert warning_codes(a) == ["FIRMWARE_DOWNGRADE"]
    assert a.verdict.warnings[0].subject == "quote.firmwareVersion"
    assert a.verdict.trust_vector.hardware == v.UNSAFE_HARDWARE
    assert a.verdict.status is Status.WARNING
    # A warning is still accepted: the clock state to remember is this quote's.
    assert a.accepted_clock == now


def test_firmware_upgrade_is_fine(rsa_made: Made) -> None:
    now = ClockState.of(parse_attest(rsa_made.quote))
    prev = replace(now, clock=now.clock - 1, firmware_version=now.firmware_version - 1)
    a = rsa_made.appraise(policy=policy_for(rsa_made.pcrs), previous=prev)
    assert a.verdict.status is Status.AFFIRMING and a.verdict.warnings == ()


def test_consecutive_real_quotes_and_a_replay(device: DeviceTpm, rsa_ak: bytes) -> None:
    first = _quote(device, rsa_ak, RSA_AK_HANDLE)
    time.sleep(0.01)  # the TPM clock counts milliseconds
    second = _quote(device, rsa_ak, RSA_AK_HANDLE)
    accepted = first.appraise().accepted_clock
    assert accepted is not None
    later = second.appraise(previous=accepted)
    assert later.verdict.status is Status.AFFIRMING, later.verdict.failures
    assert later.accepted_clock is not None
    # The first quote presented again after the second was accepted: a replay.
    assert codes(first.appraise(previous=later.accepted_clock)) == ["CLOCK_NOT_ADVANCING"]


# --- parse_evidence -------------------------------------------------------------


@pytest.mark.parametrize(
    "pcrs, field",
    [
        ({"sha3": {0: bytes(32)}}, "pcrs.sha3"),
        ({"sha256": {24: bytes(32)}}, "pcrs.sha256.24"),
        ({"sha256": {-1: bytes(32)}}, "pcrs.sha256.-1"),
        ({"sha256": {0: bytes(31)}}, "pcrs.sha256.0"),
        ({"sha1": {0: bytes(32)}}, "pcrs.sha1.0"),
        ({"sha256": {}, "SHA256": {}}, "pcrs.SHA256"),
        ({b: {} for b in ("sha1", "sha256", "sha384", "sha512", "sha3")}, "pcrs"),
    ],
)
def test_parse_evidence_refuses_bad_pcr_values(
    rsa_made: Made, pcrs: dict[str, dict[int, bytes]], field: str
) -> None:
    with pytest.raises(MalformedError) as info:
        rsa_made.evidence(pcrs=pcrs)
    assert info.value.field == field


def test_parse_evidence_names_the_structure(rsa_made: Made) -> None:
    with pytest.raises(MalformedError) as info:
        rsa_made.evidence(quote=rsa_made.quote[:-1])
    assert info.value.field == "quote"
    with pytest.raises(MalformedError) as info:
        rsa_made.evidence(signature=rsa_made.signature + b"\x00")
    assert info.value.field == "signature"


# --- a real Windows quote (go-attestation test data) ---------------------------


def _gcp(gcp_quote: GcpQuote, **kw: Any) -> Appraisal:
    evidence = parse_evidence(gcp_quote.quote, gcp_quote.signature, gcp_quote.pcrs)
    ak = parse_public(gcp_quote.ak_public)
    return appraise_quote(evidence, ak, nonce=b"", policy=None, previous=None, now_ms=0, **kw)


def test_windows_gcp_quote_verifies_when_sha1_is_allowed(gcp_quote: GcpQuote) -> None:
    a = _gcp(gcp_quote, allow_sha1=True)
    assert a.verdict.status is Status.AFFIRMING, a.verdict.failures
    assert a.evidence.signature.hash_alg == Alg.SHA1
    assert a.evidence.attest.pcr_select == ((Alg.SHA1, frozenset(range(24))),)


def test_windows_gcp_quote_is_refused_without_sha1(gcp_quote: GcpQuote) -> None:
    _assert_crypto_failure(_gcp(gcp_quote), "SIGNATURE_HASH_NOT_ALLOWED")


def test_windows_gcp_quote_with_a_changed_pcr(gcp_quote: GcpQuote) -> None:
    pcrs = {"sha1": dict(gcp_quote.pcrs["sha1"])}
    pcrs["sha1"][7] = forge.flip(pcrs["sha1"][7], 0)
    changed = replace(gcp_quote, pcrs=pcrs)
    assert codes(_gcp(changed, allow_sha1=True)) == ["PCR_DIGEST_MISMATCH"]
