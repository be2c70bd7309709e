"""attestd.core.toolformats: the evidence files tpm2-tools writes, bounded.

Real tpm2-tools output is exercised through `attestd check-quote`
(tests/unit/test_check_quote.py); here each format is built by hand and
fuzzed: the only exception that may leave a loader is MalformedError.
"""

from __future__ import annotations

import base64
import random
import struct
from collections.abc import Callable

import forge
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from attestd.core.errors import MalformedError
from attestd.core.toolformats import MAX_FILE, load_ak, load_pcrs, load_quote_message
from attestd.core.tpm import Alg, EccCurve, parse_public

SHA1_SEL = ((Alg.SHA1.value, frozenset({4})),)
SELECTION = ((Alg.SHA256.value, frozenset({0, 1, 7})), *SHA1_SEL)
VALUES = {
    "sha256": {0: b"\x00" * 32, 1: b"\x01" * 32, 7: b"\x07" * 32},
    "sha1": {4: b"\x04" * 20},
}


def values_file() -> bytes:
    """``tpm2_quote -F values``: digests concatenated in the quote's selection order."""
    return b"".join(VALUES["sha256"][i] for i in (0, 1, 7)) + VALUES["sha1"][4]


def yaml_file() -> bytes:
    """``tpm2_pcrread``'s output."""
    lines = ["  sha1:", f"    4 : 0x{VALUES['sha1'][4].hex().upper()}", "  sha256:"]
    lines += [f"    {i} : 0x{d.hex().upper()}" for i, d in VALUES["sha256"].items()]
    return ("\n".join(lines) + "\n").encode()


def serialized_file() -> bytes:
    """``tpm2_quote -o`` (serialized): tpm2-tools' in-memory structures, little-endian.

    TPML_PCR_SELECTION {u32 count; 16 x {u16 hash; u8 sizeofSelect; u8 pcrSelect[4]; pad}},
    then u32 count of TPML_DIGEST {u32 count; 8 x {u16 size; u8 buffer[64]}}.
    """
    sel = struct.pack("<I", 2)
    sel += struct.pack("<HB", Alg.SHA256, 3) + bytes([0b10000011, 0, 0, 0]) + b"\x00"
    sel += struct.pack("<HB", Alg.SHA1, 3) + bytes([0b00010000, 0, 0, 0]) + b"\x00"
    sel += bytes(8 * 14)
    digests = [VALUES["sha256"][i] for i in (0, 1, 7)] + [VALUES["sha1"][4]]
    lst = struct.pack("<I", len(digests))
    for d in digests:
        lst += struct.pack("<H", len(d)) + d.ljust(64, b"\x00")
    lst += bytes(66 * (8 - len(digests)))
    return sel + struct.pack("<I", 1) + lst


@pytest.mark.parametrize("make", [values_file, yaml_file, serialized_file])
def test_every_pcr_format_gives_the_same_values(make: Callable[[], bytes]) -> None:
    assert load_pcrs(make(), SELECTION) == VALUES


@pytest.mark.parametrize(
    "data, message",
    [
        (values_file()[:-1], "fewer PCR values"),
        (values_file() + b"\x00", "bytes left after"),
        (b"sha256:\n  0 : 0x1234\n", "bad PCR 0 value"),
        (b"sha256:\n  24 : 0x" + b"00" * 32 + b"\n", "bad PCR 24 value"),
        (b"sha256:\nnothing here\n", "no PCR values found"),
        (bytes(MAX_FILE + 1), "larger than"),
    ],
)
def test_bad_pcr_files(data: bytes, message: str) -> None:
    with pytest.raises(MalformedError, match=message) as info:
        load_pcrs(data, SELECTION)
    assert info.value.field == "pcrs"


def test_serialized_digest_count_must_match_the_selection() -> None:
    data = bytearray(serialized_file())
    struct.pack_into("<I", data, 4 + 16 * 8 + 4, 3)  # 3 digests for 4 selected PCRs
    with pytest.raises(MalformedError, match="4 PCRs selected but 3 digests"):
        load_pcrs(bytes(data), SELECTION)


# --- AKs -----------------------------------------------------------------------


def _pem(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_ak_as_pem_or_tpm_structure_is_the_same_key() -> None:
    for key in (forge.SoftKey.rsa(), forge.SoftKey.ecc(ec.SECP384R1())):
        tpmt = key.public_area()
        from_pem = load_ak(key.pem())
        from_tpmt = load_ak(tpmt)
        from_tpm2b = load_ak(len(tpmt).to_bytes(2, "big") + tpmt)
        assert from_tpmt == from_tpm2b == parse_public(tpmt)
        assert from_pem.type == from_tpmt.type
        assert from_pem.public_key.public_numbers() == from_tpmt.public_key.public_numbers()
        assert from_pem.key_bits == from_tpmt.key_bits
    assert load_ak(forge.SoftKey.ecc().pem()).curve == EccCurve.NIST_P256


@pytest.mark.parametrize(
    "pem, message",
    [
        (_pem(ed25519.Ed25519PrivateKey.generate().public_key()), "neither RSA nor ECC"),
        (_pem(ec.generate_private_key(ec.SECP224R1()).public_key()), "unsupported curve"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM public key"),
    ],
    ids=["ed25519", "p-224", "garbage"],
)
def test_unusable_pem_aks(pem: bytes, message: str) -> None:
    with pytest.raises(MalformedError, match=message) as info:
        load_ak(pem, "ak")
    assert info.value.field == "ak"


def _pem_with_unknown_curve() -> bytes:
    der = forge.SoftKey.ecc().public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    prime256v1 = bytes.fromhex("06082a8648ce3d030107")  # OID 1.2.840.10045.3.1.7
    assert prime256v1 in der
    unknown = der.replace(prime256v1, bytes.fromhex("06082a8648ce3d030163"))  # ...3.1.99
    body = base64.encodebytes(unknown)
    return b"-----BEGIN PUBLIC KEY-----\n" + body + b"-----END PUBLIC KEY-----\n"


def test_pem_ak_on_an_unknown_curve_is_malformed() -> None:
    with pytest.raises(MalformedError):
        load_ak(_pem_with_unknown_curve(), "ak")


def test_quote_message_prefix_is_removed_only_when_it_is_one() -> None:
    attest = forge.attest(selection=[(forge.SHA256, [0])], digest=bytes(32))
    assert load_quote_message(len(attest).to_bytes(2, "big") + attest) == attest
    assert load_quote_message(attest) == attest
    junk = b"\x00\x04abcd"  # a size prefix, but not over a TPMS_ATTEST
    assert load_quote_message(junk) == junk


# --- fuzz -----------------------------------------------------------------------


def _fuzz(inputs: list[bytes], load: Callable[[bytes], object], seed: int, rounds: int) -> None:
    rng = random.Random(seed)
    for _ in range(rounds):
        buf = bytearray(rng.choice(inputs))
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        if rng.random() < 0.2:
            buf = buf[: rng.randrange(len(buf))]
        try:
            load(bytes(buf))
        except MalformedError:
            pass
        except Exception as e:  # pragma: no cover - the failure message is the point
            pytest.fail(f"{bytes(buf)!r}: {type(e).__name__}: {e}")


def test_pcr_files_fuzz() -> None:
    files = [values_file(), yaml_file(), serialized_file()]
    _fuzz(files, lambda b: load_pcrs(b, SELECTION), seed=7, rounds=3000)


def test_tpm_structure_aks_fuzz() -> None:
    keys = [forge.SoftKey.rsa().public_area(), forge.SoftKey.ecc().public_area()]
    _fuzz(keys, load_ak, seed=8, rounds=1500)


def test_pem_aks_fuzz() -> None:
    pems = [forge.SoftKey.rsa().pem(), forge.SoftKey.ecc().pem()]
    _fuzz(pems, load_ak, seed=9, rounds=3000)
