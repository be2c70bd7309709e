"""Evidence files as tpm2-tools writes them, for the offline commands.

- quote message (``tpm2_quote -m``): TPMS_ATTEST, optionally size-prefixed;
- signature (``tpm2_quote -s``): TPMT_SIGNATURE;
- PCR values (``tpm2_quote -o``): the "serialized" format (tpm2-tools'
  in-memory TPML_PCR_SELECTION and TPML_DIGEST structures, little-endian),
  the "values" format (digests concatenated in the quote's selection order),
  or tpm2_pcrread-style YAML (``sha256:`` then ``N : 0x…`` lines);
- AK: PEM public key, TPM2B_PUBLIC or TPMT_PUBLIC.

All parsing is bounded; errors are MalformedError naming the file.
"""

from __future__ import annotations

import re
import struct

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestd.core.errors import MalformedError
from attestd.core.tpm import (
    PCR_COUNT,
    TPM_GENERATED_VALUE,
    Alg,
    Bank,
    EccCurve,
    ObjectAttr,
    PublicArea,
    Selection,
    parse_public,
)

MAX_FILE = 64 * 1024

# tpm2-tools' serialized layout: TPML_PCR_SELECTION {u32 count; 16 x {u16 hash;
# u8 sizeofSelect; u8 pcrSelect[4]; pad}} then u32 count of TPML_DIGEST
# {u32 count; 8 x {u16 size; u8 buffer[64]}}.
_SEL_ENTRY = 8
_SEL_SIZE = 4 + 16 * _SEL_ENTRY
_DIGEST_ENTRY = 66
_DIGEST_LIST = 4 + 8 * _DIGEST_ENTRY
_LINE_BANK = re.compile(r"^\s*(sha1|sha256|sha384|sha512)\s*:\s*$")
_LINE_PCR = re.compile(r"^\s*(\d{1,2})\s*:\s*(?:0x)?([0-9a-fA-F]+)\s*$")


def load_ak(data: bytes, field: str = "ak") -> PublicArea:
    """A PEM public key, or TPM2B_PUBLIC/TPMT_PUBLIC bytes."""
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm) as e:
            raise MalformedError(f"not a PEM public key ({e})", field=field) from None
        if isinstance(key, rsa.RSAPublicKey):
            return PublicArea(
                b"",
                Alg.RSA,
                Alg.SHA256,
                ObjectAttr(0),
                b"",
                Alg.NULL,
                Alg.NULL,
                None,
                key.key_size,
                None,
                key,
            )
        if isinstance(key, ec.EllipticCurvePublicKey):
            curve = {
                "secp256r1": EccCurve.NIST_P256,
                "secp384r1": EccCurve.NIST_P384,
                "secp521r1": EccCurve.NIST_P521,
            }.get(key.curve.name)
            if curve is None:
                raise MalformedError(f"unsupported curve {key.curve.name}", field=field)
            return PublicArea(
                b"",
                Alg.ECC,
                Alg.SHA256,
                ObjectAttr(0),
                b"",
                Alg.NULL,
                Alg.NULL,
                None,
                key.curve.key_size,
                curve,
                key,
            )
        raise MalformedError("the key is neither RSA nor ECC", field=field)
    return parse_public(data, field)


def load_quote_message(data: bytes) -> bytes:
    """TPMS_ATTEST bytes; a TPM2B_ATTEST size prefix is removed."""
    if (
        len(data) >= 6
        and int.from_bytes(data[:2], "big") == len(data) - 2
        and int.from_bytes(data[2:6], "big") == TPM_GENERATED_VALUE
    ):
        return data[2:]
    return data


def load_pcrs(
    data: bytes, signed_selection: Selection, field: str = "pcrs"
) -> dict[str, dict[int, bytes]]:
    """PCR values from any of the supported formats (see module docstring)."""
    if len(data) > MAX_FILE:
        raise MalformedError(f"larger than {MAX_FILE} bytes", field=field)
    text = _as_text(data)
    if text is not None and any(_LINE_BANK.match(line) for line in text.splitlines()):
        return _pcrs_yaml(text, field)
    if len(data) >= _SEL_SIZE + 4 and (len(data) - _SEL_SIZE - 4) % _DIGEST_LIST == 0:
        return _pcrs_serialized(data, field)
    return _pcrs_values(data, signed_selection, field)


def _as_text(data: bytes) -> str | None:
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        return None


def _pcrs_yaml(text: str, field: str) -> dict[str, dict[int, bytes]]:
    """``sha256:`` lines open a bank, ``N : 0x…`` lines under it give values; other lines end it."""
    out: dict[str, dict[int, bytes]] = {}
    bank: Bank | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if m := _LINE_BANK.match(line):
            bank = Bank(m.group(1))
            out.setdefault(bank.value, {})
        elif (m := _LINE_PCR.match(line)) and bank is not None:
            index, hexval = int(m.group(1)), m.group(2)
            if index >= PCR_COUNT or len(hexval) != 2 * bank.digest_size:
                raise MalformedError(
                    f"line {n}: bad PCR {index} value for {bank.value}", field=field
                )
            out[bank.value][index] = bytes.fromhex(hexval)
        else:
            bank = None
    out = {b: v for b, v in out.items() if v}
    if not out:
        raise MalformedError("no PCR values found", field=field)
    return out


def _pcrs_serialized(data: bytes, field: str) -> dict[str, dict[int, bytes]]:
    (count,) = struct.unpack_from("<I", data, 0)
    if count > 16:
        raise MalformedError(f"selection count {count} > 16", field=field, offset=0)
    order: list[tuple[Bank, int]] = []
    for i in range(count):
        alg, size = struct.unpack_from("<HB", data, 4 + i * _SEL_ENTRY)
        if size > 4:
            raise MalformedError("sizeofSelect > 4", field=field, offset=4 + i * _SEL_ENTRY)
        bitmap = data[4 + i * _SEL_ENTRY + 3 : 4 + i * _SEL_ENTRY + 3 + size]
        try:
            bank = Bank.from_alg(alg)
        except ValueError:
            raise MalformedError(f"unknown bank 0x{alg:04x}", field=field) from None
        order.extend(
            (bank, j * 8 + b) for j, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1
        )
    (lists,) = struct.unpack_from("<I", data, _SEL_SIZE)
    if _SEL_SIZE + 4 + lists * _DIGEST_LIST != len(data):
        raise MalformedError("digest list count does not match the file size", field=field)
    digests: list[bytes] = []
    for li in range(lists):
        base = _SEL_SIZE + 4 + li * _DIGEST_LIST
        (n,) = struct.unpack_from("<I", data, base)
        if n > 8:
            raise MalformedError("more than 8 digests in a list", field=field, offset=base)
        for k in range(n):
            (size,) = struct.unpack_from("<H", data, base + 4 + k * _DIGEST_ENTRY)
            if size > 64:
                raise MalformedError(
                    "digest size > 64", field=field, offset=base + 4 + k * _DIGEST_ENTRY
                )
            start = base + 6 + k * _DIGEST_ENTRY
            digests.append(data[start : start + size])
    if len(digests) != len(order):
        raise MalformedError(f"{len(order)} PCRs selected but {len(digests)} digests", field=field)
    out: dict[str, dict[int, bytes]] = {}
    for (bank, index), digest in zip(order, digests, strict=True):
        out.setdefault(bank.value, {})[index] = digest
    return out


def _pcrs_values(data: bytes, selection: Selection, field: str) -> dict[str, dict[int, bytes]]:
    out: dict[str, dict[int, bytes]] = {}
    pos = 0
    for alg, indices in selection:
        try:
            bank = Bank.from_alg(alg)
        except ValueError:
            raise MalformedError(
                f"the quote selects unknown bank 0x{alg:04x}", field=field
            ) from None
        for i in sorted(indices):
            chunk = data[pos : pos + bank.digest_size]
            if len(chunk) != bank.digest_size:
                raise MalformedError(
                    "fewer PCR values than the quote selects", field=field, offset=pos
                )
            out.setdefault(bank.value, {})[i] = chunk
            pos += bank.digest_size
    if pos != len(data):
        raise MalformedError(
            f"{len(data) - pos} bytes left after the selected PCR values", field=field, offset=pos
        )
    return out
