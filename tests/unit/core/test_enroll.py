"""attestd.core.enroll: EK certificate chains from the simulated TPM vendor,
EK/AK checks, and the MakeCredential challenge answered by a real TPM.

Refusals that a genuine swtpm cannot produce (an EK certificate for a key
with signing attributes, an EK certificate with the wrong EKU, an expired
chain: swtpm_localca issues certificates valid until 9999-12-31, RFC 5280's
"no expiry") use a software CA and keys.
"""

from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass

import forge
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sessiontpm import ECC_AK_HANDLE, RSA_AK_HANDLE
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NVReadEK, create_ek_template
from tpmsim import Manufacturer

from attestd.agent.tpm import EK_TYPES, AgentError, DeviceTpm
from attestd.core.enroll import (
    EK_CERTIFICATE_EKU,
    TPM_MANUFACTURER_OID,
    TPM_MODEL_OID,
    TPM_VERSION_OID,
    EnrollmentFacts,
    device_id_for,
    ek_fingerprint,
    make_challenge,
    verify_enrollment,
)
from attestd.core.errors import EnrollmentError, MalformedError
from attestd.core.limits import DEFAULT_LIMITS
from attestd.core.tpm import parse_public

UTC = datetime.UTC


def now() -> datetime.datetime:
    # Not captured at import: the session TPM's EK certificate is issued later.
    return datetime.datetime.now(UTC)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class Vendor:
    root: x509.Certificate
    intermediate_der: bytes


@pytest.fixture(scope="module")
def vendor(manufacturer: Manufacturer) -> Vendor:
    root = x509.load_pem_x509_certificate(manufacturer.root_cert_path.read_bytes())
    inter = x509.load_pem_x509_certificate(manufacturer.intermediate_cert_path.read_bytes())
    return Vendor(root, _der(inter))


@pytest.fixture(scope="module")
def endorsement(device: DeviceTpm) -> dict[str, tuple[bytes, bytes]]:
    """{"rsa"|"ecc": (EK certificate DER from NV, EK TPM2B_PUBLIC)}."""
    return {kind: device.endorsement(kind) for kind in ("rsa", "ecc")}


def enroll(
    vendor: Vendor,
    cert: bytes,
    ek: bytes,
    ak: bytes,
    *,
    roots: list[x509.Certificate] | None = None,
    intermediates: list[bytes] | None = None,
    now: datetime.datetime | None = None,
    **kw: object,
) -> EnrollmentFacts:
    return verify_enrollment(
        cert,
        [vendor.intermediate_der] if intermediates is None else intermediates,
        ek,
        ak,
        [vendor.root] if roots is None else roots,
        now or datetime.datetime.now(UTC),
        **kw,  # type: ignore[arg-type]
    )


def refused(code: str, *args: object, **kw: object) -> EnrollmentError:
    with pytest.raises(EnrollmentError) as info:
        enroll(*args, **kw)  # type: ignore[arg-type]
    assert info.value.code == code, str(info.value)
    return info.value


# --- a genuine TPM --------------------------------------------------------


@pytest.mark.parametrize("ek_kind", ["rsa", "ecc"])
@pytest.mark.parametrize("ak_kind", ["rsa", "ecc"])
def test_genuine_tpm_enrolls(
    vendor: Vendor,
    endorsement: dict[str, tuple[bytes, bytes]],
    rsa_ak: bytes,
    ecc_ak: bytes,
    ek_kind: str,
    ak_kind: str,
) -> None:
    cert, ek = endorsement[ek_kind]
    ak = rsa_ak if ak_kind == "rsa" else ecc_ak
    facts = enroll(vendor, cert, ek, ak)
    leaf = x509.load_der_x509_certificate(cert)
    assert facts.ek == parse_public(ek)
    assert facts.ak == parse_public(ak)
    assert facts.ek_fingerprint == ek_fingerprint(leaf.public_key())  # type: ignore[arg-type]
    assert facts.device_id == "dev-" + facts.ek_fingerprint[:32]
    assert facts.ek_cert_issuer == leaf.issuer.rfc4514_string() == "CN=swtpm-localca"
    assert facts.ek_cert_serial == format(leaf.serial_number, "x")
    # swtpm's TCG subjectAltName: manufacturer id (IBM), model, firmware version.
    assert facts.tpm_manufacturer == "id:00001014"
    assert facts.tpm_model == "swtpm"
    assert facts.tpm_version.startswith("id:")
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert EK_CERTIFICATE_EKU in eku


def test_device_id_is_stable_for_the_same_ek(
    vendor: Vendor,
    endorsement: dict[str, tuple[bytes, bytes]],
    rsa_ak: bytes,
    ecc_ak: bytes,
    device: DeviceTpm,
) -> None:
    cert, ek = endorsement["rsa"]
    first = enroll(vendor, cert, ek, rsa_ak)
    # The same EK re-derived from its template, and a different AK: the same device.
    cert_again, ek_again = device.endorsement("rsa")
    assert (cert_again, ek_again) == (cert, ek)
    again = enroll(vendor, cert_again, ek_again, ecc_ak)
    assert again.device_id == first.device_id
    assert again.device_id == device_id_for(parse_public(ek).public_key)
    # The other EK is another key, hence another id.
    assert enroll(vendor, *endorsement["ecc"], rsa_ak).device_id != first.device_id


def test_intermediate_known_to_the_verifier(
    vendor: Vendor, endorsement: dict[str, tuple[bytes, bytes]], rsa_ak: bytes
) -> None:
    cert, ek = endorsement["rsa"]
    inter = x509.load_der_x509_certificate(vendor.intermediate_der)
    facts = enroll(vendor, cert, ek, rsa_ak, intermediates=[], known_intermediates=[inter])
    assert facts.tpm_model == "swtpm"


# --- the chain ----------------------------------------------------------------


def test_missing_intermediate(
    vendor: Vendor, endorsement: dict[str, tuple[bytes, bytes]], rsa_ak: bytes
) -> None:
    refused("EK_CHAIN_UNTRUSTED", vendor, *endorsement["rsa"], rsa_ak, intermediates=[])


def test_untrusted_root(
    vendor: Vendor, endorsement: dict[str, tuple[bytes, bytes]], rsa_ak: bytes
) -> None:
    stranger = SoftCa.make("Some Other TPM Vendor Root")
    err = refused("EK_CHAIN_UNTRUSTED", vendor, *endorsement["rsa"], rsa_ak, roots=[stranger.cert])
    assert err.field == "ek_certificate"


def test_no_trusted_roots(
    vendor: Vendor, endorsement: dict[str, tuple[bytes, bytes]], rsa_ak: bytes
) -> None:
    err = refused("EK_CHAIN_UNTRUSTED", vendor, *endorsement["rsa"], rsa_ak, roots=[])
    assert "no trusted EK roots" in str(err)


def test_chain_not_yet_valid(
    vendor: Vendor, endorsement: dict[str, tuple[bytes, bytes]], rsa_ak: bytes
) -> None:
    before = datetime.datetime(2000, 1, 1, tzinfo=UTC)
    refused("EK_CHAIN_UNTRUSTED", vendor, *endorsement["rsa"], rsa_ak, now=before)


def test_swtpm_ek_certificates_never_expire(endorsement: dict[str, tuple[bytes, bytes]]) -> None:
    # Why the expiry tests below use a software vendor: swtpm_localca writes
    # notAfter 99991231235959Z, RFC 5280's "no well-defined expiration date".
    for cert, _ in endorsement.values():
        leaf = x509.load_der_x509_certificate(cert)
        assert leaf.not_valid_after_utc == datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


# --- a software vendor, for what swtpm will not make ---------------------------


@dataclass(frozen=True)
class SoftCa:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, cn: str) -> SoftCa:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=UTC))
            .not_valid_after(datetime.datetime(2040, 1, 1, tzinfo=UTC))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def ek_certificate(
        self,
        public_key: object,
        *,
        eku: x509.ObjectIdentifier = EK_CERTIFICATE_EKU,
        not_before: datetime.datetime = datetime.datetime(2021, 1, 1, tzinfo=UTC),
        not_after: datetime.datetime = datetime.datetime(2039, 1, 1, tzinfo=UTC),
    ) -> bytes:
        """An EK certificate as the EK Credential Profile has it: empty subject, critical SAN."""
        san = x509.DirectoryName(
            x509.Name(
                [
                    x509.NameAttribute(TPM_MANUFACTURER_OID, "id:58595A00"),
                    x509.NameAttribute(TPM_MODEL_OID, "soft"),
                    x509.NameAttribute(TPM_VERSION_OID, "id:00010002"),
                ]
            )
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        return _der(cert)


@pytest.fixture(scope="module")
def soft_ca() -> SoftCa:
    return SoftCa.make("attestd test EK CA")


@pytest.fixture(scope="module")
def soft_ek() -> forge.SoftKey:
    return forge.SoftKey.rsa()


EK_SYMMETRIC = (forge.AES, 128, forge.CFB)


def _soft_ek_public(key: forge.SoftKey, attributes: int = forge.EK_ATTRS) -> bytes:
    return key.public_area(
        attributes=attributes,
        scheme=forge.NULL,
        symmetric=EK_SYMMETRIC,
        auth_policy=bytes(32),
    )


def soft_enroll(
    ca: SoftCa, cert: bytes, ek_public: bytes, ak: bytes, now: datetime.datetime | None = None
) -> EnrollmentFacts:
    return verify_enrollment(cert, [], ek_public, ak, [ca.cert], now or datetime.datetime.now(UTC))


def test_software_vendor_chain_is_accepted(
    soft_ca: SoftCa, soft_ek: forge.SoftKey, rsa_ak: bytes
) -> None:
    # The baseline for the refusals below: the forged chain itself is sound.
    cert = soft_ca.ek_certificate(soft_ek.public_key)
    facts = soft_enroll(soft_ca, cert, _soft_ek_public(soft_ek), rsa_ak)
    assert (facts.tpm_manufacturer, facts.tpm_model) == ("id:58595A00", "soft")


def test_expired_ek_certificate(soft_ca: SoftCa, soft_ek: forge.SoftKey, rsa_ak: bytes) -> None:
    cert = soft_ca.ek_certificate(
        soft_ek.public_key,
        not_before=datetime.datetime(2010, 1, 1, tzinfo=UTC),
        not_after=datetime.datetime(2021, 1, 1, tzinfo=UTC),
    )
    with pytest.raises(EnrollmentError) as info:
        soft_enroll(soft_ca, cert, _soft_ek_public(soft_ek), rsa_ak)
    assert info.value.code == "EK_CHAIN_UNTRUSTED"
    # The same certificate at a time inside its validity is fine.
    soft_enroll(
        soft_ca,
        cert,
        _soft_ek_public(soft_ek),
        rsa_ak,
        now=datetime.datetime(2020, 6, 1, tzinfo=UTC),
    )


def test_chain_is_checked_at_the_given_time(
    soft_ca: SoftCa, soft_ek: forge.SoftKey, rsa_ak: bytes
) -> None:
    cert = soft_ca.ek_certificate(soft_ek.public_key)
    far_future = datetime.datetime(2300, 1, 1, tzinfo=UTC)
    with pytest.raises(EnrollmentError) as info:
        soft_enroll(soft_ca, cert, _soft_ek_public(soft_ek), rsa_ak, now=far_future)
    assert info.value.code == "EK_CHAIN_UNTRUSTED"


def test_certificate_without_the_ek_eku(
    soft_ca: SoftCa, soft_ek: forge.SoftKey, rsa_ak: bytes
) -> None:
    cert = soft_ca.ek_certificate(soft_ek.public_key, eku=ExtendedKeyUsageOID.SERVER_AUTH)
    with pytest.raises(EnrollmentError) as info:
        soft_enroll(soft_ca, cert, _soft_ek_public(soft_ek), rsa_ak)
    assert info.value.code == "EK_CERT_NOT_EK"


@pytest.mark.parametrize(
    "attributes",
    [
        forge.EK_ATTRS | forge.SIGN,
        forge.EK_ATTRS & ~forge.RESTRICTED,
        forge.EK_ATTRS & ~forge.DECRYPT,
        forge.EK_ATTRS & ~forge.FIXED_TPM,
        forge.EK_ATTRS & ~forge.FIXED_PARENT,
    ],
    ids=["sign", "not-restricted", "not-decrypt", "not-fixedtpm", "not-fixedparent"],
)
def test_ek_attributes(
    soft_ca: SoftCa, soft_ek: forge.SoftKey, rsa_ak: bytes, attributes: int
) -> None:
    cert = soft_ca.ek_certificate(soft_ek.public_key)
    with pytest.raises(EnrollmentError) as info:
        soft_enroll(soft_ca, cert, _soft_ek_public(soft_ek, attributes), rsa_ak)
    assert (info.value.code, info.value.field) == ("EK_ATTRIBUTES", "ek_public")


# --- certificate vs EK ----------------------------------------------------------


def test_certificate_for_another_key(
    vendor: Vendor, endorsement: dict[str, tuple[bytes, bytes]], rsa_ak: bytes
) -> None:
    rsa_cert, rsa_ek = endorsement["rsa"]
    ecc_cert, ecc_ek = endorsement["ecc"]
    for cert, ek in ((rsa_cert, ecc_ek), (ecc_cert, rsa_ek), (rsa_cert, rsa_ak)):
        err = refused("EK_CERT_KEY_MISMATCH", vendor, cert, ek, rsa_ak)
        assert err.field == "ek_public"


def test_certificate_for_another_rsa_key(
    soft_ca: SoftCa, soft_ek: forge.SoftKey, rsa_ak: bytes
) -> None:
    cert = soft_ca.ek_certificate(soft_ek.public_key)
    with pytest.raises(EnrollmentError) as info:
        soft_enroll(soft_ca, cert, _soft_ek_public(forge.SoftKey.rsa()), rsa_ak)
    assert info.value.code == "EK_CERT_KEY_MISMATCH"


# --- the AK -----------------------------------------------------------------------


def _rsa(**kw: object) -> bytes:
    return forge.SoftKey.rsa().public_area(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make_ak, code",
    [
        (lambda: _rsa(attributes=forge.AK_ATTRS & ~forge.RESTRICTED), "AK_ATTRIBUTES"),
        (lambda: _rsa(attributes=forge.AK_ATTRS & ~forge.SIGN), "AK_ATTRIBUTES"),
        (lambda: _rsa(attributes=forge.AK_ATTRS & ~forge.FIXED_TPM), "AK_ATTRIBUTES"),
        (lambda: _rsa(attributes=forge.AK_ATTRS & ~forge.FIXED_PARENT), "AK_ATTRIBUTES"),
        (
            lambda: _rsa(attributes=forge.AK_ATTRS & ~forge.SENSITIVE_DATA_ORIGIN),
            "AK_ATTRIBUTES",
        ),
        (lambda: _rsa(attributes=forge.AK_ATTRS | forge.DECRYPT), "AK_ATTRIBUTES"),
        (lambda: forge.SoftKey.rsa(1024).public_area(), "AK_ALGORITHM"),
        (lambda: forge.SoftKey.ecc(ec.SECP521R1()).public_area(), "AK_ALGORITHM"),
        (lambda: _rsa(scheme=forge.RSAES), "AK_ALGORITHM"),
        (lambda: _rsa(scheme_hash=forge.SHA1), "AK_ALGORITHM"),
        (lambda: _rsa(name_alg=forge.SHA1), "AK_ALGORITHM"),
        (lambda: forge.SoftKey.ecc().public_area(scheme=forge.RSASSA), "AK_ALGORITHM"),
    ],
    ids=[
        "not-restricted",
        "not-sign",
        "not-fixedtpm",
        "not-fixedparent",
        "not-sensitivedataorigin",
        "decrypt",
        "rsa-1024",
        "p-521",
        "rsaes",
        "sha1-scheme",
        "sha1-namealg",
        "ecc-with-rsassa",
    ],
)
def test_ak_refusals(
    vendor: Vendor,
    endorsement: dict[str, tuple[bytes, bytes]],
    make_ak: object,
    code: str,
) -> None:
    err = refused(code, vendor, *endorsement["rsa"], make_ak())  # type: ignore[operator]
    assert err.field == "ak_public"


@pytest.mark.parametrize(
    "make_ak",
    [
        lambda: _rsa(scheme=forge.NULL),
        lambda: _rsa(scheme=forge.RSAPSS, scheme_hash=forge.SHA384),
        lambda: forge.SoftKey.rsa(3072).public_area(scheme_hash=forge.SHA512),
        lambda: forge.SoftKey.ecc(ec.SECP384R1()).public_area(scheme_hash=forge.SHA384),
        lambda: forge.SoftKey.ecc().public_area(scheme=forge.NULL),
    ],
    ids=["rsa-null-scheme", "rsapss-sha384", "rsa-3072", "p-384", "ecc-null-scheme"],
)
def test_acceptable_aks(
    vendor: Vendor, endorsement: dict[str, tuple[bytes, bytes]], make_ak: object
) -> None:
    enroll(vendor, *endorsement["rsa"], make_ak())  # type: ignore[operator]


def test_the_ek_is_no_ak(vendor: Vendor, endorsement: dict[str, tuple[bytes, bytes]]) -> None:
    cert, ek = endorsement["rsa"]
    refused("AK_ATTRIBUTES", vendor, cert, ek, ek)


# --- malformed input ------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda c, i, e, a: (b"", i, e, a), "ek_certificate"),
        (lambda c, i, e, a: (b"not DER", i, e, a), "ek_certificate"),
        (lambda c, i, e, a: (c[:-10], i, e, a), "ek_certificate"),
        (
            lambda c, i, e, a: (bytes(DEFAULT_LIMITS.max_certificate_size + 1), i, e, a),
            "ek_certificate",
        ),
        (lambda c, i, e, a: (c, [b"junk"], e, a), "ek_intermediates[0]"),
        (
            lambda c, i, e, a: (c, i * (DEFAULT_LIMITS.max_intermediates + 1), e, a),
            "ek_intermediates",
        ),
        (lambda c, i, e, a: (c, i, e[:-1], a), "ek_public"),
        (lambda c, i, e, a: (c, i, e, a + b"\x00"), "ak_public"),
        (lambda c, i, e, a: (c, i, e, b""), "ak_public"),
    ],
    ids=[
        "empty-cert",
        "garbage-cert",
        "truncated-cert",
        "oversize-cert",
        "garbage-intermediate",
        "too-many-intermediates",
        "truncated-ek",
        "ak-trailing-byte",
        "empty-ak",
    ],
)
def test_malformed_enrollment_names_the_field(
    vendor: Vendor,
    endorsement: dict[str, tuple[bytes, bytes]],
    rsa_ak: bytes,
    mutate: object,
    field: str,
) -> None:
    cert, ek = endorsement["rsa"]
    c, i, e, a = mutate(cert, [vendor.intermediate_der], ek, rsa_ak)  # type: ignore[operator]
    with pytest.raises(MalformedError) as info:
        verify_enrollment(c, i, e, a, [vendor.root], now())
    assert info.value.field == field, str(info.value)


# --- the challenge, answered by the TPM ---------------------------------------------


@pytest.mark.parametrize(
    "ek_kind, ak_handle",
    [
        ("rsa", RSA_AK_HANDLE),
        ("rsa", ECC_AK_HANDLE),
        ("ecc", RSA_AK_HANDLE),
    ],
)
def test_activate_credential_recovers_the_secret(
    vendor: Vendor,
    endorsement: dict[str, tuple[bytes, bytes]],
    device: DeviceTpm,
    rsa_ak: bytes,
    ecc_ak: bytes,
    ek_kind: str,
    ak_handle: int,
) -> None:
    ak = rsa_ak if ak_handle == RSA_AK_HANDLE else ecc_ak
    facts = enroll(vendor, *endorsement[ek_kind], ak)
    secret = secrets.token_bytes(32)
    blob, encrypted = make_challenge(facts.ek, facts.ak.name, secret)
    assert device.activate(blob, encrypted, ek_type=ek_kind, ak_handle=ak_handle) == secret


def test_challenge_bound_to_another_name_is_not_recovered(
    vendor: Vendor,
    endorsement: dict[str, tuple[bytes, bytes]],
    device: DeviceTpm,
    rsa_ak: bytes,
    ecc_ak: bytes,
) -> None:
    facts = enroll(vendor, *endorsement["rsa"], rsa_ak)
    blob, encrypted = make_challenge(facts.ek, parse_public(ecc_ak).name, b"s" * 32)
    with pytest.raises(AgentError, match="ActivateCredential"):
        device.activate(blob, encrypted, ak_handle=RSA_AK_HANDLE)


def test_challenge_to_another_ek_is_not_recovered(
    device: DeviceTpm, rsa_ak: bytes, soft_ek: forge.SoftKey
) -> None:
    other_ek = parse_public(_soft_ek_public(soft_ek))
    blob, encrypted = make_challenge(other_ek, parse_public(rsa_ak).name, b"s" * 32)
    with pytest.raises(AgentError):
        device.activate(blob, encrypted, ak_handle=RSA_AK_HANDLE)


# TCG EK Credential Profile 2.5, B.6: the SHA-384 PolicyA (PolicySecret(TPM_RH_ENDORSEMENT))
# and PolicyB (PolicyAuthorizeNV) digests that high-range EK templates PolicyOR together.
EK_POLICY_A_SHA384 = bytes.fromhex(
    "8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e"
    "143e8bb1133824ccb431053871c6db53"
)
EK_POLICY_B_SHA384 = bytes.fromhex(
    "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5"
    "b4947c2d73e63005eed2dc2b3593d165"
)


def test_ecc_ek_challenge_is_recoverable_with_the_profile_policy(
    vendor: Vendor,
    endorsement: dict[str, tuple[bytes, bytes]],
    device: DeviceTpm,
    rsa_ak: bytes,
) -> None:
    """make_challenge is right for the P-384 EK: the TPM recovers the secret when the
    EK's own policy is satisfied, as the agent's activate() does."""
    facts = enroll(vendor, *endorsement["ecc"], rsa_ak)
    assert len(facts.ek.auth_policy) == 48  # a SHA-384 policy
    secret = secrets.token_bytes(32)
    blob, encrypted = make_challenge(facts.ek, facts.ak.name, secret)

    ectx = device.ectx
    _, template = create_ek_template(EK_TYPES["ecc"], NVReadEK(ectx))
    ek, *_ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
    session = ectx.start_auth_session(
        ESYS_TR.NONE,
        ESYS_TR.NONE,
        TPM2_SE.POLICY,
        TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
        TPM2_ALG.SHA384,
    )
    try:
        ectx.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
        ectx.policy_or(session, TPML_DIGEST([EK_POLICY_A_SHA384, EK_POLICY_B_SHA384]))
        recovered = ectx.activate_credential(
            ectx.tr_from_tpmpublic(RSA_AK_HANDLE),
            ek,
            TPM2B_ID_OBJECT.unmarshal(blob)[0],
            TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted)[0],
            session1=ESYS_TR.PASSWORD,
            session2=session,
        )
    finally:
        ectx.flush_context(session)
        ectx.flush_context(ek)
    assert bytes(recovered) == secret
