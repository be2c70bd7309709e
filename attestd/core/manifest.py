"""A TPM manufacturer's shipping manifest: which devices may enroll.

In the "preregistered" admission mode only a device that matches an entry
of a manifest loaded with ``attestd device preregister FILE.csv`` may
enroll. A manifest is a list of EK identities, so a chain to a trusted
manufacturer root is no longer enough: the TPM must also be one that was
shipped to this operator.

File format
-----------

- UTF-8 text, at most 16 MiB; a leading byte order mark is allowed (and
  ignored). Lines end in LF, CRLF or CR. Cells are separated by commas and
  may be quoted with double quotes (RFC 4180, as spreadsheets export it).
- The first line that is neither blank nor a comment is a header naming the
  columns, in any order, each at most once. The known columns are
  ``ek_cert_serial``, ``ek_cert_issuer``, ``ek_public_sha256``, ``name`` and
  ``group``. Any other column is an error, so that a misspelt column never
  silently drops a constraint.
- Blank lines (including lines whose cells are all empty) and lines whose
  first cell starts with ``#`` are skipped, before and after the header.
- Every other line is one device and has exactly one cell per header column.
  Spaces around a cell's value are ignored. A device is identified by
  ``ek_cert_serial`` together with ``ek_cert_issuer`` (the serial number and
  issuer of its EK certificate), by ``ek_public_sha256`` (the SHA-256 of its
  EK public key), or by both, in which case both must match at enrollment.
  A manifest may mix rows of the two kinds (leave the unused cells empty).

  ``ek_cert_serial``
      The certificate serial number in hex, as openssl prints it:
      ``0A:1B:2C``, ``0a1b2c`` or ``0x0A1B2C``. Case, colons, the ``0x``
      prefix and leading zeros do not matter. At most 40 bytes.
  ``ek_cert_issuer``
      The issuer's distinguished name as an RFC 4514 string, most specific
      attribute first: ``CN=Example EK CA,O=Example\\, Inc.,C=US``, as printed
      by ``openssl x509 -noout -issuer -nameopt RFC2253``. It contains commas,
      so the cell must be quoted (``"CN=...,C=US"``). Attribute types are
      ``CN``, ``L``, ``ST``, ``O``, ``OU``, ``C``, ``STREET``, ``DC``,
      ``UID``, ``emailAddress``, ``serialNumber`` or dotted OIDs; a comma or
      plus sign inside a value is escaped with a backslash. Spaces around
      the commas and plus signs between attributes are ignored. openssl's
      default output (``C = US, O = ...``) lists the attributes in the
      opposite order and is refused.
  ``ek_public_sha256``
      64 hex digits (any case, colons allowed): the SHA-256 of the EK public
      key's DER SubjectPublicKeyInfo, e.g. ``openssl x509 -noout -pubkey -in
      ek.pem | openssl pkey -pubin -outform DER | sha256sum``.
  ``name``
      Optional: a label for the device, at most 128 printable characters.
  ``group``
      Optional: the group the device joins when it enrolls; 1-64 letters,
      digits, ``.``, ``_`` or ``-``, starting with a letter or digit.

- At most 1,000,000 device rows; each cell at most 1024 characters.
- Two rows with the same serial and issuer, or the same key hash, are an
  error naming both lines: a duplicate usually means a concatenation or
  export went wrong, and which of the two names or groups applies would be
  ambiguous.

Example::

    # Shipment 2025-07, 3 units
    ek_cert_serial,ek_cert_issuer,ek_public_sha256,name,group
    0A:1B:2C:3D,"CN=Example EK CA,O=Example,C=US",,rack1-node1,edge
    4e5f,"CN=Example EK CA,O=Example\\, Inc.,C=US",,rack1-node2,edge
    ,,9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08,lab-1,

Parsing is all-or-nothing: the first problem raises ``ManifestError`` with
its 1-based line number and column, and no entries are returned, so an
operator never admits half a shipment by accident. Every value is stored in
the form enrollment computes from a certificate, so matching is plain string
equality.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from attestd.core.policy import valid_name

COLUMNS = ("ek_cert_serial", "ek_cert_issuer", "ek_public_sha256", "name", "group")

# Bounds on the untrusted file (read at call time, so a test may lower them).
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_MANIFEST_ROWS = 1_000_000
MAX_CELL_CHARS = 1024
MAX_NAME_CHARS = 128
MAX_SERIAL_BYTES = 40  # RFC 5280 allows 20; some EK CAs exceed it, 40 leaves room

_HEX_RE = re.compile(r"[0-9A-Fa-f]+")
_SHA256_RE = re.compile(r"[0-9A-Fa-f]{64}")
_NEWLINE_RE = re.compile(r"\r\n|\r|\n")
# Names openssl's RFC 2253 output uses that cryptography only writes as dotted OIDs;
# parsing them to the OID makes the stored form equal to cryptography's.
_ISSUER_NAMES = {"emailAddress": NameOID.EMAIL_ADDRESS, "serialNumber": NameOID.SERIAL_NUMBER}
_DN_HINT = (
    "not an RFC 4514 distinguished name like CN=Example EK CA,O=Example,C=US"
    " (openssl x509 -noout -issuer -nameopt RFC2253 prints one)"
)


@dataclass(frozen=True)
class ManifestEntry:
    """One preregistered device; identifiers are normalised, "" when not given."""

    line: int  # 1-based line number in the file
    ek_cert_serial: str  # lowercase hex without leading zeros, as format(serial, "x")
    ek_cert_issuer: str  # as x509.Name.rfc4514_string()
    ek_public_sha256: str  # lowercase hex
    name: str
    group: str


class ManifestError(ValueError):
    """The manifest is refused; ``line`` (0: the whole file) and ``column`` say where."""

    def __init__(self, message: str, *, line: int = 0, column: str = "") -> None:
        self.line = line
        self.column = column
        where = ", ".join(
            part
            for part in (f"line {line}" if line else "", f"column {column}" if column else "")
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)


def normalise_serial(text: str) -> str:
    """A serial number in openssl's hex forms, as enrollment writes it: ``format(n, "x")``.

    Raises ValueError. Only ASCII hex digits are accepted (``int(text, 16)``
    would also take underscores, signs and other scripts' digits).
    """
    s = text.strip()
    if s[:2] in ("0x", "0X"):
        s = s[2:]
    s = s.replace(":", "")
    if not s:
        raise ValueError("empty serial number")
    if not _HEX_RE.fullmatch(s):
        raise ValueError("not hex digits (like 0A:1B:2C, 0a1b2c or 0x0a1b2c)")
    s = s.lower().lstrip("0") or "0"
    if len(s) > 2 * MAX_SERIAL_BYTES:
        raise ValueError(f"longer than {MAX_SERIAL_BYTES} bytes")
    return s


def normalise_issuer(text: str) -> str:
    """An RFC 4514 DN string, as enrollment writes it: ``cert.issuer.rfc4514_string()``.

    Parsing and re-serialising with cryptography makes escaping and OID
    spelling identical to the enrollment side, so equal DNs compare equal as
    strings. Raises ValueError.
    """
    s = _drop_separator_spaces(text)
    if not s:
        raise ValueError("empty distinguished name")
    try:
        name = x509.Name.from_rfc4514_string(s, _ISSUER_NAMES)
    except ValueError as e:
        detail = f": {e}" if str(e) else ""
        raise ValueError(f"{_DN_HINT}{detail}") from None
    return name.rfc4514_string()


def entry_matches(
    entry: ManifestEntry, ek_cert_serial: str, ek_cert_issuer: str, ek_public_sha256: str
) -> bool:
    """Does a device (with the values enrollment computes) match ``entry``?

    Every identifier the entry gives must match. An entry that gives none,
    or only half of the serial/issuer pair, matches nothing: such an entry
    cannot come from ``parse_manifest``, and must not admit everything.
    The values are public, so plain equality (no constant-time compare).
    """
    has_cert = bool(entry.ek_cert_serial or entry.ek_cert_issuer)
    if not has_cert and not entry.ek_public_sha256:
        return False
    if has_cert and not (
        entry.ek_cert_serial
        and entry.ek_cert_issuer
        and entry.ek_cert_serial == ek_cert_serial
        and entry.ek_cert_issuer == ek_cert_issuer
    ):
        return False
    return not entry.ek_public_sha256 or entry.ek_public_sha256 == ek_public_sha256


def parse_manifest(data: bytes) -> list[ManifestEntry]:
    """Parse a whole manifest; the first problem raises ManifestError, nothing partial."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"the file exceeds {MAX_MANIFEST_BYTES} bytes")
    text = _decode(data)
    # The interpreter-wide csv.field_size_limit is left alone (other threads may parse
    # CSV): cells are checked against MAX_CELL_CHARS below, and anything past the global
    # limit (128 KiB by default) is a csv.Error reported as invalid CSV.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: tuple[str, ...] | None = None
    entries: list[ManifestEntry] = []
    by_cert: dict[tuple[str, str], int] = {}
    by_key: dict[str, int] = {}
    while True:
        line = reader.line_num + 1  # a quoted cell may span lines; report where the row starts
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise ManifestError(f"not valid CSV ({e})", line=line) from None
        if _skipped(row):
            continue
        if header is None:
            header = _parse_header(row, line)
            continue
        if len(entries) >= MAX_MANIFEST_ROWS:
            raise ManifestError(f"more than {MAX_MANIFEST_ROWS} device rows", line=line)
        entry = _parse_row(row, line, header)
        if entry.ek_cert_serial:
            cert_id = (entry.ek_cert_serial, entry.ek_cert_issuer)
            if cert_id in by_cert:
                raise ManifestError(
                    f"the same ek_cert_serial and ek_cert_issuer as line {by_cert[cert_id]}",
                    line=line,
                    column="ek_cert_serial",
                )
            by_cert[cert_id] = line
        if entry.ek_public_sha256:
            if entry.ek_public_sha256 in by_key:
                raise ManifestError(
                    f"the same key hash as line {by_key[entry.ek_public_sha256]}",
                    line=line,
                    column="ek_public_sha256",
                )
            by_key[entry.ek_public_sha256] = line
        entries.append(entry)
    if header is None:
        raise ManifestError(f"no header line naming the columns ({', '.join(COLUMNS)})", line=1)
    return entries


def _decode(data: bytes) -> str:
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[bom : bom + e.start].decode("utf-8")
        line = len(_NEWLINE_RE.findall(before)) + 1
        raise ManifestError(f"not UTF-8 (byte {bom + e.start})", line=line) from None


def _skipped(row: list[str]) -> bool:
    return not row or row[0].lstrip().startswith("#") or all(not c.strip() for c in row)


def _parse_header(row: list[str], line: int) -> tuple[str, ...]:
    names = tuple(c.strip() for c in row)
    for i, name in enumerate(names):
        if len(row[i]) > MAX_CELL_CHARS:
            raise ManifestError(f"header cell {i + 1} is not a column name", line=line)
        if not name:
            raise ManifestError(f"header cell {i + 1} is empty", line=line)
        if name not in COLUMNS:
            raise ManifestError(
                f"unknown column (known: {', '.join(COLUMNS)}); the first line that is not"
                " blank or a comment must be the header",
                line=line,
                column=name,
            )
        if name in names[:i]:
            raise ManifestError("column named twice", line=line, column=name)
    if ("ek_cert_serial" in names) != ("ek_cert_issuer" in names):
        given, missing = (
            ("ek_cert_serial", "ek_cert_issuer")
            if "ek_cert_serial" in names
            else ("ek_cert_issuer", "ek_cert_serial")
        )
        raise ManifestError(f"needs column {missing} as well", line=line, column=given)
    if "ek_cert_serial" not in names and "ek_public_sha256" not in names:
        raise ManifestError(
            "no identifier column: need ek_cert_serial and ek_cert_issuer, or ek_public_sha256",
            line=line,
        )
    return names


def _parse_row(row: list[str], line: int, header: tuple[str, ...]) -> ManifestEntry:
    if len(row) != len(header):
        raise ManifestError(
            f"{len(row)} cell(s); the header names {len(header)} columns", line=line
        )
    cells: dict[str, str] = {}
    for column, raw in zip(header, row, strict=True):
        if len(raw) > MAX_CELL_CHARS:
            raise ManifestError(
                f"longer than {MAX_CELL_CHARS} characters", line=line, column=column
            )
        value = raw.strip()
        if not value.isprintable():
            raise ManifestError(
                "contains a control or other non-printable character", line=line, column=column
            )
        cells[column] = value

    def normalised(column: str, normalise: Callable[[str], str]) -> str:
        value = cells.get(column, "")
        if not value:
            return ""
        try:
            return normalise(value)
        except ValueError as e:
            raise ManifestError(str(e), line=line, column=column) from None

    serial = normalised("ek_cert_serial", normalise_serial)
    issuer = normalised("ek_cert_issuer", normalise_issuer)
    key = normalised("ek_public_sha256", _normalise_sha256)
    if serial and not issuer:
        raise ManifestError("required with ek_cert_serial", line=line, column="ek_cert_issuer")
    if issuer and not serial:
        raise ManifestError("required with ek_cert_issuer", line=line, column="ek_cert_serial")
    if not serial and not key:
        raise ManifestError(
            "no identifier: give ek_cert_serial and ek_cert_issuer, or ek_public_sha256",
            line=line,
        )
    name = cells.get("name", "")
    if len(name) > MAX_NAME_CHARS:
        raise ManifestError(f"longer than {MAX_NAME_CHARS} characters", line=line, column="name")
    group = cells.get("group", "")
    if group and not valid_name(group):
        raise ManifestError(
            "not a group name (1-64 letters, digits, '.', '_' or '-', starting with a letter"
            " or digit)",
            line=line,
            column="group",
        )
    return ManifestEntry(
        line=line,
        ek_cert_serial=serial,
        ek_cert_issuer=issuer,
        ek_public_sha256=key,
        name=name,
        group=group,
    )


def _normalise_sha256(text: str) -> str:
    s = text.replace(":", "")
    if not _SHA256_RE.fullmatch(s):
        raise ValueError("not 64 hex digits")
    return s.lower()


def _drop_separator_spaces(text: str) -> str:
    """Remove unescaped spaces around unescaped ',' and '+' (and at either end).

    RFC 4514 has no spaces there, but people write ``CN=A, O=B, C=US`` and
    cryptography's parser refuses it. An escaped space (``\\ ``) is part of
    a value and stays.
    """
    tokens: list[str] = []
    after_separator = True
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            tokens.append(text[i : i + 2])
            i += 2
            after_separator = False
            continue
        i += 1
        if c == " " and after_separator:
            continue
        if c in ",+":
            while tokens and tokens[-1] == " ":
                tokens.pop()
            after_separator = True
        else:
            after_separator = False
        tokens.append(c)
    while tokens and tokens[-1] == " ":
        tokens.pop()
    return "".join(tokens)
