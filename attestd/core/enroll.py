"""Enrollment: is this EK a genuine TPM's, and is this AK in the same TPM?

1. The EK certificate chains to a trusted manufacturer root (TCG EK
   Credential Profile; path building by cryptography's x509.verification,
   with a permissive end-entity policy because EK certificates carry an
   empty subject, a critical subjectAltName and EKU 2.23.133.8.1).
2. The certificate's key is the EK public area's key, and that area has
   the attributes of an EK (restricted decryption key, fixedTPM/fixedParent).
3. The AK is a restricted signing key that never leaves the TPM (fixedTPM,
   fixedParent, sensitiveDataOrigin), RSA >= 2048 or P-256/P-384, with a
   scheme and hash attestd accepts.
4. The challenge: TPM2_MakeCredential in software (tpm2-pytss' reference
   implementation) to the EK, bound to the AK's Name. Only a TPM holding
   both the EK and an object with that Name recovers the secret.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from attestd.core.errors import EnrollmentError, MalformedError
from attestd.core.limits import DEFAULT_LIMITS, Limits
from attestd.core.tpm import Alg, EccCurve, ObjectAttr, PublicArea, parse_public

# TCG EK Credential Profile: tcg-kp-EKCertificate.
EK_CERTIFICATE_EKU = x509.ObjectIdentifier("2.23.133.8.1")
# subjectAltName directory name attributes (TCG EK Credential Profile, 3.2.9).
TPM_MANUFACTURER_OID = x509.ObjectIdentifier("2.23.133.2.1")
TPM_MODEL_OID = x509.ObjectIdentifier("2.23.133.2.2")
TPM_VERSION_OID = x509.ObjectIdentifier("2.23.133.2.3")

AK_REQUIRED = (
    ObjectAttr.RESTRICTED
    | ObjectAttr.SIGN
    | ObjectAttr.FIXED_TPM
    | ObjectAttr.FIXED_PARENT
    | ObjectAttr.SENSITIVE_DATA_ORIGIN
)
EK_REQUIRED = (
    ObjectAttr.RESTRICTED | ObjectAttr.DECRYPT | ObjectAttr.FIXED_TPM | ObjectAttr.FIXED_PARENT
)
AK_HASHES = frozenset({Alg.SHA256, Alg.SHA384, Alg.SHA512})


@dataclass(frozen=True)
class EnrollmentFacts:
    """What a verified enrollment establishes about a device."""

    device_id: str
    ek: PublicArea
    ak: PublicArea
    ek_fingerprint: str  # hex SHA-256 of the EK's SubjectPublicKeyInfo
    ek_cert_issuer: str
    ek_cert_serial: str
    tpm_manufacturer: str
    tpm_model: str
    tpm_version: str


def device_id_for(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """The device id: derived from the EK public key, so the same TPM gets the same id."""
    return "dev-" + ek_fingerprint(public_key)[:32]


def ek_fingerprint(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def load_certificate(der: bytes, field: str, limits: Limits = DEFAULT_LIMITS) -> x509.Certificate:
    if not der:
        raise MalformedError("required", field=field)
    if len(der) > limits.max_certificate_size:
        raise MalformedError(f"exceeds {limits.max_certificate_size} bytes", field=field)
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise MalformedError(f"not a DER X.509 certificate ({e})", field=field) from None


def verify_ek_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: datetime.datetime,
) -> None:
    """Build and check the path leaf -> intermediates -> a trusted root at ``now``."""
    if not roots:
        raise EnrollmentError(
            "no trusted EK roots are configured", field="ek_certificate", code="EK_CHAIN_UNTRUSTED"
        )
    verifier = (
        PolicyBuilder()
        .store(Store(list(roots)))
        .time(now)
        .max_chain_depth(4)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, list(intermediates))
    except VerificationError as e:
        raise EnrollmentError(
            f"the EK certificate does not chain to a trusted manufacturer root: {e}",
            field="ek_certificate",
            code="EK_CHAIN_UNTRUSTED",
        ) from None
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and EK_CERTIFICATE_EKU not in eku:
        raise EnrollmentError(
            "the certificate's extended key usage is not EK certificate",
            field="ek_certificate",
            code="EK_CERT_NOT_EK",
        )


def _same_key(cert_key: object, public: PublicArea) -> bool:
    tpm_key = public.public_key
    if isinstance(cert_key, rsa.RSAPublicKey) and isinstance(tpm_key, rsa.RSAPublicKey):
        return cert_key.public_numbers() == tpm_key.public_numbers()
    if isinstance(cert_key, ec.EllipticCurvePublicKey) and isinstance(
        tpm_key, ec.EllipticCurvePublicKey
    ):
        return (
            cert_key.curve.name == tpm_key.curve.name
            and cert_key.public_numbers() == tpm_key.public_numbers()
        )
    return False


def check_ak(ak: PublicArea) -> None:
    """Refuse an AK that is not a TPM-bound restricted signing key of an accepted kind."""
    missing = [str(a.name) for a in ObjectAttr if a in AK_REQUIRED and not ak.has(a)]
    if missing or ak.has(ObjectAttr.DECRYPT):
        what = f"missing {', '.join(n.lower() for n in missing)}" if missing else "decrypt is set"
        raise EnrollmentError(
            f"the AK must be a restricted signing key bound to the TPM ({what})",
            field="ak_public",
            code="AK_ATTRIBUTES",
        )
    if ak.type == Alg.RSA:
        if ak.key_bits < 2048:
            raise EnrollmentError(
                f"RSA AK of {ak.key_bits} bits; at least 2048 required",
                field="ak_public",
                code="AK_ALGORITHM",
            )
        schemes: tuple[Alg, ...] = (Alg.RSASSA, Alg.RSAPSS, Alg.NULL)
    else:
        if ak.curve not in (EccCurve.NIST_P256, EccCurve.NIST_P384):
            raise EnrollmentError(
                "ECC AK must be on NIST P-256 or P-384", field="ak_public", code="AK_ALGORITHM"
            )
        schemes = (Alg.ECDSA, Alg.NULL)
    if ak.scheme not in schemes:
        raise EnrollmentError(
            f"AK signing scheme {ak.scheme.name} is not accepted",
            field="ak_public",
            code="AK_ALGORITHM",
        )
    if ak.scheme_hash is not None and ak.scheme_hash not in AK_HASHES:
        raise EnrollmentError(
            f"AK scheme hash {ak.scheme_hash.name} is not accepted",
            field="ak_public",
            code="AK_ALGORITHM",
        )
    if ak.name_alg not in AK_HASHES:
        raise EnrollmentError(
            f"AK nameAlg {ak.name_alg.name} is not accepted", field="ak_public", code="AK_ALGORITHM"
        )


def _san_attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return ""
    for name in san.get_values_for_type(x509.DirectoryName):
        for attr in name.get_attributes_for_oid(oid):
            return str(attr.value)
    return ""


def verify_enrollment(
    ek_certificate: bytes,
    ek_intermediates: Sequence[bytes],
    ek_public: bytes,
    ak_public: bytes,
    roots: Sequence[x509.Certificate],
    now: datetime.datetime,
    limits: Limits = DEFAULT_LIMITS,
    known_intermediates: Sequence[x509.Certificate] = (),
) -> EnrollmentFacts:
    """Run checks 1-3; raise MalformedError or EnrollmentError with a code, else the facts."""
    if len(ek_intermediates) > limits.max_intermediates:
        raise MalformedError(
            f"more than {limits.max_intermediates} certificates", field="ek_intermediates"
        )
    leaf = load_certificate(ek_certificate, "ek_certificate", limits)
    inters = [
        load_certificate(d, f"ek_intermediates[{i}]", limits)
        for i, d in enumerate(ek_intermediates)
    ]
    ek = parse_public(ek_public, "ek_public", limits)
    ak = parse_public(ak_public, "ak_public", limits)
    verify_ek_chain(leaf, [*inters, *known_intermediates], roots, now)
    try:
        cert_key = leaf.public_key()
    except (ValueError, TypeError) as e:
        raise MalformedError(f"unusable public key ({e})", field="ek_certificate") from None
    if not _same_key(cert_key, ek):
        raise EnrollmentError(
            "the EK certificate is for another key than this EK",
            field="ek_public",
            code="EK_CERT_KEY_MISMATCH",
        )
    if (ek.attributes & EK_REQUIRED) != EK_REQUIRED or ek.has(ObjectAttr.SIGN):
        raise EnrollmentError(
            "the EK is not a restricted decryption key bound to the TPM",
            field="ek_public",
            code="EK_ATTRIBUTES",
        )
    check_ak(ak)
    return EnrollmentFacts(
        device_id=device_id_for(ek.public_key),
        ek=ek,
        ak=ak,
        ek_fingerprint=ek_fingerprint(ek.public_key),
        ek_cert_issuer=leaf.issuer.rfc4514_string(),
        ek_cert_serial=format(leaf.serial_number, "x"),
        tpm_manufacturer=_san_attr(leaf, TPM_MANUFACTURER_OID),
        tpm_model=_san_attr(leaf, TPM_MODEL_OID),
        tpm_version=_san_attr(leaf, TPM_VERSION_OID),
    )


def make_challenge(ek: PublicArea, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential(EK, secret, AK Name) -> (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET)."""
    # tpm2-pytss implements the Part 1 (24) credential protection reference
    # algorithm; a well-kept implementation beats a hand-rolled KDFa/CFB/HMAC.
    from tpm2_pytss.types import TPM2B_NAME, TPM2B_PUBLIC
    from tpm2_pytss.utils import make_credential

    public, _ = TPM2B_PUBLIC.unmarshal(ek.tpm2b())
    blob, enc = make_credential(public, secret, TPM2B_NAME(ak_name))
    return bytes(blob.marshal()), bytes(enc.marshal())
