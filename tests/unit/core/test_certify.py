"""attestd.core.certify: a TPM-resident key vouched for by the AK (TPM2_Certify).

Every check of ``check_certified_key`` is shown by the code it reports, with
certifications forged byte by byte (tests/unit/forge.py) and signed by a
software key standing in for the AK; and every malformed input is a
MalformedError naming the field it is about.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import forge
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from forge import SoftKey, tpm2b, u16

from attestd.core.certify import CertifyEvidence, check_certified_key, parse_certified_key
from attestd.core.errors import MalformedError
from attestd.core.limits import DEFAULT_LIMITS
from attestd.core.tpm import PublicArea, parse_public
from attestd.core.verdict import Code, Failure

NONCE = bytes(range(32))
# A plain signing key that never leaves the TPM (what may be bound).
PLAIN = (
    forge.FIXED_TPM
    | forge.FIXED_PARENT
    | forge.SENSITIVE_DATA_ORIGIN
    | forge.USER_WITH_AUTH
    | forge.SIGN
)
ST_ATTEST_TIME = 0x8019


def name_of(public_area: bytes, name_alg: int = forge.SHA256) -> bytes:
    """TPM 2.0 Part 1, 16: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
    return u16(name_alg) + hashlib.new(forge.HASHLIB[name_alg], public_area).digest()


def certify_body(name: bytes, qualified_name: bytes | None = None) -> bytes:
    """TPMS_CERTIFY_INFO (Part 2, 10.12.3): name, qualifiedName."""
    return tpm2b(name) + tpm2b(
        qualified_name if qualified_name is not None else name[:2] + bytes(32)
    )


@dataclass
class Forged:
    """A key, its certification and the AK that signed it, as bytes on the wire."""

    ak: PublicArea
    public: bytes  # TPMT_PUBLIC of the key
    certify_info: bytes
    signature: bytes

    def evidence(self) -> CertifyEvidence:
        return parse_certified_key(self.public, self.certify_info, self.signature)

    def check(self, nonce: bytes = NONCE) -> Failure | None:
        return check_certified_key(self.evidence(), self.ak, nonce)


@pytest.fixture(scope="module")
def rsa_ak() -> SoftKey:
    return SoftKey.rsa()


@pytest.fixture(scope="module")
def ecc_ak() -> SoftKey:
    return SoftKey.ecc()


@pytest.fixture(scope="module")
def key() -> SoftKey:
    return SoftKey.ecc()


def forge_certify(
    ak: SoftKey,
    key: SoftKey,
    *,
    attributes: int = PLAIN,
    extra_data: bytes = NONCE,
    name: bytes | None = None,
    st: int = forge.ST_ATTEST_CERTIFY,
    magic: int = forge.TPM_GENERATED_VALUE,
    body: bytes | None = None,
    signer: SoftKey | None = None,
    hash_alg: int = forge.SHA256,
    ak_scheme: int | None = None,
    key_scheme: int | None = None,
) -> Forged:
    public = key.public_area(attributes=attributes, scheme=key_scheme)
    info = forge.attest(
        extra_data=extra_data,
        magic=magic,
        st=st,
        body=body if body is not None else certify_body(name or name_of(public)),
    )
    ak_public = parse_public(ak.public_area(attributes=forge.AK_ATTRS, scheme=ak_scheme))
    return Forged(ak_public, public, info, (signer or ak).sign(info, hash_alg))


def assert_code(failure: Failure | None, code: Code) -> Failure:
    assert failure is not None, f"expected {code.value}, the key was accepted"
    assert failure.code is code, failure
    return failure


# -- a genuine certification ---------------------------------------------------------


@pytest.mark.parametrize("ak_kind", ["rsa", "ecc"])
@pytest.mark.parametrize("key_kind", ["ecc", "rsa", "ecc384"])
def test_genuine_certification_is_accepted(
    ak_kind: str, key_kind: str, rsa_ak: SoftKey, ecc_ak: SoftKey, key: SoftKey
) -> None:
    ak = rsa_ak if ak_kind == "rsa" else ecc_ak
    subject = {
        "ecc": key,
        "rsa": SoftKey.rsa(),
        "ecc384": SoftKey.ecc(ec.SECP384R1()),
    }[key_kind]
    forged = forge_certify(ak, subject)
    assert forged.check() is None


def test_key_given_as_tpm2b_public_is_the_same_key(rsa_ak: SoftKey, key: SoftKey) -> None:
    forged = forge_certify(rsa_ak, key)
    as_tpm2b = parse_certified_key(tpm2b(forged.public), forged.certify_info, forged.signature)
    assert as_tpm2b.public.name == forged.evidence().public.name == name_of(forged.public)
    assert check_certified_key(as_tpm2b, forged.ak, NONCE) is None


def test_harmless_extra_attributes_are_accepted(rsa_ak: SoftKey, key: SoftKey) -> None:
    attrs = PLAIN | forge.ADMIN_WITH_POLICY | (1 << 10) | (1 << 2)  # + noDA, stClear
    assert forge_certify(rsa_ak, key, attributes=attrs).check() is None


def test_parsed_evidence_keeps_the_signed_bytes(rsa_ak: SoftKey, key: SoftKey) -> None:
    forged = forge_certify(rsa_ak, key)
    ev = forged.evidence()
    assert ev.message == forged.certify_info
    assert ev.attest.type == forge.ST_ATTEST_CERTIFY
    assert ev.attest.extra_data == NONCE
    assert ev.attest.certified_name == name_of(forged.public)
    assert ev.public.public_key == key.public_key


# -- 1. the structure and its signature ----------------------------------------------


def test_a_quote_is_not_a_certification(rsa_ak: SoftKey, key: SoftKey) -> None:
    quote_body = forge.pcr_selection([(forge.SHA256, [0])]) + tpm2b(bytes(32))
    forged = forge_certify(rsa_ak, key, st=forge.ST_ATTEST_QUOTE, body=quote_body)
    failure = assert_code(forged.check(), Code.CERTIFY_TYPE_INVALID)
    assert failure.subject == "certified_key.certify_info"
    assert (failure.expected, failure.got) == ("0x8017", "0x8018")


def test_wrong_magic_is_not_tpm_generated(rsa_ak: SoftKey, key: SoftKey) -> None:
    forged = forge_certify(rsa_ak, key, magic=forge.TPM_GENERATED_VALUE - 1)
    failure = assert_code(forged.check(), Code.CERTIFY_TYPE_INVALID)
    assert failure.subject == "certified_key.certify_info.magic"
    assert (failure.expected, failure.got) == ("0xff544347", "0xff544346")
    assert "not a structure the TPM generated" in failure.detail


def test_certification_by_another_key(rsa_ak: SoftKey, key: SoftKey) -> None:
    forged = forge_certify(rsa_ak, key, signer=SoftKey.rsa())
    failure = assert_code(forged.check(), Code.CERTIFY_SIGNATURE_INVALID)
    assert failure.subject == "certified_key.signature"
    assert "not signed by the device's AK" in failure.detail


def test_certification_by_the_right_algorithm_of_the_wrong_kind(
    rsa_ak: SoftKey, ecc_ak: SoftKey, key: SoftKey
) -> None:
    # An ECDSA signature where the AK is RSA.
    forged = forge_certify(rsa_ak, key, signer=ecc_ak)
    assert_code(forged.check(), Code.CERTIFY_SIGNATURE_INVALID)


def test_certify_info_altered_after_signing(ecc_ak: SoftKey, key: SoftKey) -> None:
    forged = forge_certify(ecc_ak, key)
    clock_at = 4 + 2 + 2 + 34 + 2 + len(NONCE)  # magic, type, qualifiedSigner, extraData
    forged.certify_info = forge.flip(forged.certify_info, clock_at + 7)
    assert_code(forged.check(), Code.CERTIFY_SIGNATURE_INVALID)


def test_flipped_signature(rsa_ak: SoftKey, key: SoftKey) -> None:
    forged = forge_certify(rsa_ak, key)
    forged.signature = forge.flip(forged.signature, len(forged.signature) - 1)
    assert_code(forged.check(), Code.CERTIFY_SIGNATURE_INVALID)


def test_sha1_signature_is_refused(rsa_ak: SoftKey, key: SoftKey) -> None:
    # Even by an AK with a NULL scheme (which would let it sign SHA-1): never SHA-1 here.
    forged = forge_certify(rsa_ak, key, hash_alg=forge.SHA1, ak_scheme=forge.NULL)
    failure = assert_code(forged.check(), Code.CERTIFY_SIGNATURE_INVALID)
    assert "sha1" in failure.detail.lower() or "SHA-1" in failure.detail


def test_signature_hash_other_than_the_aks_scheme(rsa_ak: SoftKey, key: SoftKey) -> None:
    forged = forge_certify(rsa_ak, key, hash_alg=forge.SHA384)  # the AK says sha256
    assert_code(forged.check(), Code.CERTIFY_SIGNATURE_INVALID)


# -- 2. the nonce ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [secrets.token_bytes(32), b"", NONCE[:31], NONCE + b"\0", NONCE[:-1] + b"\xff"],
    ids=["other", "empty", "prefix", "longer", "last-byte"],
)
def test_certification_over_another_nonce(rsa_ak: SoftKey, key: SoftKey, extra: bytes) -> None:
    failure = assert_code(
        forge_certify(rsa_ak, key, extra_data=extra).check(), Code.CERTIFY_NONCE_MISMATCH
    )
    assert failure.subject == "certified_key.certify_info.extraData"
    assert (failure.expected, failure.got) == (NONCE.hex(), extra.hex())


# -- 3. the Name -----------------------------------------------------------------------


def test_certified_name_of_another_key(rsa_ak: SoftKey, key: SoftKey) -> None:
    other = SoftKey.ecc().public_area(attributes=PLAIN)
    forged = forge_certify(rsa_ak, key, name=name_of(other))
    failure = assert_code(forged.check(), Code.CERTIFY_NAME_MISMATCH)
    assert failure.subject == "certified_key.public"
    assert (failure.expected, failure.got) == (name_of(forged.public).hex(), name_of(other).hex())


def test_certified_key_presented_with_other_attributes(rsa_ak: SoftKey, key: SoftKey) -> None:
    # The TPM certified a restricted key; the same key bytes claim to be a plain one.
    restricted = key.public_area(attributes=PLAIN | forge.RESTRICTED)
    forged = forge_certify(rsa_ak, key, name=name_of(restricted))
    assert_code(forged.check(), Code.CERTIFY_NAME_MISMATCH)


def test_certified_name_under_another_name_alg(rsa_ak: SoftKey, key: SoftKey) -> None:
    public = key.public_area(attributes=PLAIN)
    forged = forge_certify(rsa_ak, key, name=name_of(public, forge.SHA384))
    assert_code(forged.check(), Code.CERTIFY_NAME_MISMATCH)


def test_qualified_name_is_not_the_name(rsa_ak: SoftKey, key: SoftKey) -> None:
    # The right Name only as qualifiedName; the name slot holds something else.
    public = key.public_area(attributes=PLAIN)
    body = certify_body(u16(forge.SHA256) + bytes(32), qualified_name=name_of(public))
    assert_code(forge_certify(rsa_ak, key, body=body).check(), Code.CERTIFY_NAME_MISMATCH)


# -- 4. the key's attributes -----------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "got"),
    [
        (PLAIN | forge.RESTRICTED, "has restricted"),
        (PLAIN | forge.DECRYPT, "has decrypt"),
        (PLAIN & ~forge.FIXED_TPM, "missing fixed_tpm"),
        (PLAIN & ~forge.FIXED_PARENT, "missing fixed_parent"),
        (PLAIN & ~(forge.FIXED_TPM | forge.FIXED_PARENT), "missing fixed_tpm, fixed_parent"),
        (PLAIN & ~forge.SENSITIVE_DATA_ORIGIN, "missing sensitive_data_origin"),
        (PLAIN & ~forge.SIGN, "missing sign"),
        ((PLAIN & ~forge.SIGN) | forge.DECRYPT, "missing sign; has decrypt"),
        (
            (PLAIN & ~forge.FIXED_TPM) | forge.RESTRICTED | forge.DECRYPT,
            "missing fixed_tpm; has restricted, decrypt",
        ),
    ],
    ids=[
        "restricted",
        "decrypt",
        "fixedtpm-clear",
        "fixedparent-clear",
        "duplicable",
        "sensitivedataorigin-clear",
        "sign-clear",
        "decrypt-only",
        "several",
    ],
)
def test_key_attributes(rsa_ak: SoftKey, key: SoftKey, attributes: int, got: str) -> None:
    forged = forge_certify(rsa_ak, key, attributes=attributes)
    failure = assert_code(forged.check(), Code.CERTIFIED_KEY_ATTRIBUTES)
    assert failure.subject == "certified_key.public.objectAttributes"
    assert failure.got == got


# -- the order of the checks -----------------------------------------------------------


def test_checks_run_in_order(rsa_ak: SoftKey, key: SoftKey) -> None:
    other_name = name_of(SoftKey.ecc().public_area(attributes=PLAIN))
    quote_body = forge.pcr_selection([(forge.SHA256, [0])]) + tpm2b(bytes(32))
    everything_wrong = {
        "st": forge.ST_ATTEST_QUOTE,
        "body": quote_body,
        "signer": SoftKey.rsa(),
        "extra_data": b"x" * 32,
        "attributes": PLAIN | forge.RESTRICTED,
    }
    order = [
        ("st", Code.CERTIFY_TYPE_INVALID),
        ("signer", Code.CERTIFY_SIGNATURE_INVALID),
        ("extra_data", Code.CERTIFY_NONCE_MISMATCH),
        ("name", Code.CERTIFY_NAME_MISMATCH),
        ("attributes", Code.CERTIFIED_KEY_ATTRIBUTES),
    ]
    wrong: dict[str, object] = {**everything_wrong, "name": other_name}
    for fault, code in order:
        assert_code(forge_certify(rsa_ak, key, **wrong).check(), code)  # type: ignore[arg-type]
        wrong.pop(fault)
        if fault == "st":
            wrong.pop("body")
    assert forge_certify(rsa_ak, key, **wrong).check() is None  # type: ignore[arg-type]


# -- malformed input -------------------------------------------------------------------


def _good(rsa_ak: SoftKey, key: SoftKey) -> Forged:
    return forge_certify(rsa_ak, key)


MALFORMED = {
    # field -> [(id, mutate(bytes) -> bytes)]
    "public": [
        ("empty", lambda b: b""),
        ("truncated", lambda b: b[:-5]),
        ("trailing", lambda b: b + b"\0"),
        ("tpm2b-size-off", lambda b: u16(len(b) + 4) + b),
        ("unknown-type", lambda b: u16(0x7777) + b[2:]),
        ("keyedhash", lambda b: u16(0x0008) + b[2:]),
        ("oversized", lambda b: b + bytes(DEFAULT_LIMITS.max_public_size + 8)),
    ],
    "certify_info": [
        ("empty", lambda b: b""),
        ("truncated", lambda b: b[:-1]),
        ("trailing", lambda b: b + b"\0"),
        ("hostile-length", lambda b: b[:-36] + u16(0xFFFF) + b[-34:]),  # qualifiedName.size
        ("oversized", lambda b: b + bytes(DEFAULT_LIMITS.max_attest_size)),
    ],
    "signature": [
        ("empty", lambda b: b""),
        ("truncated", lambda b: b[:-1]),
        ("trailing", lambda b: b + b"\0"),
        ("hmac", lambda b: u16(0x0005) + b[2:]),
        ("oversized", lambda b: b + bytes(DEFAULT_LIMITS.max_signature_size)),
    ],
}
FIELD_NAME = {
    "public": "certified_key.public",
    "certify_info": "certified_key.certify_info",
    "signature": "certified_key.signature",
}


@pytest.mark.parametrize(
    ("field", "mutate"),
    [(f, m) for f, cases in MALFORMED.items() for _, m in cases],
    ids=[f"{f}-{i}" for f, cases in MALFORMED.items() for i, _ in cases],
)
def test_malformed_input_names_the_field(
    rsa_ak: SoftKey, key: SoftKey, field: str, mutate: object
) -> None:
    forged = _good(rsa_ak, key)
    parts = {
        "public": forged.public,
        "certify_info": forged.certify_info,
        "signature": forged.signature,
    }
    parts[field] = mutate(parts[field])  # type: ignore[operator]
    with pytest.raises(MalformedError) as info:
        parse_certified_key(parts["public"], parts["certify_info"], parts["signature"])
    assert info.value.field == FIELD_NAME[field]
    assert str(info.value).startswith(FIELD_NAME[field] + ":"), str(info.value)
    assert info.value.code == "MALFORMED"


def test_attestation_of_another_type_is_malformed(rsa_ak: SoftKey, key: SoftKey) -> None:
    # Neither a certify nor a quote (here TPM2_GetTime's): the parser does not know the body.
    forged = forge_certify(rsa_ak, key, st=ST_ATTEST_TIME)
    with pytest.raises(MalformedError) as info:
        forged.evidence()
    assert info.value.field == "certified_key.certify_info"
