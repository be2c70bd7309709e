"""Key certification: a TPM-resident key vouched for by the device's AK.

The agent creates a signing key in its TPM and certifies it with the AK
(TPM2_Certify, TPM 2.0 Part 3, 18.2) over the attestation nonce. attestd
checks, in order:

1. the certify structure (TPMS_ATTEST of type TPM_ST_ATTEST_CERTIFY, magic
   TPM_GENERATED_VALUE) and its signature by the enrolled AK;
2. extraData equals the nonce of this attestation (constant-time);
3. the certified Name equals the Name of the public area presented
   (TPMS_CERTIFY_INFO.name; Part 1, 16: nameAlg || H(TPMT_PUBLIC));
4. the key never leaves the TPM and is a plain signing key: fixedTPM,
   fixedParent, sensitiveDataOrigin and sign set, restricted and decrypt
   clear (a restricted key could sign TPM-generated-looking data; a
   decrypt key is not what a client certificate is for).

Only then may the session credential be bound to the key (``cnf``) and an
X.509 client certificate be issued for it.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from attestd.core.limits import DEFAULT_LIMITS, Limits
from attestd.core.quote import verify_signature
from attestd.core.tpm import (
    TPM_GENERATED_VALUE,
    Attest,
    ObjectAttr,
    PublicArea,
    Signature,
    St,
    parse_attest,
    parse_public,
    parse_signature,
)
from attestd.core.verdict import Code, Failure

KEY_REQUIRED = (
    ObjectAttr.FIXED_TPM
    | ObjectAttr.FIXED_PARENT
    | ObjectAttr.SENSITIVE_DATA_ORIGIN
    | ObjectAttr.SIGN
)
KEY_FORBIDDEN = ObjectAttr.RESTRICTED | ObjectAttr.DECRYPT


@dataclass(frozen=True)
class CertifyEvidence:
    """A parsed (not yet judged) key certification."""

    public: PublicArea
    attest: Attest
    signature: Signature
    message: bytes  # the signed TPMS_ATTEST bytes


def parse_certified_key(
    key_public: bytes,
    certify_info: bytes,
    certify_signature: bytes,
    limits: Limits = DEFAULT_LIMITS,
) -> CertifyEvidence:
    """Bounded parsing; raises MalformedError naming the field."""
    return CertifyEvidence(
        parse_public(key_public, "certified_key.public", limits),
        parse_attest(certify_info, "certified_key.certify_info", limits),
        parse_signature(certify_signature, "certified_key.signature", limits),
        bytes(certify_info),
    )


def check_certified_key(evidence: CertifyEvidence, ak: PublicArea, nonce: bytes) -> Failure | None:
    """Checks 1-4. Returns the failed check, or None when the key may be bound."""
    attest = evidence.attest
    if attest.magic != TPM_GENERATED_VALUE:
        return Failure(
            Code.CERTIFY_TYPE_INVALID,
            "certified_key.certify_info.magic",
            f"0x{TPM_GENERATED_VALUE:08x}",
            f"0x{attest.magic:08x}",
            "not a structure the TPM generated",
        )
    if attest.type != St.ATTEST_CERTIFY:
        return Failure(
            Code.CERTIFY_TYPE_INVALID,
            "certified_key.certify_info",
            f"0x{St.ATTEST_CERTIFY:04x}",
            f"0x{attest.type:04x}",
            "not a TPM-generated TPM2_Certify attestation",
        )
    bad = verify_signature(ak, evidence.signature, evidence.message, allow_sha1=False)
    if bad is not None:
        return Failure(
            Code.CERTIFY_SIGNATURE_INVALID,
            "certified_key.signature",
            detail=(f"the certification is not signed by the device's AK: {bad.detail}"),
        )
    if not hmac.compare_digest(attest.extra_data, nonce):
        return Failure(
            Code.CERTIFY_NONCE_MISMATCH,
            "certified_key.certify_info.extraData",
            nonce.hex(),
            attest.extra_data.hex(),
            "the certification was not made over this attestation's nonce",
        )
    name = evidence.public.name
    if not hmac.compare_digest(attest.certified_name, name):
        return Failure(
            Code.CERTIFY_NAME_MISMATCH,
            "certified_key.public",
            name.hex(),
            attest.certified_name.hex(),
            "the certified Name is not the Name of the presented key",
        )
    public = evidence.public
    missing = [str(a.name).lower() for a in ObjectAttr if a in KEY_REQUIRED and not public.has(a)]
    present = [str(a.name).lower() for a in ObjectAttr if a in KEY_FORBIDDEN and public.has(a)]
    if missing or present:
        return Failure(
            Code.CERTIFIED_KEY_ATTRIBUTES,
            "certified_key.public.objectAttributes",
            "fixedtpm, fixedparent, sensitivedataorigin, sign; not restricted, not decrypt",
            "; ".join(
                p
                for p in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"has {', '.join(present)}" if present else "",
                )
                if p
            ),
            "the key must be a plain signing key that never leaves the TPM",
        )
    return None
