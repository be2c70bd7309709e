"""Bounded parsers for the few TPM 2.0 structures the verifier needs.

Structure and member names follow TPM 2.0 Library Part 2 (Structures).
Parsing is done with ``struct`` and explicit bounds instead of tpm2-pytss
wrapper types: field access through those wrappers costs microseconds each
on the hot path. tests/unit/core/test_tpm.py proves these parsers agree with
tpm2-pytss on real TPM output.

Every parser consumes the whole input: trailing bytes are an error.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestd.core.errors import MalformedError
from attestd.core.limits import DEFAULT_LIMITS, Limits

# Part 2, 6.2: TPM_GENERATED_VALUE.
TPM_GENERATED_VALUE = 0xFF544347


class Alg(enum.IntEnum):
    """TPM_ALG_ID values (Part 2, 6.3) that attestd meets."""

    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    KEYEDHASH = 0x0008
    XOR = 0x000A
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    SM3_256 = 0x0012
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECDSA = 0x0018
    ECDH = 0x0019
    ECDAA = 0x001A
    SM2 = 0x001B
    ECSCHNORR = 0x001C
    ECMQV = 0x001D
    KDF1_SP800_56A = 0x0020
    KDF2 = 0x0021
    KDF1_SP800_108 = 0x0022
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CFB = 0x0043


class St(enum.IntEnum):
    """TPM_ST attestation structure tags (Part 2, 6.9)."""

    ATTEST_NV = 0x8014
    ATTEST_COMMAND_AUDIT = 0x8015
    ATTEST_SESSION_AUDIT = 0x8016
    ATTEST_CERTIFY = 0x8017
    ATTEST_QUOTE = 0x8018
    ATTEST_TIME = 0x8019
    ATTEST_CREATION = 0x801A


class EccCurve(enum.IntEnum):
    """TPM_ECC_CURVE (Part 2, 6.4)."""

    NIST_P256 = 0x0003
    NIST_P384 = 0x0004
    NIST_P521 = 0x0005


class ObjectAttr(enum.IntFlag):
    """TPMA_OBJECT bits (Part 2, 8.3)."""

    FIXED_TPM = 1 << 1
    ST_CLEAR = 1 << 2
    FIXED_PARENT = 1 << 4
    SENSITIVE_DATA_ORIGIN = 1 << 5
    USER_WITH_AUTH = 1 << 6
    ADMIN_WITH_POLICY = 1 << 7
    NO_DA = 1 << 10
    ENCRYPTED_DUPLICATION = 1 << 11
    RESTRICTED = 1 << 16
    DECRYPT = 1 << 17
    SIGN = 1 << 18


class Bank(enum.Enum):
    """A PCR bank, named as tpm2-tools and the policy files name it."""

    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA384 = "sha384"
    SHA512 = "sha512"

    # Members are singletons compared by identity; hashing by identity is C code, where
    # Enum's hash(self._name_) is a Python call on every dict and set operation.
    __hash__ = object.__hash__

    @property
    def alg(self) -> Alg:
        # Keyed by the value string: hashing a str is C, hashing an Enum member is not.
        return _BANK_ALG_BY_VALUE[self._value_]

    @property
    def digest_size(self) -> int:
        return _BANK_DIGEST_SIZE[self._value_]

    @classmethod
    def from_alg(cls, alg: int) -> Bank:
        bank = _BANK_BY_ALG.get(alg)
        if bank is not None:
            return bank
        for bank, a in _BANK_ALG.items():
            if a == alg:
                return bank
        raise ValueError(f"no PCR bank for algorithm 0x{alg:04x}")

    @classmethod
    def parse(cls, name: str) -> Bank:
        try:
            return cls(name.lower())
        except ValueError:
            known = ", ".join(b.value for b in cls)
            raise ValueError(f"unknown bank {name!r} (known: {known})") from None


_BANK_ALG = {
    Bank.SHA1: Alg.SHA1,
    Bank.SHA256: Alg.SHA256,
    Bank.SHA384: Alg.SHA384,
    Bank.SHA512: Alg.SHA512,
}
_DIGEST_SIZE = {Alg.SHA1: 20, Alg.SHA256: 32, Alg.SHA384: 48, Alg.SHA512: 64}
_BANK_ALG_BY_VALUE = {bank.value: alg for bank, alg in _BANK_ALG.items()}
_BANK_DIGEST_SIZE = {bank.value: _DIGEST_SIZE[alg] for bank, alg in _BANK_ALG.items()}
# By TPM_ALG_ID as an int (IntEnum members hash as their int).
_BANK_BY_ALG = {int(alg): bank for bank, alg in _BANK_ALG.items()}
# Bank by its exact (lowercase) name, for Bank.parse's common case.
BANK_BY_NAME = {bank.value: bank for bank in Bank}
_HASHLIB_NAME = {Alg.SHA1: "sha1", Alg.SHA256: "sha256", Alg.SHA384: "sha384", Alg.SHA512: "sha512"}
_CRYPTO_HASH: dict[Alg, type[hashes.HashAlgorithm]] = {
    Alg.SHA1: hashes.SHA1,
    Alg.SHA256: hashes.SHA256,
    Alg.SHA384: hashes.SHA384,
    Alg.SHA512: hashes.SHA512,
}
HASH_ALGS = frozenset(_DIGEST_SIZE)
PCR_COUNT = 24


def digest_size(alg: int) -> int:
    return _DIGEST_SIZE[Alg(alg)]


_HASH_FUNCTIONS = {
    Alg.SHA1.value: hashlib.sha1,
    Alg.SHA256.value: hashlib.sha256,
    Alg.SHA384.value: hashlib.sha384,
    Alg.SHA512.value: hashlib.sha512,
}


def hash_bytes(alg: int, data: bytes) -> bytes:
    """H_alg(data) for a TPM hash algorithm."""
    function = _HASH_FUNCTIONS.get(alg)
    if function is None:  # raises: ValueError, or KeyError for a TPM_ALG_ID that is no hash
        return hashlib.new(_HASHLIB_NAME[Alg(alg)], data).digest()
    return function(data).digest()


def crypto_hash(alg: int) -> hashes.HashAlgorithm:
    cls = _CRYPTO_HASH_BY_VALUE.get(alg)
    if cls is None:  # raises as before: ValueError, or KeyError for an alg that is no hash
        return _CRYPTO_HASH[Alg(alg)]()
    return cls()


_CRYPTO_HASH_BY_VALUE = {int(alg): cls for alg, cls in _CRYPTO_HASH.items()}


def alg_name(alg: int) -> str:
    try:
        return Alg(alg).name.lower()
    except ValueError:
        return f"0x{alg:04x}"


class Reader:
    """A cursor over untrusted bytes that never reads past its end."""

    __slots__ = ("_data", "_field", "_limits", "pos")

    def __init__(self, data: bytes, field: str, limits: Limits = DEFAULT_LIMITS) -> None:
        self._data = data
        self._field = field
        self._limits = limits
        self.pos = 0

    def fail(self, message: str) -> MalformedError:
        return MalformedError(message, field=self._field, offset=self.pos)

    def _unpack(self, fmt: struct.Struct, what: str) -> int:
        if self.pos + fmt.size > len(self._data):
            raise self.fail(f"truncated: {what} needs {fmt.size} bytes")
        (value,) = fmt.unpack_from(self._data, self.pos)
        self.pos += fmt.size
        return int(value)

    def u8(self, what: str) -> int:
        return self._unpack(_U8, what)

    def u16(self, what: str) -> int:
        return self._unpack(_U16, what)

    def u32(self, what: str) -> int:
        return self._unpack(_U32, what)

    def u64(self, what: str) -> int:
        return self._unpack(_U64, what)

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self._data):
            raise self.fail(f"truncated: {what} declares {n} bytes, {self.remaining} remain")
        out = self._data[self.pos : self.pos + n]
        self.pos += n
        return out

    def tpm2b(self, what: str, max_size: int | None = None) -> bytes:
        """A TPM2B_*: UINT16 size then that many bytes, bounded."""
        size = self.u16(f"{what}.size")
        bound = self._limits.max_tpm2b if max_size is None else max_size
        if size > bound:
            self.pos -= 2
            raise self.fail(f"{what}.size {size} exceeds the limit of {bound}")
        return self.take(size, what)

    @property
    def remaining(self) -> int:
        return len(self._data) - self.pos

    def end(self) -> None:
        if self.remaining:
            raise self.fail(f"{self.remaining} trailing bytes after the structure")


_ALG_VALUES = frozenset(a.value for a in Alg)
_KEY_TYPES = frozenset({Alg.RSA, Alg.ECC, Alg.KEYEDHASH, Alg.SYMCIPHER})
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


# --- TPMT_PUBLIC (Part 2, 12.2.4) -------------------------------------------


@dataclass(frozen=True)
class PublicArea:
    """A parsed TPMT_PUBLIC of an RSA or ECC key."""

    raw: bytes  # the TPMT_PUBLIC bytes, as hashed into the Name
    type: Alg
    name_alg: Alg
    attributes: ObjectAttr
    auth_policy: bytes
    symmetric: Alg  # TPMT_SYM_DEF_OBJECT.algorithm (NULL for signing keys)
    scheme: Alg  # TPMT_RSA_SCHEME / TPMT_ECC_SCHEME scheme (may be NULL)
    scheme_hash: Alg | None
    key_bits: int  # RSA modulus bits, or the curve's size
    curve: EccCurve | None
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    @property
    def name(self) -> bytes:
        """The object's Name: nameAlg || H_nameAlg(TPMT_PUBLIC) (Part 1, 16)."""
        return struct.pack(">H", self.name_alg) + hash_bytes(self.name_alg, self.raw)

    def has(self, attr: ObjectAttr) -> bool:
        return bool(self.attributes & attr)

    def tpm2b(self) -> bytes:
        """The TPM2B_PUBLIC encoding of this public area."""
        return struct.pack(">H", len(self.raw)) + self.raw


_CURVES: dict[EccCurve, tuple[ec.EllipticCurve, int]] = {
    EccCurve.NIST_P256: (ec.SECP256R1(), 256),
    EccCurve.NIST_P384: (ec.SECP384R1(), 384),
    EccCurve.NIST_P521: (ec.SECP521R1(), 521),
}

# Schemes whose TPMU_ASYM_SCHEME member is a TPMS_SCHEME_HASH (Part 2, 11.2.3.2).
_HASH_SCHEMES = frozenset(
    {Alg.RSASSA, Alg.RSAPSS, Alg.OAEP, Alg.ECDSA, Alg.ECDH, Alg.SM2, Alg.ECSCHNORR, Alg.ECMQV}
)


def _read_alg(r: Reader, what: str) -> Alg:
    value = r.u16(what)
    try:
        return Alg(value)
    except ValueError:
        r.pos -= 2
        raise r.fail(f"{what}: unsupported algorithm 0x{value:04x}") from None


def _read_scheme(r: Reader, what: str) -> tuple[Alg, Alg | None]:
    scheme = _read_alg(r, f"{what}.scheme")
    if scheme == Alg.NULL or scheme == Alg.RSAES:
        return scheme, None
    if scheme == Alg.ECDAA:
        h = _read_alg(r, f"{what}.details.hashAlg")
        r.u16(f"{what}.details.count")
        return scheme, h
    if scheme in _HASH_SCHEMES:
        return scheme, _read_alg(r, f"{what}.details.hashAlg")
    raise r.fail(f"{what}: unsupported scheme {scheme.name}")


def parse_public(data: bytes, field: str = "public", limits: Limits = DEFAULT_LIMITS) -> PublicArea:
    """Parse a TPMT_PUBLIC, or a TPM2B_PUBLIC (a size prefix that covers the rest)."""
    if len(data) > limits.max_public_size + 2:
        raise MalformedError(
            f"{len(data)} bytes exceeds the limit of {limits.max_public_size}", field=field
        )
    declared = int.from_bytes(data[:2], "big") if len(data) >= 2 else -1
    inner = int.from_bytes(data[2:4], "big") if len(data) >= 4 else -1
    if declared == len(data) - 2 and inner in _KEY_TYPES:
        data = data[2:]
    elif declared not in _ALG_VALUES:
        # No algorithm has that id, so not a TPMT_PUBLIC: a TPM2B_PUBLIC whose size is off.
        raise MalformedError(
            f"TPM2B_PUBLIC declares {declared} bytes but {max(len(data) - 2, 0)} follow",
            field=field,
            offset=0,
        )
    r = Reader(data, field, limits)
    obj_type = _read_alg(r, "type")
    name_alg = _read_alg(r, "nameAlg")
    if name_alg not in HASH_ALGS:
        raise MalformedError(f"nameAlg {name_alg.name} is not a hash", field=field)
    attributes = ObjectAttr(r.u32("objectAttributes"))
    auth_policy = r.tpm2b("authPolicy")
    symmetric = _read_alg(r, "parameters.symmetric.algorithm")
    if symmetric != Alg.NULL:
        r.u16("parameters.symmetric.keyBits")
        r.u16("parameters.symmetric.mode")
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    curve: EccCurve | None = None
    if obj_type == Alg.RSA:
        scheme, scheme_hash = _read_scheme(r, "parameters.scheme")
        key_bits = r.u16("parameters.keyBits")
        exponent = r.u32("parameters.exponent") or 65537
        modulus = r.tpm2b("unique.rsa")
        if key_bits not in (1024, 2048, 3072, 4096) or len(modulus) * 8 != key_bits:
            raise MalformedError(
                f"RSA keyBits {key_bits} does not match a {len(modulus)}-byte modulus", field=field
            )
        try:
            public_key = rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
        except ValueError as e:
            raise MalformedError(f"invalid RSA public key: {e}", field=field) from None
    elif obj_type == Alg.ECC:
        scheme, scheme_hash = _read_scheme(r, "parameters.scheme")
        curve_id = r.u16("parameters.curveID")
        try:
            curve = EccCurve(curve_id)
        except ValueError:
            raise MalformedError(f"unsupported ECC curve 0x{curve_id:04x}", field=field) from None
        kdf = _read_alg(r, "parameters.kdf.scheme")
        if kdf != Alg.NULL:
            r.u16("parameters.kdf.details.hashAlg")
        x = r.tpm2b("unique.ecc.x")
        y = r.tpm2b("unique.ecc.y")
        crv, key_bits = _CURVES[curve]
        size = (key_bits + 7) // 8
        if len(x) > size or len(y) > size:
            raise MalformedError("ECC point coordinates longer than the curve", field=field)
        try:
            public_key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), crv
            ).public_key()
        except ValueError as e:
            raise MalformedError(f"invalid ECC public point: {e}", field=field) from None
    else:
        raise MalformedError(f"unsupported key type {obj_type.name}", field=field)
    r.end()
    return PublicArea(
        raw=bytes(data),
        type=obj_type,
        name_alg=name_alg,
        attributes=attributes,
        auth_policy=auth_policy,
        symmetric=symmetric,
        scheme=scheme,
        scheme_hash=scheme_hash,
        key_bits=key_bits,
        curve=curve,
        public_key=public_key,
    )


# --- TPML_PCR_SELECTION (Part 2, 10.9.7) -----------------------------------

# An ordered selection as the TPM signed it: (hash alg, PCR indices) per entry.
Selection = tuple[tuple[int, frozenset[int]], ...]


def read_pcr_selection(r: Reader, limits: Limits) -> Selection:
    count = r.u32("pcrSelect.count")
    if count > limits.max_pcr_selections:
        raise r.fail(f"pcrSelect.count {count} exceeds the limit of {limits.max_pcr_selections}")
    out = []
    for i in range(count):
        alg = r.u16(f"pcrSelect[{i}].hash")
        size = r.u8(f"pcrSelect[{i}].sizeofSelect")
        if size > limits.max_size_of_select:
            raise r.fail(f"pcrSelect[{i}].sizeofSelect {size} exceeds {limits.max_size_of_select}")
        bitmap = r.take(size, f"pcrSelect[{i}].pcrSelect")
        indices = frozenset(
            byte_i * 8 + bit for byte_i, b in enumerate(bitmap) for bit in range(8) if b >> bit & 1
        )
        out.append((alg, indices))
    return tuple(out)


def encode_pcr_selection(selection: Selection) -> bytes:
    """Marshal a TPML_PCR_SELECTION (3-byte bitmaps, the PC Client minimum)."""
    parts = [struct.pack(">I", len(selection))]
    for alg, indices in selection:
        bitmap = bytearray(3)
        for i in indices:
            bitmap[i // 8] |= 1 << (i % 8)
        parts.append(struct.pack(">HB", alg, 3) + bytes(bitmap))
    return b"".join(parts)


# --- TPMS_ATTEST (Part 2, 10.12.12) ----------------------------------------


@dataclass(frozen=True, slots=True)
class ClockInfo:
    """TPMS_CLOCK_INFO (Part 2, 10.11.1)."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True, slots=True)
class Attest:
    """A parsed TPMS_ATTEST of type quote or certify."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    # TPMS_QUOTE_INFO, when type == ATTEST_QUOTE.
    pcr_select: Selection = ()
    pcr_digest: bytes = b""
    # TPMS_CERTIFY_INFO, when type == ATTEST_CERTIFY.
    certified_name: bytes = b""
    certified_qualified_name: bytes = b""


def parse_attest(data: bytes, field: str = "quote", limits: Limits = DEFAULT_LIMITS) -> Attest:
    """Parse a TPMS_ATTEST (the contents of a TPM2B_ATTEST).

    Magic and type are returned, not judged: the appraisal names a wrong one
    as a failed check. Only quote and certify bodies are understood.
    """
    if type(data) is bytes:
        quote = _parse_quote_fast(data, limits)
        if quote is not None:
            return quote
    return _parse_attest_checked(data, field, limits)


def fast_maker(cls: type) -> Callable[[], Any]:
    """A maker of ``cls`` instances, for hot paths; ``cls`` is a dataclass with __slots__.

    A frozen dataclass's __init__ stores each field with object.__setattr__, a
    Python-level call per field (its __setattr__ refuses plain stores). Instead::

        obj = _NEW_ATTEST()      # a blank object of a private class with the same slots
        obj.magic = magic        # plain attribute stores, every field
        ...
        obj.__class__ = Attest   # now an Attest: frozen, and equal to Attest(...)

    The result is an ordinary instance with every field set, so ==, hash, repr and
    FrozenInstanceError are those of the __init__-built one. (The slots make attribute
    reads and the __class__ assignment cheap: no instance __dict__.)

    The stores are written out where each object is made, on purpose: a generated
    maker function taking the fields (as dataclasses generate __init__) measured
    0.3-0.7 µs more per quote check (one Python call per object; keyword calls more),
    which is more than the RSA-2048 case's margin under the 1.3x target.
    """
    slots = cls.__dict__["__slots__"]
    maker = type(f"_{cls.__name__}Blank", (), {"__module__": __name__, "__slots__": slots})
    probe = maker()
    for name in slots:
        setattr(probe, name, None)
    probe.__class__ = cls  # TypeError here if the layouts ever differ
    return maker


_NEW_CLOCK_INFO = fast_maker(ClockInfo)
_NEW_ATTEST = fast_maker(Attest)


_ATTEST_HEAD = struct.Struct(">IHH")  # magic, type, qualifiedSigner.size
# clockInfo (clock, resetCount, restartCount, safe), firmwareVersion
_CLOCK_FIRMWARE = struct.Struct(">QIIBQ")
_SELECT_HEAD = struct.Struct(">HB")  # TPMS_PCR_SELECTION: hash, sizeofSelect
_SIG_HEAD = struct.Struct(">HHH")  # TPMT_SIGNATURE: sigAlg, hash, first TPM2B size
# pcrSelect bitmaps seen so far -> their indices (bounded; a handful in practice).
_SELECT_INDICES: dict[bytes, frozenset[int]] = {}
# Enum members looked up once: each Enum class attribute access is a Python-level call.
_ATTEST_QUOTE, _ECDSA = St.ATTEST_QUOTE, Alg.ECDSA
# As plain ints too: comparing an int with an IntEnum member takes the generic path.
_ATTEST_QUOTE_VALUE, _ECDSA_VALUE = int(St.ATTEST_QUOTE), int(Alg.ECDSA)
_RSA_SIGNATURES = {int(alg): alg for alg in (Alg.RSASSA, Alg.RSAPSS)}


def _select_indices(bitmap: bytes) -> frozenset[int]:
    indices = _SELECT_INDICES.get(bitmap)
    if indices is None:
        indices = frozenset(
            byte_i * 8 + bit for byte_i, b in enumerate(bitmap) for bit in range(8) if b >> bit & 1
        )
        if len(_SELECT_INDICES) < 4096:
            _SELECT_INDICES[bitmap] = indices
    return indices


class _QuoteShape:
    """Quotes of one total size whose qualifiedSigner, extraData, pcrSelect and pcrDigest
    have the sizes here: one struct unpacks any of them at once, into (magic, type,
    qualifiedSigner.size, qualifiedSigner, extraData.size, extraData, clockInfo.clock,
    .resetCount, .restartCount, .safe, firmwareVersion, pcrDigest), skipping pcrSelect
    and pcrDigest.size, the ``tail``. A quote whose two sizes unpack as the ones here and
    whose tail is a key of ``layouts`` parses field for field as the quote that layout
    was learnt from did."""

    __slots__ = ("extra_size", "layouts", "signer_size", "struct", "tail_at", "tail_end")

    def __init__(self, n: int, signer_size: int, extra_size: int, digest_size: int) -> None:
        self.signer_size = signer_size
        self.extra_size = extra_size
        self.tail_at = 8 + signer_size + 2 + extra_size + 25
        self.tail_end = n - digest_size
        self.struct = struct.Struct(
            f">IHH{signer_size}sH{extra_size}sQIIBQ{self.tail_end - self.tail_at}x{digest_size}s"
        )
        self.layouts: dict[bytes, _QuoteLayout] = {}


class _QuoteLayout:
    """What one tail (pcrSelect and pcrDigest.size bytes) of a _QuoteShape parses to:
    the selection, and what the step-by-step parse checks of it against the limits."""

    __slots__ = ("fits", "needs", "selection")

    def __init__(self, data: bytes, shape: _QuoteShape, attest: Attest) -> None:
        self.selection = attest.pcr_select
        sizes, pos = [], shape.tail_at + 4
        for _ in attest.pcr_select:
            sizes.append(data[pos + 2])
            pos += 3 + sizes[-1]
        digest_size = len(data) - shape.tail_end
        self.needs = (
            len(data),
            max(shape.signer_size, shape.extra_size, digest_size),
            len(sizes),
            max(sizes, default=0),
        )
        self.fits: Limits | None = None  # the last limits found to allow it

    def allowed_by(self, limits: Limits) -> bool:
        n, tpm2b, count, size_of_select = self.needs
        if (
            n <= limits.max_attest_size
            and tpm2b <= limits.max_tpm2b
            and count <= limits.max_pcr_selections
            and size_of_select <= limits.max_size_of_select
        ):
            self.fits = limits
            return True
        return False


# Shapes learnt, by total size. A device sends the same layout every time: only the
# clock, the nonce and the digest change; a fleet sends a handful. Learnt before any
# signature is checked, so bounded: a few shapes per size, and _MAX_LAYOUTS layouts in
# all (then it starts over, and the usual layouts are learnt again).
_SHAPES: dict[int, tuple[_QuoteShape, ...]] = {}
_SHAPES_PER_SIZE = 8
_MAX_LAYOUTS = 1024
_learnt = 0  # layouts in _SHAPES (or fewer, after a shape was dropped)


def _parse_quote_fast(data: bytes, limits: Limits) -> Attest | None:
    """A well-formed TPMS_ATTEST of a quote, as _parse_attest_checked parses it; else None.

    Accepts exactly the quotes the checked path accepts and returns equal values; any
    other input (another type, a bound exceeded, truncated, trailing bytes) gives None,
    so that the checked path names what is wrong.

    A layout seen before is unpacked with one struct (see _QuoteShape), when ``limits``
    allow what the step-by-step parse would check of it.
    """
    for shape in _SHAPES.get(len(data), ()):
        layout = shape.layouts.get(data[shape.tail_at : shape.tail_end])
        if layout is None:
            continue
        (
            magic,
            st,
            signer_size,
            signer,
            extra_size,
            extra,
            clock,
            reset_count,
            restart_count,
            safe,
            firmware,
            digest,
        ) = shape.struct.unpack(data)
        if (
            signer_size == shape.signer_size
            and extra_size == shape.extra_size
            and st == _ATTEST_QUOTE_VALUE
            and safe <= 1
            and (limits is layout.fits or layout.allowed_by(limits))
        ):
            clock_info = _NEW_CLOCK_INFO()
            clock_info.clock = clock
            clock_info.reset_count = reset_count
            clock_info.restart_count = restart_count
            clock_info.safe = safe == 1
            clock_info.__class__ = ClockInfo
            attest = _NEW_ATTEST()
            attest.magic = magic
            attest.type = st
            attest.qualified_signer = signer
            attest.extra_data = extra
            attest.clock_info = clock_info
            attest.firmware_version = firmware
            attest.pcr_select = layout.selection
            attest.pcr_digest = digest
            attest.certified_name = b""
            attest.certified_qualified_name = b""
            attest.__class__ = Attest
            return attest  # type: ignore[no-any-return]  # a fast_maker object
    parsed = _parse_quote_steps(data, limits)
    if parsed is not None:
        _learn_layout(data, parsed)
    return parsed


def _learn_layout(data: bytes, attest: Attest) -> None:
    """Remember the shape and layout of a quote _parse_quote_steps accepted."""
    global _learnt
    n = len(data)
    sizes = (len(attest.qualified_signer), len(attest.extra_data), len(attest.pcr_digest))
    if _learnt >= _MAX_LAYOUTS:
        _SHAPES.clear()
        _learnt = 0
    shapes = _SHAPES.get(n, ())
    for shape in shapes:
        if (shape.signer_size, shape.extra_size, n - shape.tail_end) == sizes:
            break
    else:
        shape = _QuoteShape(n, *sizes)
        _SHAPES[n] = (*shapes[1 - _SHAPES_PER_SIZE :], shape)  # the newest few
    tail = data[shape.tail_at : shape.tail_end]
    if tail not in shape.layouts:
        shape.layouts[tail] = _QuoteLayout(data, shape, attest)
        _learnt += 1


def _parse_quote_steps(data: bytes, limits: Limits) -> Attest | None:
    """_parse_quote_fast for a layout not seen before: field by field."""
    n = len(data)
    if n > limits.max_attest_size or n < 8:
        return None
    magic, st, signer_size = _ATTEST_HEAD.unpack_from(data)
    max_tpm2b = limits.max_tpm2b
    if st != _ATTEST_QUOTE or signer_size > max_tpm2b:
        return None
    extra_at = 8 + signer_size + 2
    if extra_at > n:
        return None
    extra_size = data[extra_at - 2] << 8 | data[extra_at - 1]
    pos = extra_at + extra_size
    if extra_size > max_tpm2b or pos + 29 > n:  # clock info, firmware, selection count
        return None
    clock, reset_count, restart_count, safe, firmware = _CLOCK_FIRMWARE.unpack_from(data, pos)
    count = int.from_bytes(data[pos + 25 : pos + 29], "big")
    pos += 29
    if safe > 1 or count > limits.max_pcr_selections:
        return None
    max_select = limits.max_size_of_select
    selection = []
    for _ in range(count):
        if pos + 3 > n:
            return None
        alg, size = _SELECT_HEAD.unpack_from(data, pos)
        pos += 3
        if size > max_select or pos + size > n:
            return None
        selection.append((alg, _select_indices(data[pos : pos + size])))
        pos += size
    if pos + 2 > n:
        return None
    digest_size = data[pos] << 8 | data[pos + 1]
    pos += 2
    if digest_size > max_tpm2b or pos + digest_size != n:
        return None
    return Attest(
        magic,
        st,
        data[8 : 8 + signer_size],
        data[extra_at : extra_at + extra_size],
        ClockInfo(clock, reset_count, restart_count, safe == 1),
        firmware,
        tuple(selection),
        data[pos:],
    )


def _parse_attest_checked(data: bytes, field: str, limits: Limits) -> Attest:
    if len(data) > limits.max_attest_size:
        raise MalformedError(
            f"{len(data)} bytes exceeds the limit of {limits.max_attest_size}", field=field
        )
    r = Reader(data, field, limits)
    magic = r.u32("magic")
    st = r.u16("type")
    signer = r.tpm2b("qualifiedSigner")
    extra = r.tpm2b("extraData")
    clock_value = r.u64("clockInfo.clock")
    reset_count = r.u32("clockInfo.resetCount")
    restart_count = r.u32("clockInfo.restartCount")
    safe = r.u8("clockInfo.safe")
    if safe > 1:
        raise r.fail(f"clockInfo.safe must be 0 or 1, got {safe}")
    clock = ClockInfo(clock_value, reset_count, restart_count, safe == 1)
    firmware = r.u64("firmwareVersion")
    if st == St.ATTEST_QUOTE:
        selection = read_pcr_selection(r, limits)
        digest = r.tpm2b("attested.quote.pcrDigest")
        r.end()
        return Attest(magic, st, signer, extra, clock, firmware, selection, digest)
    if st == St.ATTEST_CERTIFY:
        name = r.tpm2b("attested.certify.name")
        qname = r.tpm2b("attested.certify.qualifiedName")
        r.end()
        return Attest(
            magic,
            st,
            signer,
            extra,
            clock,
            firmware,
            certified_name=name,
            certified_qualified_name=qname,
        )
    raise MalformedError(
        f"attestation type 0x{st:04x} is neither a quote nor a certify",
        field=field,
        code="QUOTE_TYPE_INVALID",
    )


# --- TPMT_SIGNATURE (Part 2, 11.3.4) ---------------------------------------


@dataclass(frozen=True, slots=True)
class Signature:
    alg: Alg  # RSASSA, RSAPSS or ECDSA
    hash_alg: int
    sig: bytes = b""  # RSA signature
    r: int = 0  # ECDSA
    s: int = 0


_NEW_SIGNATURE = fast_maker(Signature)


def parse_signature(
    data: bytes, field: str = "signature", limits: Limits = DEFAULT_LIMITS
) -> Signature:
    n = len(data)
    if type(data) is bytes and 6 <= n <= limits.max_signature_size:
        # Fast path for well-formed signatures; anything else is parsed (and named) below.
        alg_value, hash_alg, size = _SIG_HEAD.unpack_from(data)
        rsa_alg = _RSA_SIGNATURES.get(alg_value)
        if rsa_alg is not None:
            if size <= limits.max_tpm2b and n == 6 + size:
                sig = _NEW_SIGNATURE()
                sig.alg = rsa_alg
                sig.hash_alg = hash_alg
                sig.sig = data[6:]
                sig.r = 0
                sig.s = 0
                sig.__class__ = Signature
                return sig  # type: ignore[no-any-return]  # a fast_maker object
        elif alg_value == _ECDSA_VALUE and size <= 66 and n >= 8 + size:
            s_size = data[6 + size] << 8 | data[7 + size]
            if s_size <= 66 and n == 8 + size + s_size:
                sig = _NEW_SIGNATURE()
                sig.alg = _ECDSA
                sig.hash_alg = hash_alg
                sig.sig = b""
                sig.r = int.from_bytes(data[6 : 6 + size], "big")
                sig.s = int.from_bytes(data[8 + size :], "big")
                sig.__class__ = Signature
                return sig  # type: ignore[no-any-return]  # a fast_maker object
    return _parse_signature_checked(data, field, limits)


def _parse_signature_checked(data: bytes, field: str, limits: Limits) -> Signature:
    if len(data) > limits.max_signature_size:
        raise MalformedError(
            f"{len(data)} bytes exceeds the limit of {limits.max_signature_size}", field=field
        )
    r = Reader(data, field, limits)
    alg = _read_alg(r, "sigAlg")
    if alg in (Alg.RSASSA, Alg.RSAPSS):
        h = r.u16("signature.hash")
        sig = r.tpm2b("signature.sig")
        r.end()
        return Signature(alg, h, sig=sig)
    if alg == Alg.ECDSA:
        h = r.u16("signature.hash")
        sr = r.tpm2b("signature.signatureR", 66)
        ss = r.tpm2b("signature.signatureS", 66)
        r.end()
        return Signature(alg, h, r=int.from_bytes(sr, "big"), s=int.from_bytes(ss, "big"))
    raise MalformedError(f"unsupported signature algorithm {alg.name}", field=field, offset=0)


def pcr_digest(
    hash_alg: int, selection: Selection, values: Mapping[int, Mapping[int, bytes]]
) -> bytes:
    """The quote's pcrDigest: H(PCR values concatenated in selection order).

    Part 3, TPM2_Quote: values are taken entry by entry of the selection and,
    inside each entry, in ascending PCR index order.
    """
    function = _HASH_FUNCTIONS.get(hash_alg)
    h = hashlib.new(_HASHLIB_NAME[Alg(hash_alg)]) if function is None else function()
    for alg, indices in selection:
        if not indices:
            continue  # an empty entry contributes nothing (and may name an unsent bank)
        bank = values[alg]
        try:
            h.update(b"".join(map(bank.__getitem__, sorted(indices))))
        except TypeError:  # a value that is not bytes-like: fail as hashing it would
            for i in sorted(indices):
                h.update(bank[i])
    return h.digest()
