"""The session credential: an EAT Attestation Result (EAR) as an ES256 JWT.

Claims follow draft-ietf-rats-ear with the Veraison EAR profile; the key
is given by the caller, the time too. Compact JWS (RFC 7515) is small
enough to build here: one fixed header, one signature (RFC 7518 3.4: ES256
is the raw 64-byte r||s, not DER).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from attestd.core.verdict import Verdict

EAR_PROFILE = "tag:github.com,2023:veraison/ear"
SUBMOD = "tpm"
DEFAULT_LIFETIME_S = 3600


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint of a P-256 key."""
    jwk = public_jwk(public_key)
    members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    return b64url(
        hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    )


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    nums = public_key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(nums.x.to_bytes(32, "big")),
        "y": b64url(nums.y.to_bytes(32, "big")),
    }


@dataclass(frozen=True)
class Credential:
    token: str
    claims: dict[str, Any]
    expires_at_ms: int


def issue_credential(
    verdict: Verdict,
    *,
    device_id: str,
    nonce: bytes,
    key: ec.EllipticCurvePrivateKey,
    now_s: int,
    lifetime_s: int = DEFAULT_LIFETIME_S,
    verifier_build: str = "attestd",
    extra_claims: dict[str, Any] | None = None,
) -> Credential:
    """Sign an EAR for an affirming verdict. Refuses anything else (RuntimeError: a bug)."""
    if not verdict.affirming:
        raise RuntimeError("a credential is issued only for an affirming verdict")
    claims: dict[str, Any] = {
        "eat_profile": EAR_PROFILE,
        "iat": now_s,
        "nbf": now_s,
        "exp": now_s + lifetime_s,
        "jti": b64url(secrets.token_bytes(16)),
        "sub": device_id,
        "eat_nonce": b64url(nonce),
        "ear.verifier-id": {"developer": "attestd", "build": verifier_build},
        "submods": {
            SUBMOD: {
                "ear.status": verdict.status.value,
                "ear.trustworthiness-vector": verdict.trust_vector.as_ear(),
                "ear.appraisal-policy-id": f"policy:{verdict.policy_name}@{verdict.policy_version}",
            }
        },
    }
    if extra_claims:
        claims.update(extra_claims)
    return Credential(sign_jwt(claims, key), claims, (now_s + lifetime_s) * 1000)


# Encoded JWT headers per signing key: id(key) -> (key, header). The key is held so its
# id cannot be reused by another object; a handful of keys per process (rotations).
_HEADERS: dict[int, tuple[ec.EllipticCurvePrivateKey, str]] = {}
_ES256 = ec.ECDSA(hashes.SHA256())


def _header(key: ec.EllipticCurvePrivateKey) -> str:
    held = _HEADERS.get(id(key))
    if held is not None and held[0] is key:
        return held[1]
    header = {"alg": "ES256", "typ": "JWT", "kid": key_id(key.public_key())}
    encoded = b64url(json.dumps(header, separators=(",", ":")).encode())
    if len(_HEADERS) >= 64:
        _HEADERS.clear()
    _HEADERS[id(key)] = (key, encoded)
    return encoded


def sign_jwt(claims: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> str:
    signing_input = (
        _header(key)
        + "."
        + b64url(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    )
    der = key.sign(signing_input.encode(), _ES256)
    r, s = decode_dss_signature(der)
    return signing_input + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def verify_jwt(token: str, public_key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """Check an ES256 JWT's signature and return its claims (expiry is the caller's)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a compact JWS")
    header = json.loads(b64url_decode(parts[0]))
    if header.get("alg") != "ES256":
        raise ValueError("only ES256 is accepted")
    sig = b64url_decode(parts[2])
    if len(sig) != 64:
        raise ValueError("ES256 signature must be 64 bytes")
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    public_key.verify(der, (parts[0] + "." + parts[1]).encode(), ec.ECDSA(hashes.SHA256()))
    claims: dict[str, Any] = json.loads(b64url_decode(parts[1]))
    return claims


def decode_unverified(token: str) -> dict[str, Any]:
    """The claims of a JWT without checking anything: for display only."""
    claims: dict[str, Any] = json.loads(b64url_decode(token.split(".")[1]))
    return claims


def public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk_of(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> dict[str, str]:
    """RFC 7517 JWK of an RSA or NIST-curve EC public key (for ``cnf``)."""
    if isinstance(key, rsa.RSAPublicKey):
        rsa_nums = key.public_numbers()
        n = rsa_nums.n.to_bytes((rsa_nums.n.bit_length() + 7) // 8, "big")
        e = rsa_nums.e.to_bytes((rsa_nums.e.bit_length() + 7) // 8, "big")
        return {"kty": "RSA", "n": b64url(n), "e": b64url(e)}
    size = (key.curve.key_size + 7) // 8
    crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[key.curve.name]
    nums = key.public_numbers()
    return {
        "kty": "EC",
        "crv": crv,
        "x": b64url(nums.x.to_bytes(size, "big")),
        "y": b64url(nums.y.to_bytes(size, "big")),
    }
