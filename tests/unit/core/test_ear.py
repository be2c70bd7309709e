"""attestd.core.ear: the session credential is an EAR-shaped ES256 JWT."""

from __future__ import annotations

import json

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from attestd.core import verdict as v
from attestd.core.ear import (
    DEFAULT_LIFETIME_S,
    EAR_PROFILE,
    b64url,
    b64url_decode,
    decode_unverified,
    issue_credential,
    key_id,
    public_jwk,
    verify_jwt,
)
from attestd.core.verdict import Code, Failure, Status, TrustVector, Verdict

NOW_S = 1_700_000_000
NONCE = bytes(range(32))
DEVICE = "dev-0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def affirming() -> Verdict:
    return Verdict(
        status=Status.AFFIRMING,
        trust_vector=TrustVector(
            instance_identity=v.TRUSTWORTHY_INSTANCE,
            configuration=v.APPROVED_CONFIG,
            executables=v.APPROVED_BOOT,
            hardware=v.GENUINE_HARDWARE,
        ),
        appraised_at_ms=NOW_S * 1000,
        policy_name="lab",
        policy_version=3,
    )


def issue(key: ec.EllipticCurvePrivateKey, **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {"device_id": DEVICE, "nonce": NONCE, "key": key, "now_s": NOW_S}
    args.update(kw)
    return issue_credential(affirming(), **args)  # type: ignore[arg-type]


def test_claims_have_the_ear_shape(key: ec.EllipticCurvePrivateKey) -> None:
    cred = issue(key)
    claims = cred.claims
    assert claims["eat_profile"] == EAR_PROFILE == "tag:github.com,2023:veraison/ear"
    assert claims["iat"] == NOW_S
    assert claims["exp"] == NOW_S + DEFAULT_LIFETIME_S == NOW_S + 3600
    assert cred.expires_at_ms == claims["exp"] * 1000
    assert claims["sub"] == DEVICE
    assert b64url_decode(claims["eat_nonce"]) == NONCE
    assert isinstance(claims["jti"], str) and len(b64url_decode(claims["jti"])) >= 16
    assert claims["ear.verifier-id"]["developer"] == "attestd"
    assert claims["ear.verifier-id"]["build"]
    tpm = claims["submods"]["tpm"]
    assert tpm["ear.status"] == "affirming"
    assert tpm["ear.trustworthiness-vector"] == {
        "instance-identity": 2,
        "configuration": 2,
        "executables": 3,
        "hardware": 2,
    }
    assert tpm["ear.appraisal-policy-id"] == "policy:lab@3"


def test_lifetime_and_extra_claims(key: ec.EllipticCurvePrivateKey) -> None:
    cred = issue(key, lifetime_s=300, extra_claims={"cnf": {"jkt": "abc"}})
    assert cred.claims["exp"] - cred.claims["iat"] == 300
    assert verify_jwt(cred.token, key.public_key())["cnf"] == {"jkt": "abc"}


def test_every_credential_has_its_own_jti(key: ec.EllipticCurvePrivateKey) -> None:
    assert issue(key).claims["jti"] != issue(key).claims["jti"]


def test_round_trip(key: ec.EllipticCurvePrivateKey) -> None:
    cred = issue(key)
    assert verify_jwt(cred.token, key.public_key()) == cred.claims
    assert decode_unverified(cred.token) == cred.claims


def test_header_is_es256_with_the_key_thumbprint(key: ec.EllipticCurvePrivateKey) -> None:
    header = json.loads(b64url_decode(issue(key).token.split(".")[0]))
    assert header == {"alg": "ES256", "typ": "JWT", "kid": key_id(key.public_key())}
    jwk = public_jwk(key.public_key())
    assert (jwk["kty"], jwk["crv"]) == ("EC", "P-256")
    # RFC 7518 3.4: the signature is raw r||s, 64 bytes.
    assert len(b64url_decode(issue(key).token.split(".")[2])) == 64


def _tamper_payload(token: str, **changes: object) -> str:
    h, p, s = token.split(".")
    claims = json.loads(b64url_decode(p))
    claims.update(changes)
    return ".".join([h, b64url(json.dumps(claims, separators=(",", ":")).encode()), s])


@pytest.mark.parametrize(
    "changes",
    [{"sub": "dev-someone-else"}, {"exp": NOW_S + 10**9}, {"submods": {"tpm": {}}}],
    ids=["sub", "exp", "submods"],
)
def test_tampered_payload_fails(
    key: ec.EllipticCurvePrivateKey, changes: dict[str, object]
) -> None:
    forged = _tamper_payload(issue(key).token, **changes)
    with pytest.raises(InvalidSignature):
        verify_jwt(forged, key.public_key())


def test_tampered_signature_fails(key: ec.EllipticCurvePrivateKey) -> None:
    h, p, s = issue(key).token.split(".")
    sig = bytearray(b64url_decode(s))
    sig[10] ^= 1
    with pytest.raises(InvalidSignature):
        verify_jwt(".".join([h, p, b64url(bytes(sig))]), key.public_key())


def test_another_key_fails(key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidSignature):
        verify_jwt(issue(key).token, other.public_key())


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t + ".extra",
        lambda t: t.rsplit(".", 1)[0],
        lambda t: b64url(b'{"alg":"none","typ":"JWT"}') + "." + t.split(".", 1)[1],
        lambda t: b64url(b'{"alg":"HS256","typ":"JWT"}') + "." + t.split(".", 1)[1],
        lambda t: t.rsplit(".", 1)[0] + "." + b64url(bytes(63)),
    ],
    ids=["four-parts", "two-parts", "alg-none", "alg-hs256", "short-signature"],
)
def test_malformed_tokens_are_refused(key: ec.EllipticCurvePrivateKey, mangle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        verify_jwt(mangle(issue(key).token), key.public_key())


@pytest.mark.parametrize("status", [Status.NONE, Status.WARNING, Status.CONTRAINDICATED])
def test_refuses_a_verdict_that_is_not_affirming(
    key: ec.EllipticCurvePrivateKey, status: Status
) -> None:
    verdict = Verdict(
        status=status,
        trust_vector=TrustVector(instance_identity=v.UNTRUSTWORTHY_INSTANCE),
        failures=(Failure(Code.NONCE_MISMATCH, "quote.extraData"),),
    )
    with pytest.raises(RuntimeError, match="affirming"):
        issue_credential(verdict, device_id=DEVICE, nonce=NONCE, key=key, now_s=NOW_S)
