"""attestd.core.tpm: the hand-written struct parsers agree with tpm2-pytss on
real TPM output, and stay inside their bounds on hostile input.

The agreement half quotes, certifies and reads keys in a swtpm through ESAPI
and compares every field attestd parses with tpm2-pytss' unmarshalling of the
same bytes (TPM 2.0 Part 2: TPMT_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE). The
bounds half truncates, extends, inflates and flips those real structures: the
only exception that may leave a parser is MalformedError.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass

import forge
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sessiontpm import ECC_AK_HANDLE, RSA_AK_HANDLE, tpml_selection
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMT_SIG_SCHEME,
    TPMT_SIGNATURE,
)
from tpm2_pytss.utils import NVReadEK, create_ek_template

from attestd.agent.tpm import EK_TYPES, DeviceTpm
from attestd.core.errors import MalformedError
from attestd.core.limits import DEFAULT_LIMITS, Limits
from attestd.core.tpm import (
    TPM_GENERATED_VALUE,
    Alg,
    EccCurve,
    ObjectAttr,
    St,
    encode_pcr_selection,
    parse_attest,
    parse_public,
    parse_signature,
    pcr_digest,
)

NONCE = bytes(range(32))
# Two banks, out of algorithm order, with PCR 23 to use the third bitmap byte.
SELECTION = [("sha256", [0, 1, 2, 7]), ("sha1", [4, 23])]


# --- real structures from the TPM -------------------------------------------


@dataclass(frozen=True)
class Key:
    tpm2b_public: bytes  # as ESAPI marshals TPM2B_PUBLIC
    name: bytes  # ESAPI ReadPublic's name
    qualified_name: bytes  # ESAPI ReadPublic's qualifiedName


def _read_public(device: DeviceTpm, handle: ESYS_TR) -> Key:
    public, name, qname = device.ectx.read_public(handle)
    return Key(bytes(public.marshal()), bytes(name), bytes(qname))


@pytest.fixture(scope="module")
def keys(device: DeviceTpm, rsa_ak: bytes, ecc_ak: bytes) -> dict[str, Key]:
    """The two AKs and both EKs, with the names the TPM reports for them."""
    out = {
        "rsa-ak": _read_public(device, device.ectx.tr_from_tpmpublic(RSA_AK_HANDLE)),
        "ecc-ak": _read_public(device, device.ectx.tr_from_tpmpublic(ECC_AK_HANDLE)),
    }
    assert out["rsa-ak"].tpm2b_public == rsa_ak
    assert out["ecc-ak"].tpm2b_public == ecc_ak
    for kind in ("rsa", "ecc"):
        _, template = create_ek_template(EK_TYPES[kind], NVReadEK(device.ectx))
        handle, *_ = device.ectx.create_primary(
            TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
        )
        try:
            out[f"{kind}-ek"] = _read_public(device, handle)
        finally:
            device.ectx.flush_context(handle)
    return out


@dataclass(frozen=True)
class Signed:
    attest: bytes  # TPMS_ATTEST
    signature: bytes  # TPMT_SIGNATURE
    pcrs: dict[str, dict[int, bytes]]


@pytest.fixture(scope="module")
def quotes(device: DeviceTpm, rsa_ak: bytes, ecc_ak: bytes) -> dict[str, Signed]:
    out = {}
    for name, handle in (("rsa", RSA_AK_HANDLE), ("ecc", ECC_AK_HANDLE)):
        q = device.quote(SELECTION, NONCE, handle)
        out[name] = Signed(q.attest, q.signature, q.pcrs)
    return out


@pytest.fixture(scope="module")
def certify(device: DeviceTpm, rsa_ak: bytes, ecc_ak: bytes) -> Signed:
    """TPM2_Certify of the ECC AK, signed by the RSA AK."""
    ectx = device.ectx
    attest, signature = ectx.certify(
        ectx.tr_from_tpmpublic(ECC_AK_HANDLE),
        ectx.tr_from_tpmpublic(RSA_AK_HANDLE),
        b"certify-nonce",
        TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
        session1=ESYS_TR.PASSWORD,
        session2=ESYS_TR.PASSWORD,
    )
    return Signed(bytes(attest), bytes(signature.marshal()), {})


def _bitmap_indices(bitmap: bytes) -> frozenset[int]:
    return frozenset(i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1)


# --- TPMT_PUBLIC ------------------------------------------------------------


@pytest.mark.parametrize("which", ["rsa-ak", "ecc-ak", "rsa-ek", "ecc-ek"])
def test_parse_public_agrees_with_pytss(keys: dict[str, Key], which: str) -> None:
    key = keys[which]
    ours = parse_public(key.tpm2b_public)
    theirs, consumed = TPM2B_PUBLIC.unmarshal(key.tpm2b_public)
    assert consumed == len(key.tpm2b_public)
    pt = theirs.publicArea

    assert ours.raw == bytes(pt.marshal())
    assert ours.tpm2b() == key.tpm2b_public
    assert ours.type == int(pt.type)
    assert ours.name_alg == int(pt.nameAlg)
    assert int(ours.attributes) == int(pt.objectAttributes)
    assert ours.auth_policy == bytes(pt.authPolicy)
    # The Name binds the MakeCredential challenge: it must be the TPM's own.
    assert ours.name == key.name == bytes(pt.get_name())

    if ours.type == Alg.RSA:
        detail = pt.parameters.rsaDetail
        assert isinstance(ours.public_key, rsa.RSAPublicKey)
        nums = ours.public_key.public_numbers()
        assert ours.key_bits == int(detail.keyBits) == ours.public_key.key_size
        assert nums.e == (int(detail.exponent) or 65537)
        assert nums.n == int.from_bytes(bytes(pt.unique.rsa), "big")
        assert ours.curve is None
    else:
        detail = pt.parameters.eccDetail
        assert isinstance(ours.public_key, ec.EllipticCurvePublicKey)
        nums = ours.public_key.public_numbers()
        assert ours.curve == int(detail.curveID)
        assert nums.x == int.from_bytes(bytes(pt.unique.ecc.x), "big")
        assert nums.y == int.from_bytes(bytes(pt.unique.ecc.y), "big")
    assert ours.symmetric == int(detail.symmetric.algorithm)
    assert ours.scheme == int(detail.scheme.scheme)
    if ours.scheme == Alg.NULL:
        assert ours.scheme_hash is None
    else:
        assert ours.scheme_hash == int(detail.scheme.details.anySig.hashAlg)


def test_parse_public_accepts_tpmt_and_tpm2b_alike(keys: dict[str, Key]) -> None:
    for key in keys.values():
        assert parse_public(key.tpm2b_public) == parse_public(key.tpm2b_public[2:])


def test_parsed_keys_are_the_expected_kinds(keys: dict[str, Key]) -> None:
    rsa_ak = parse_public(keys["rsa-ak"].tpm2b_public)
    assert (rsa_ak.type, rsa_ak.key_bits, rsa_ak.scheme, rsa_ak.scheme_hash) == (
        Alg.RSA,
        2048,
        Alg.RSASSA,
        Alg.SHA256,
    )
    assert rsa_ak.has(ObjectAttr.RESTRICTED) and rsa_ak.has(ObjectAttr.SIGN)
    ecc_ak = parse_public(keys["ecc-ak"].tpm2b_public)
    assert (ecc_ak.type, ecc_ak.curve, ecc_ak.scheme) == (Alg.ECC, EccCurve.NIST_P256, Alg.ECDSA)
    # swtpm's high-range ECC EK (EK Credential Profile template H-3): P-384, AES-256-CFB.
    ecc_ek = parse_public(keys["ecc-ek"].tpm2b_public)
    assert (ecc_ek.curve, ecc_ek.key_bits, ecc_ek.symmetric) == (EccCurve.NIST_P384, 384, Alg.AES)
    rsa_ek = parse_public(keys["rsa-ek"].tpm2b_public)
    assert rsa_ek.has(ObjectAttr.DECRYPT) and not rsa_ek.has(ObjectAttr.SIGN)
    assert len(rsa_ek.auth_policy) == 32


# --- TPMS_ATTEST ------------------------------------------------------------


@pytest.mark.parametrize("ak", ["rsa", "ecc"])
def test_parse_attest_quote_agrees_with_pytss(
    quotes: dict[str, Signed], keys: dict[str, Key], ak: str
) -> None:
    raw = quotes[ak].attest
    ours = parse_attest(raw)
    theirs, consumed = TPMS_ATTEST.unmarshal(raw)
    assert consumed == len(raw)

    assert ours.magic == int(theirs.magic) == TPM_GENERATED_VALUE
    assert ours.type == int(theirs.type) == St.ATTEST_QUOTE
    assert ours.qualified_signer == bytes(theirs.qualifiedSigner)
    assert ours.qualified_signer == keys[f"{ak}-ak"].qualified_name
    assert ours.extra_data == bytes(theirs.extraData) == NONCE
    ci = theirs.clockInfo
    assert ours.clock_info.clock == int(ci.clock)
    assert ours.clock_info.reset_count == int(ci.resetCount)
    assert ours.clock_info.restart_count == int(ci.restartCount)
    assert ours.clock_info.safe == bool(ci.safe) is True
    assert ours.firmware_version == int(theirs.firmwareVersion)

    quote = theirs.attested.quote
    assert ours.pcr_select == tuple(
        (int(s.hash), _bitmap_indices(bytes(s.pcrSelect)[: s.sizeofSelect]))
        for s in quote.pcrSelect
    )
    assert ours.pcr_select == (
        (Alg.SHA256, frozenset({0, 1, 2, 7})),
        (Alg.SHA1, frozenset({4, 23})),
    )
    assert ours.pcr_digest == bytes(quote.pcrDigest)


def test_parse_attest_certify_agrees_with_pytss(certify: Signed, keys: dict[str, Key]) -> None:
    ours = parse_attest(certify.attest)
    theirs, _ = TPMS_ATTEST.unmarshal(certify.attest)
    assert ours.type == int(theirs.type) == St.ATTEST_CERTIFY
    assert ours.extra_data == b"certify-nonce"
    assert ours.qualified_signer == keys["rsa-ak"].qualified_name
    assert ours.certified_name == bytes(theirs.attested.certify.name) == keys["ecc-ak"].name
    assert ours.certified_qualified_name == bytes(theirs.attested.certify.qualifiedName)
    assert ours.certified_qualified_name == keys["ecc-ak"].qualified_name
    assert ours.pcr_select == () and ours.pcr_digest == b""


@pytest.mark.parametrize("ak", ["rsa", "ecc"])
def test_pcr_digest_agrees_with_the_tpm(quotes: dict[str, Signed], ak: str) -> None:
    q = quotes[ak]
    attest = parse_attest(q.attest)
    by_alg = {Alg.SHA256.value: q.pcrs["sha256"], Alg.SHA1.value: q.pcrs["sha1"]}
    sig = parse_signature(q.signature)
    assert pcr_digest(sig.hash_alg, attest.pcr_select, by_alg) == attest.pcr_digest
    # Selection order matters (Part 3, TPM2_Quote): swapping the banks changes it.
    swapped = tuple(reversed(attest.pcr_select))
    assert pcr_digest(sig.hash_alg, swapped, by_alg) != attest.pcr_digest


def test_encode_pcr_selection_round_trips_through_pytss() -> None:
    selection = ((Alg.SHA1.value, frozenset({0, 23})), (Alg.SHA256.value, frozenset({1, 7, 8})))
    raw = encode_pcr_selection(selection)
    theirs, consumed = TPML_PCR_SELECTION.unmarshal(raw)
    assert consumed == len(raw)
    assert (
        tuple((int(s.hash), _bitmap_indices(bytes(s.pcrSelect)[: s.sizeofSelect])) for s in theirs)
        == selection
    )
    assert raw == forge.pcr_selection([(a, sorted(i)) for a, i in selection])


# --- TPMT_SIGNATURE ---------------------------------------------------------


@pytest.mark.parametrize("ak", ["rsa", "ecc"])
def test_parse_signature_agrees_with_pytss(quotes: dict[str, Signed], ak: str) -> None:
    raw = quotes[ak].signature
    ours = parse_signature(raw)
    theirs, consumed = TPMT_SIGNATURE.unmarshal(raw)
    assert consumed == len(raw)
    assert ours.alg == int(theirs.sigAlg)
    if ak == "rsa":
        assert ours.alg == Alg.RSASSA
        assert ours.hash_alg == int(theirs.signature.rsassa.hash) == Alg.SHA256
        assert ours.sig == bytes(theirs.signature.rsassa.sig)
        assert len(ours.sig) == 256
    else:
        assert ours.alg == Alg.ECDSA
        assert ours.hash_alg == int(theirs.signature.ecdsa.hash) == Alg.SHA256
        assert ours.r == int.from_bytes(bytes(theirs.signature.ecdsa.signatureR), "big")
        assert ours.s == int.from_bytes(bytes(theirs.signature.ecdsa.signatureS), "big")
        assert ours.r and ours.s


def test_parse_signature_of_software_rsapss_and_ecdsa_p384() -> None:
    msg = b"message"
    pss = parse_signature(forge.SoftKey.rsa().sign(msg, forge.SHA384, forge.RSAPSS))
    assert (pss.alg, pss.hash_alg, len(pss.sig)) == (Alg.RSAPSS, Alg.SHA384, 256)
    p384 = parse_signature(forge.SoftKey.ecc(ec.SECP384R1()).sign(msg, forge.SHA384))
    assert (p384.alg, p384.hash_alg) == (Alg.ECDSA, Alg.SHA384)


# --- bounds -----------------------------------------------------------------

Parser = Callable[[bytes], object]


@pytest.fixture(scope="module")
def structures(
    quotes: dict[str, Signed], certify: Signed, keys: dict[str, Key]
) -> list[tuple[str, Parser, bytes]]:
    """Every real structure with its parser, named for failure messages."""
    out: list[tuple[str, Parser, bytes]] = []
    for ak, q in quotes.items():
        out.append((f"{ak}-quote", parse_attest, q.attest))
        out.append((f"{ak}-signature", parse_signature, q.signature))
    out.append(("certify", parse_attest, certify.attest))
    for name, key in keys.items():
        out.append((f"{name}-tpm2b", parse_public, key.tpm2b_public))
        out.append((f"{name}-tpmt", parse_public, key.tpm2b_public[2:]))
    return out


def _looks_size_prefixed(data: bytes) -> bool:
    """parse_public's TPM2B_PUBLIC test: a leading UINT16 that covers the rest."""
    return len(data) >= 2 and int.from_bytes(data[:2], "big") == len(data) - 2


def test_every_truncation_is_malformed_with_an_offset(
    structures: list[tuple[str, Parser, bytes]],
) -> None:
    for name, parse, data in structures:
        for n in range(len(data)):
            with pytest.raises(MalformedError) as info:
                parse(data[:n])
            err = info.value
            assert err.code == "MALFORMED", (name, n)
            assert err.offset is not None, f"{name} cut to {n} bytes: {err} (no offset)"
            assert 0 <= err.offset <= n, (name, n, err.offset)


def test_truncated_ecc_public_area_mistaken_for_tpm2b_reports_an_offset(
    keys: dict[str, Key],
) -> None:
    data = keys["ecc-ak"].tpm2b_public[2:][:37]
    assert _looks_size_prefixed(data)
    with pytest.raises(MalformedError) as info:
        parse_public(data)
    assert info.value.offset is not None


@pytest.mark.parametrize("extra", [b"\x00", b"\xff" * 7])
def test_trailing_bytes_are_rejected(
    structures: list[tuple[str, Parser, bytes]], extra: bytes
) -> None:
    for name, parse, data in structures:
        with pytest.raises(MalformedError) as info:
            parse(data + extra)
        if not name.endswith("-tpm2b"):  # a TPM2B prefix no longer covers the rest
            assert "trailing" in str(info.value), name
            assert info.value.offset == len(data), name


def test_tpm2b_over_the_limit_is_rejected_at_its_size_field() -> None:
    big = forge.attest(extra_data=b"\xaa" * (DEFAULT_LIMITS.max_tpm2b + 1), selection=[])
    with pytest.raises(MalformedError, match=r"extraData\.size 513 exceeds .* 512") as info:
        parse_attest(big)
    assert info.value.offset == 4 + 2 + 2 + 34  # magic, type, qualifiedSigner: at extraData.size
    # Exactly at the limit parses.
    ok = forge.attest(extra_data=b"\xaa" * DEFAULT_LIMITS.max_tpm2b, selection=[])
    assert len(parse_attest(ok).extra_data) == DEFAULT_LIMITS.max_tpm2b


def test_tpm2b_limit_comes_from_limits(quotes: dict[str, Signed], keys: dict[str, Key]) -> None:
    tight = Limits(max_tpm2b=16)
    with pytest.raises(MalformedError, match="exceeds the limit of 16"):
        parse_attest(quotes["rsa"].attest, limits=tight)  # qualifiedSigner is 34 bytes
    with pytest.raises(MalformedError, match="exceeds the limit of 16"):
        parse_signature(quotes["rsa"].signature, limits=tight)
    with pytest.raises(MalformedError, match="exceeds the limit of 16"):
        parse_public(keys["rsa-ak"].tpm2b_public, limits=tight)


def test_ecdsa_coordinate_over_66_bytes_is_rejected() -> None:
    sig = forge.u16(forge.ECDSA) + forge.u16(forge.SHA256) + forge.tpm2b(b"\x01" * 67)
    sig += forge.tpm2b(b"\x01")
    with pytest.raises(MalformedError, match=r"signatureR\.size 67 exceeds"):
        parse_signature(sig)


def test_whole_structure_size_limits(quotes: dict[str, Signed], keys: dict[str, Key]) -> None:
    with pytest.raises(MalformedError, match="exceeds the limit of 2048"):
        parse_attest(quotes["rsa"].attest + bytes(2048))
    with pytest.raises(MalformedError, match="exceeds the limit of 1024"):
        parse_signature(quotes["rsa"].signature + bytes(1024))
    with pytest.raises(MalformedError, match="exceeds the limit of 1024"):
        parse_public(keys["rsa-ak"].tpm2b_public + bytes(1024))
    small = Limits(max_attest_size=64, max_signature_size=64, max_public_size=64)
    for parse, data in (
        (parse_attest, quotes["rsa"].attest),
        (parse_signature, quotes["rsa"].signature),
        (parse_public, keys["ecc-ak"].tpm2b_public),
    ):
        with pytest.raises(MalformedError, match="exceeds the limit of 64"):
            parse(data, limits=small)  # type: ignore[operator]


def _quote_with_selection(selection_bytes: bytes) -> bytes:
    return forge.attest(body=selection_bytes + forge.tpm2b(bytes(32)))


@pytest.mark.parametrize("count", [DEFAULT_LIMITS.max_pcr_selections + 1, 0xFFFFFFFF])
def test_pcr_select_count_over_the_limit_is_rejected(count: int) -> None:
    entry = forge.u16(forge.SHA256) + forge.u8(3) + b"\x01\x00\x00"
    with pytest.raises(MalformedError, match=f"pcrSelect.count {count} exceeds") as info:
        parse_attest(_quote_with_selection(forge.u32(count) + entry * 9))
    count_at = 4 + 2 + (2 + 34) + 2 + 17 + 8  # after firmwareVersion
    assert info.value.offset is not None
    assert count_at <= info.value.offset <= count_at + 4


def test_pcr_select_count_at_the_limit_parses() -> None:
    n = DEFAULT_LIMITS.max_pcr_selections
    entry = forge.u16(forge.SHA256) + forge.u8(3) + b"\x01\x00\x00"
    assert len(parse_attest(_quote_with_selection(forge.u32(n) + entry * n)).pcr_select) == n


def test_size_of_select_over_the_limit_is_rejected() -> None:
    size = DEFAULT_LIMITS.max_size_of_select + 1
    sel = forge.u32(1) + forge.u16(forge.SHA256) + forge.u8(size) + b"\xff" * size
    with pytest.raises(MalformedError, match=f"sizeofSelect {size} exceeds"):
        parse_attest(_quote_with_selection(sel))
    # Four bytes (PCRs 0-31) is within the limit; the appraisal judges the indices.
    sel = forge.u32(1) + forge.u16(forge.SHA256) + forge.u8(4) + b"\x00\x00\x00\x80"
    assert parse_attest(_quote_with_selection(sel)).pcr_select == ((Alg.SHA256, frozenset({31})),)


def test_clock_safe_must_be_a_boolean() -> None:
    with pytest.raises(MalformedError, match="safe must be 0 or 1"):
        parse_attest(forge.attest(safe=2, selection=[]))


def test_attestation_types_other_than_quote_and_certify_are_refused() -> None:
    with pytest.raises(MalformedError) as info:
        parse_attest(forge.attest(st=St.ATTEST_TIME, body=bytes(16)))
    assert info.value.code == "QUOTE_TYPE_INVALID"


def test_magic_is_returned_not_judged() -> None:
    # The appraisal names a wrong magic as QUOTE_MAGIC_INVALID (test_quote.py).
    assert parse_attest(forge.attest(magic=0x12345678, selection=[])).magic == 0x12345678


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda pub: pub[:2] + forge.u16(forge.NULL) + pub[4:], "nameAlg NULL is not a hash"),
        (lambda pub: pub[:2] + forge.u16(0x7777) + pub[4:], "unsupported algorithm 0x7777"),
        (lambda pub: forge.u16(0x0008) + pub[2:], "unsupported key type KEYEDHASH"),
    ],
)
def test_public_area_refusals(
    keys: dict[str, Key], mutate: Callable[[bytes], bytes], message: str
) -> None:
    with pytest.raises(MalformedError, match=message):
        parse_public(mutate(keys["rsa-ak"].tpm2b_public[2:]))


def test_rsa_key_bits_must_match_the_modulus() -> None:
    pub = forge.SoftKey.rsa().public_area()
    # keyBits sits after type, nameAlg, attributes, authPolicy, symmetric, scheme.
    at = 2 + 2 + 4 + 2 + 2 + 4
    assert struct.unpack_from(">H", pub, at)[0] == 2048
    with pytest.raises(MalformedError, match="keyBits 3072 does not match a 256-byte modulus"):
        parse_public(pub[:at] + forge.u16(3072) + pub[at + 2 :])


def test_ecc_point_off_the_curve_is_malformed() -> None:
    pub = bytearray(forge.SoftKey.ecc().public_area())
    pub[-1] ^= 1  # last byte of y
    with pytest.raises(MalformedError, match="invalid ECC public point"):
        parse_public(bytes(pub))


def test_unsupported_curve_is_malformed() -> None:
    pub = forge.SoftKey.ecc().public_area()
    at = 2 + 2 + 4 + 2 + 2 + 4  # curveID after symmetric and ECDSA scheme
    assert struct.unpack_from(">H", pub, at)[0] == forge.P256
    with pytest.raises(MalformedError, match="unsupported ECC curve 0x0010"):
        parse_public(pub[:at] + forge.u16(0x0010) + pub[at + 2 :])


def test_random_byte_flips_parse_or_raise_malformed_only(
    structures: list[tuple[str, Parser, bytes]],
) -> None:
    rng = random.Random(20240607)
    outcomes = {"parsed": 0, "malformed": 0}
    for _ in range(4000):
        name, parse, data = rng.choice(structures)
        buf = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(len(buf))] ^= rng.randint(1, 255)
        if rng.random() < 0.2:  # sometimes cut it short or let it run long as well
            buf = buf[: rng.randrange(len(buf))] if rng.random() < 0.5 else buf + b"\x00" * 3
        try:
            parse(bytes(buf))
            outcomes["parsed"] += 1
        except MalformedError:
            outcomes["malformed"] += 1
        except Exception as e:  # pragma: no cover - the failure message is the point
            pytest.fail(f"{name} with {bytes(buf).hex()}: {type(e).__name__}: {e}")
    # Both outcomes occur: flips in digests and keys parse, flips in lengths do not.
    assert outcomes["parsed"] > 100 and outcomes["malformed"] > 100, outcomes


def test_signature_alg_unknown_or_unsupported_is_malformed() -> None:
    with pytest.raises(MalformedError, match="unsupported signature algorithm HMAC"):
        parse_signature(forge.u16(0x0005) + forge.u16(forge.SHA256) + forge.tpm2b(b"x"))
    with pytest.raises(MalformedError, match="unsupported algorithm 0x9999"):
        parse_signature(forge.u16(0x9999))


def test_tpm_quote_keeps_empty_and_unallocated_banks_in_the_signed_selection(
    device: DeviceTpm, rsa_ak: bytes
) -> None:
    """A fact the appraisal must live with: TPM2_Quote signs the selection as asked,
    with unallocated banks (swtpm has no sha384 bank here) zeroed, not dropped."""
    ectx = device.ectx
    attest, _ = ectx.quote(
        ectx.tr_from_tpmpublic(RSA_AK_HANDLE),
        tpml_selection([("sha256", [0]), ("sha384", [0]), ("sha1", [])]),
        b"n",
        TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
    )
    assert parse_attest(bytes(attest)).pcr_select == (
        (Alg.SHA256, frozenset({0})),
        (Alg.SHA384, frozenset()),
        (Alg.SHA1, frozenset()),
    )
