"""Forge TPM 2.0 structures with software keys, for tests.

A TPM signs only what it computed itself, so evidence that a real TPM will
never produce (a wrong magic, an unsafe clock, a SHA-1 signature, a
certify-type attestation, a hostile length field) is built here, byte by
byte, from TPM 2.0 Part 2, and signed with a ``cryptography`` key that plays
the AK. The marshalling is written independently of ``attestd.core.tpm`` so
a test does not use the code under test to make its own input.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

# TPM_ALG_ID (Part 2, 6.3).
RSA, SHA1, AES, SHA256, SHA384, SHA512, NULL = 0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0D, 0x10
RSASSA, RSAES, RSAPSS, ECDSA, ECC, CFB = 0x14, 0x15, 0x16, 0x18, 0x23, 0x43
# TPM_ECC_CURVE (Part 2, 6.4).
P256, P384, P521 = 0x03, 0x04, 0x05
# TPM_ST (Part 2, 6.9).
ST_ATTEST_CERTIFY, ST_ATTEST_QUOTE = 0x8017, 0x8018
TPM_GENERATED_VALUE = 0xFF544347

# TPMA_OBJECT (Part 2, 8.3).
FIXED_TPM = 1 << 1
FIXED_PARENT = 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
USER_WITH_AUTH = 1 << 6
ADMIN_WITH_POLICY = 1 << 7
RESTRICTED = 1 << 16
DECRYPT = 1 << 17
SIGN = 1 << 18
AK_ATTRS = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | RESTRICTED | SIGN
EK_ATTRS = (
    FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | ADMIN_WITH_POLICY | RESTRICTED | DECRYPT
)

HASHLIB = {SHA1: "sha1", SHA256: "sha256", SHA384: "sha384", SHA512: "sha512"}
CRYPTO_HASH = {
    SHA1: hashes.SHA1,
    SHA256: hashes.SHA256,
    SHA384: hashes.SHA384,
    SHA512: hashes.SHA512,
}
BANK_ALG = {"sha1": SHA1, "sha256": SHA256, "sha384": SHA384, "sha512": SHA512}
_CURVE_ID = {"secp256r1": P256, "secp384r1": P384, "secp521r1": P521}

# A selection as the TPM marshals it: [(hash alg, PCR indices)], in order.
Selection = list[tuple[int, Iterable[int]]]


def u8(v: int) -> bytes:
    return struct.pack(">B", v)


def u16(v: int) -> bytes:
    return struct.pack(">H", v)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def tpm2b(data: bytes) -> bytes:
    return u16(len(data)) + data


def pcr_selection(selection: Selection, size_of_select: int = 3) -> bytes:
    """TPML_PCR_SELECTION (Part 2, 10.9.7)."""
    out = u32(len(selection))
    for alg, indices in selection:
        bitmap = bytearray(size_of_select)
        for i in indices:
            bitmap[i // 8] |= 1 << (i % 8)
        out += u16(alg) + u8(size_of_select) + bytes(bitmap)
    return out


def pcr_digest(
    hash_alg: int, selection: Selection, values: Mapping[str, Mapping[int, bytes]]
) -> bytes:
    """H(PCR values in selection order, ascending index inside an entry) (Part 3, Quote)."""
    by_alg = {BANK_ALG[bank]: vals for bank, vals in values.items()}
    h = hashlib.new(HASHLIB[hash_alg])
    for alg, indices in selection:
        for i in sorted(indices):
            h.update(by_alg[alg][i])
    return h.digest()


def attest(
    *,
    extra_data: bytes = b"",
    selection: Selection = (),
    digest: bytes = b"",
    magic: int = TPM_GENERATED_VALUE,
    st: int = ST_ATTEST_QUOTE,
    signer: bytes = b"\x00\x0b" + bytes(32),
    clock: int = 100_000,
    reset_count: int = 3,
    restart_count: int = 0,
    safe: int = 1,
    firmware: int = 0x2019_1023_0016_3636,
    body: bytes | None = None,
) -> bytes:
    """TPMS_ATTEST (Part 2, 10.12.12); ``body`` replaces the TPMS_QUOTE_INFO."""
    head = (
        u32(magic)
        + u16(st)
        + tpm2b(signer)
        + tpm2b(extra_data)
        + u64(clock)
        + u32(reset_count)
        + u32(restart_count)
        + u8(safe)
        + u64(firmware)
    )
    if body is None:
        body = pcr_selection(list(selection)) + tpm2b(digest)
    return head + body


@dataclass
class SoftKey:
    """A software key standing in for an AK (or an EK, for certificate tests)."""

    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @classmethod
    def rsa(cls, bits: int = 2048) -> SoftKey:
        return cls(rsa.generate_private_key(65537, bits))

    @classmethod
    def ecc(cls, curve: ec.EllipticCurve | None = None) -> SoftKey:
        return cls(ec.generate_private_key(curve or ec.SECP256R1()))

    @property
    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        return self.private.public_key()

    def pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, message: bytes, hash_alg: int = SHA256, scheme: int | None = None) -> bytes:
        """A TPMT_SIGNATURE (Part 2, 11.3.4) over ``message``."""
        h = CRYPTO_HASH[hash_alg]()
        if isinstance(self.private, rsa.RSAPrivateKey):
            scheme = RSASSA if scheme is None else scheme
            pad = (
                padding.PKCS1v15()
                if scheme == RSASSA
                else padding.PSS(padding.MGF1(h), salt_length=padding.PSS.DIGEST_LENGTH)
            )
            sig = self.private.sign(message, pad, h)
            return u16(scheme) + u16(hash_alg) + tpm2b(sig)
        der = self.private.sign(message, ec.ECDSA(h))
        r, s = decode_dss_signature(der)
        size = (self.private.curve.key_size + 7) // 8
        return (
            u16(ECDSA)
            + u16(hash_alg)
            + tpm2b(r.to_bytes(size, "big"))
            + tpm2b(s.to_bytes(size, "big"))
        )

    def public_area(
        self,
        *,
        attributes: int = AK_ATTRS,
        name_alg: int = SHA256,
        scheme: int | None = None,
        scheme_hash: int | None = SHA256,
        symmetric: tuple[int, int, int] | None = None,
        auth_policy: bytes = b"",
    ) -> bytes:
        """A TPMT_PUBLIC (Part 2, 12.2.4) for this key."""
        head = u16(RSA if self.is_rsa else ECC) + u16(name_alg) + u32(attributes)
        head += tpm2b(auth_policy)
        sym = u16(NULL) if symmetric is None else b"".join(u16(v) for v in symmetric)
        if scheme is None:
            scheme = RSASSA if self.is_rsa else ECDSA
        sch = u16(scheme) + (u16(scheme_hash) if scheme not in (NULL, RSAES) else b"")
        key = self.public_key
        if isinstance(key, rsa.RSAPublicKey):
            nums = key.public_numbers()
            e = 0 if nums.e == 65537 else nums.e
            modulus = nums.n.to_bytes((key.key_size + 7) // 8, "big")
            return head + sym + sch + u16(key.key_size) + u32(e) + tpm2b(modulus)
        nums = key.public_numbers()
        size = (key.curve.key_size + 7) // 8
        return (
            head
            + sym
            + sch
            + u16(_CURVE_ID[key.curve.name])
            + u16(NULL)
            + tpm2b(nums.x.to_bytes(size, "big"))
            + tpm2b(nums.y.to_bytes(size, "big"))
        )

    @property
    def is_rsa(self) -> bool:
        return isinstance(self.private, rsa.RSAPrivateKey)


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    """``data`` with one bit (or the bits of ``mask``) of byte ``index`` inverted."""
    b = bytearray(data)
    b[index] ^= mask
    return bytes(b)
