"""attestd.core.manifest: shipping manifests for preregistered admission.

Matching is string equality, so the tests that matter most build a real
certificate with cryptography and check that a manifest row written the way
openssl prints the certificate normalises to exactly what enrollment
computes from it.
"""

from __future__ import annotations

import csv
import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

import attestd.core.manifest as manifest
from attestd.core.enroll import ek_fingerprint
from attestd.core.manifest import (
    ManifestEntry,
    ManifestError,
    entry_matches,
    normalise_issuer,
    normalise_serial,
    parse_manifest,
)

HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
HASH2 = "aa" * 32
ISSUER = "CN=Example EK CA,O=Example,C=US"
HEADER = "ek_cert_serial,ek_cert_issuer,ek_public_sha256,name,group\n"

# A serial whose DER encoding needs a leading zero byte (high bit set), as
# openssl prints it: 00:8F:...
SERIAL_HIGH_BIT = int("8f" + "0e" * 15, 16)


def _parse(text: str) -> list[ManifestEntry]:
    return parse_manifest(text.encode())


def _error(data: str | bytes) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        parse_manifest(data.encode() if isinstance(data, str) else data)
    return info.value


def _openssl_serial(serial: int) -> str:
    """The serial as `openssl x509 -serial` style colon hex of its DER content octets."""
    raw = serial.to_bytes(serial.bit_length() // 8 + 1, "big")
    return ":".join(f"{b:02X}" for b in raw)


def _certificate(
    issuer: x509.Name, serial: int, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    """An EK-like certificate: empty subject, signed by a throwaway CA key."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=365))
        .sign(ca_key, hashes.SHA256())
    )


def _awkward_issuer() -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example, Inc."),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "TPM + EK"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Example EK CA 01"),
        ]
    )


# --- valid files -------------------------------------------------------------------------------


def test_the_documented_example_parses() -> None:
    doc = manifest.__doc__
    assert doc is not None
    block = doc.split("Example::\n\n", 1)[1].split("\n\n", 1)[0]
    text = "\n".join(line.removeprefix("    ") for line in block.splitlines()) + "\n"
    entries = _parse(text)
    assert [(e.line, e.ek_cert_serial, e.name, e.group) for e in entries] == [
        (3, "a1b2c3d", "rack1-node1", "edge"),
        (4, "4e5f", "rack1-node2", "edge"),
        (5, "", "lab-1", ""),
    ]
    assert entries[1].ek_cert_issuer == "CN=Example EK CA,O=Example\\, Inc.,C=US"
    assert entries[2].ek_public_sha256 == HASH


def test_a_full_row() -> None:
    (e,) = _parse(HEADER + f'0A:1B,"{ISSUER}",{HASH},node 1,edge\n')
    assert e == ManifestEntry(
        line=2,
        ek_cert_serial="a1b",
        ek_cert_issuer=ISSUER,
        ek_public_sha256=HASH,
        name="node 1",
        group="edge",
    )


def test_header_columns_in_any_order_and_optional_columns_absent() -> None:
    entries = _parse(f'group,ek_public_sha256,ek_cert_issuer,ek_cert_serial\nlab,,"{ISSUER}",ff\n')
    assert entries == [ManifestEntry(2, "ff", ISSUER, "", "", "lab")]
    (e,) = _parse(f"ek_public_sha256\n{HASH}\n")
    assert (e.ek_cert_serial, e.ek_cert_issuer, e.ek_public_sha256, e.name, e.group) == (
        "",
        "",
        HASH,
        "",
        "",
    )


def test_bom_comments_blank_lines_and_line_numbers() -> None:
    text = (
        "# shipped 2025-07\r\n"  # 1: a comment before the header
        "\r\n"  # 2
        " ek_public_sha256 , name \r\n"  # 3: spaces around header names
        f"{HASH},first\r\n"  # 4
        "  # an indented comment,with cells\r\n"  # 5
        ",\r\n"  # 6: all cells empty
        "\r\n"  # 7
        f'" {HASH2.upper()} ", second \r\n'  # 8: spaces around values
    )
    entries = parse_manifest(b"\xef\xbb\xbf" + text.encode())
    assert [(e.line, e.ek_public_sha256, e.name) for e in entries] == [
        (4, HASH, "first"),
        (8, HASH2, "second"),
    ]


def test_a_header_without_rows_is_an_empty_manifest() -> None:
    assert _parse(HEADER) == []
    assert _parse("ek_public_sha256") == []


def test_a_quoted_cell_spanning_lines_reports_the_line_where_the_row_starts() -> None:
    err = _error(f'ek_public_sha256,name\n{HASH},ok\n{HASH2},"two\nlines"\n')
    assert (err.line, err.column) == (3, "name")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0A:1B:2C", "a1b2c"),
        ("0a1b2c", "a1b2c"),
        ("0x0A1B2C", "a1b2c"),
        ("0X0a:1b:2c", "a1b2c"),
        ("00:8F:0E", "8f0e"),
        ("A1B2C", "a1b2c"),
        (" 0a1b ", "a1b"),
        ("0", "0"),
        ("00:00", "0"),
        ("ff" * 40, "ff" * 40),
        ("00" + "ff" * 40, "ff" * 40),
    ],
)
def test_serial_forms(text: str, expected: str) -> None:
    assert normalise_serial(text) == expected


@pytest.mark.parametrize(
    "text", ["", "0x", ":", "xyz", "0a 1b", "+1a", "1_0", "-1", "\u0663", "0a\n1b", "1" * 81]
)
def test_bad_serials(text: str) -> None:
    with pytest.raises(ValueError):
        normalise_serial(text)


def test_key_hash_with_colons_and_upper_case() -> None:
    colons = ":".join(HASH[i : i + 2].upper() for i in range(0, 64, 2))
    (e,) = _parse(f"ek_public_sha256\n{colons}\n")
    assert e.ek_public_sha256 == HASH


def test_issuer_with_spaces_and_escapes_normalises_to_cryptographys_form() -> None:
    issuer = _awkward_issuer()
    cert = _certificate(issuer, 5, ec.generate_private_key(ec.SECP256R1()))
    expected = cert.issuer.rfc4514_string()
    assert expected == "CN=Example EK CA 01,OU=TPM \\+ EK,O=Example\\, Inc.,C=US"
    for written in (
        expected,
        "CN=Example EK CA 01, OU=TPM \\+ EK, O=Example\\, Inc., C=US",
        "  CN=Example EK CA 01 ,OU=TPM \\+ EK ,  O=Example\\, Inc.,C=US ",
        "2.5.4.3=Example EK CA 01,2.5.4.11=TPM \\+ EK,O=Example\\2C Inc.,C=US",
    ):
        assert normalise_issuer(written) == expected, written
    rest = expected.split(",", 1)[1]
    (e,) = _parse(f'ek_cert_serial,ek_cert_issuer\n5,"CN=Example EK CA 01, {rest}"\n')
    assert e.ek_cert_issuer == expected


def test_issuer_keeps_escaped_spaces_and_multi_valued_rdns() -> None:
    issuer = x509.Name(
        [
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "CA "),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "X"),
                ]
            )
        ]
    )
    expected = issuer.rfc4514_string()
    assert normalise_issuer(expected) == expected
    assert normalise_issuer(expected.replace("+", " + ")) == expected


def test_openssl_attribute_names_are_accepted() -> None:
    issuer = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "CA"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, "0042"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "pki@example.com"),
        ]
    )
    expected = issuer.rfc4514_string()
    assert normalise_issuer("emailAddress=pki@example.com,serialNumber=0042,CN=CA") == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "garbage",
        "cn=lower case type",
        "FOO=bar",
        "CN=a,",
        "CN=",
        "C=USA",
        "CN=a\\",
        "C = US, O = Example, CN = Example EK CA",  # openssl's default, reversed order
        'CN="quoted, value"',
    ],
)
def test_bad_issuers(text: str) -> None:
    with pytest.raises(ValueError):
        normalise_issuer(text)


def test_issuer_normalisation_is_idempotent() -> None:
    once = normalise_issuer("CN=Example EK CA 01, OU=TPM \\+ EK, O=Example\\2C Inc., C=US")
    assert normalise_issuer(once) == once


# --- matching ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key_kind", ["rsa", "ec"])
def test_a_row_written_from_a_real_certificate_matches_what_enrollment_computes(
    key_kind: str,
) -> None:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if key_kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    cert = _certificate(_awkward_issuer(), SERIAL_HIGH_BIT, key)
    public_key = cert.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    # What enrollment (attestd.core.enroll) stores for this device.
    serial = format(cert.serial_number, "x")
    issuer = cert.issuer.rfc4514_string()
    fingerprint = ek_fingerprint(public_key)

    # The manifest as a manufacturer writes it: openssl's serial with its leading 00 byte,
    # a DN with spaces after the commas, an upper-case colon-separated key hash.
    openssl_serial = _openssl_serial(cert.serial_number)
    assert openssl_serial.startswith("00:8F:")
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    written_hash = ":".join(f"{b:02X}" for b in hashlib.sha256(spki).digest())
    written_issuer = "CN=Example EK CA 01, OU=TPM \\+ EK, O=Example\\, Inc., C=US"

    # Three manifests, since one device in two rows of one file is a duplicate.
    (by_cert,) = _parse(
        f'ek_cert_issuer,ek_cert_serial,ek_public_sha256\n"{written_issuer}",{openssl_serial},\n'
    )
    (by_key,) = _parse(f"ek_public_sha256\n{written_hash}\n")
    (by_both,) = _parse(
        "ek_public_sha256,ek_cert_serial,ek_cert_issuer\n"
        f'{written_hash},0x{serial.upper()},"{written_issuer}"\n'
    )
    for entry in (by_cert, by_key, by_both):
        assert entry_matches(entry, serial, issuer, fingerprint), entry

    other_serial = format(cert.serial_number + 1, "x")
    other_issuer = "CN=Example EK CA 02,O=Example,C=US"
    other_key = "00" * 32
    assert not entry_matches(by_cert, other_serial, issuer, fingerprint)
    assert not entry_matches(by_cert, serial, other_issuer, fingerprint)
    assert entry_matches(by_cert, serial, issuer, other_key)  # the row gives no key hash
    assert not entry_matches(by_key, serial, issuer, other_key)
    assert entry_matches(by_key, other_serial, other_issuer, fingerprint)
    assert not entry_matches(by_both, serial, issuer, other_key)
    assert not entry_matches(by_both, other_serial, issuer, fingerprint)
    assert not entry_matches(by_both, serial, other_issuer, fingerprint)


def test_a_serial_with_a_leading_zero_digit_matches() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(_awkward_issuer(), 0x0A1B2C, key)
    (e,) = _parse(f'ek_cert_serial,ek_cert_issuer\n0A:1B:2C,"{cert.issuer.rfc4514_string()}"\n')
    assert format(cert.serial_number, "x") == "a1b2c" == e.ek_cert_serial
    assert entry_matches(e, "a1b2c", cert.issuer.rfc4514_string(), "")


@pytest.mark.parametrize(
    "entry",
    [
        ManifestEntry(1, "", "", "", "anything", "g"),  # no identifier at all
        ManifestEntry(1, "a1", "", "", "", ""),  # half a serial/issuer pair
        ManifestEntry(1, "", ISSUER, "", "", ""),
    ],
)
def test_an_entry_without_a_complete_identifier_matches_nothing(entry: ManifestEntry) -> None:
    assert not entry_matches(entry, "a1", ISSUER, HASH)
    assert not entry_matches(entry, "", "", "")
    assert not entry_matches(entry, "a1", "", "")
    assert not entry_matches(entry, "", ISSUER, "")


# --- errors ------------------------------------------------------------------------------------


def test_error_message_names_line_and_column() -> None:
    err = _error(f"name,ek_public_sha256\nok,{HASH}\nbad,{HASH[:-1]}\n")
    assert isinstance(err, ValueError)
    assert (err.line, err.column) == (3, "ek_public_sha256")
    assert str(err) == "line 3, column ek_public_sha256: not 64 hex digits"


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        # The header.
        ("", 1, "", "no header line"),
        ("# only a comment\n\n", 1, "", "no header line"),
        ("ek_cert_serail,ek_cert_issuer\n1,CN=x\n", 1, "ek_cert_serail", "unknown column"),
        (f"{HASH}\n", 1, HASH, "unknown column"),  # no header: the first row is read as one
        ("ek_public_sha256,Name\n", 1, "Name", "unknown column"),
        ("ek_public_sha256,name,name\n", 1, "name", "named twice"),
        ("ek_public_sha256,\n", 1, "", "is empty"),
        ("ek_cert_serial,name\n", 1, "ek_cert_serial", "needs column ek_cert_issuer"),
        ("ek_cert_issuer,ek_public_sha256\n", 1, "ek_cert_issuer", "needs column ek_cert_serial"),
        ("name,group\n", 1, "", "no identifier column"),
        # Identifiers.
        (HEADER + f"0a1b,,{HASH},,\n", 2, "ek_cert_issuer", "required with ek_cert_serial"),
        (HEADER + f'"{ISSUER}"\n', 2, "", "1 cell(s)"),  # one cell for five columns
        (HEADER + f',"{ISSUER}",{HASH},,\n', 2, "ek_cert_serial", "required with ek_cert_issuer"),
        (HEADER + ",,,named,edge\n", 2, "", "no identifier:"),
        (HEADER + f'0x,"{ISSUER}",,,\n', 2, "ek_cert_serial", "empty serial"),
        (HEADER + f'0g1b,"{ISSUER}",,,\n', 2, "ek_cert_serial", "not hex digits"),
        (HEADER + f'{"ab" * 41},"{ISSUER}",,,\n', 2, "ek_cert_serial", "longer than 40 bytes"),
        (
            HEADER + '0a1b,"CN=Example EK CA, O=Example, C=USA",,,\n',
            2,
            "ek_cert_issuer",
            "RFC 4514",
        ),
        (
            HEADER + '0a1b,"C = US, O = Example, CN = Example EK CA",,,\n',
            2,
            "ek_cert_issuer",
            "RFC 4514",
        ),
        (HEADER + ",,abc,,\n", 2, "ek_public_sha256", "not 64 hex"),
        (HEADER + f",,{HASH}00,,\n", 2, "ek_public_sha256", "not 64 hex"),
        (HEADER + f",,{HASH[:-1]}g,,\n", 2, "ek_public_sha256", "not 64 hex"),
        # name and group.
        (HEADER + f",,{HASH},bell\x07,\n", 2, "name", "non-printable"),
        (HEADER + f",,{HASH},\x1b[31mred,\n", 2, "name", "non-printable"),
        (HEADER + f',,{HASH},"two\nlines",\n', 2, "name", "non-printable"),
        (HEADER + f",,{HASH},{'n' * 129},\n", 2, "name", "longer than 128"),
        (HEADER + f",,{HASH},,-edge\n", 2, "group", "not a group name"),
        (HEADER + f",,{HASH},,edge group\n", 2, "group", "not a group name"),
        (HEADER + f",,{HASH},,{'g' * 65}\n", 2, "group", "not a group name"),
        (HEADER + f',"CN=a\x00b",{HASH},,\n', 2, "ek_cert_issuer", "non-printable"),
        # Cells and CSV syntax.
        (HEADER + f",,{HASH},{'n' * 1025},\n", 2, "name", "longer than 1024"),
        (HEADER + f",,{HASH},{'n' * 10},{'g' * 1025}\n", 2, "group", "longer than 1024"),
        (HEADER + f',,{HASH},"unterminated,\n', 2, "", "not valid CSV"),
        (HEADER + f',,{HASH},"quoted"trailing,\n', 2, "", "not valid CSV"),
    ],
)
def test_errors_name_line_and_column(text: str, line: int, column: str, message: str) -> None:
    err = _error(text)
    assert (err.line, err.column) == (line, column), str(err)
    assert message in str(err)


def test_valid_name_and_group_at_their_limits() -> None:
    (e,) = _parse(HEADER + f",,{HASH},{'n' * 128},{'g' * 64}\n")
    assert (len(e.name), len(e.group)) == (128, 64)
    (e,) = _parse(HEADER + f",,{HASH},Zoë's TPM #3 (rack A),a.b_c-1\n")
    assert e.name == "Zoë's TPM #3 (rack A)"


@pytest.mark.parametrize(
    ("rows", "column"),
    [
        (
            [
                '0A:1B,"CN=Example EK CA,O=Example,C=US",,',
                '0x0a1b,"CN=Example EK CA, O=Example, C=US",,',
            ],
            "ek_cert_serial",
        ),
        ([f",,{HASH},", f'0a1b,"{ISSUER}",{HASH.upper()},'], "ek_public_sha256"),
        ([f'0a1b,"{ISSUER}",{HASH},', f'00:0A:1B,"{ISSUER}",{HASH2},'], "ek_cert_serial"),
    ],
)
def test_duplicates_name_both_lines(rows: list[str], column: str) -> None:
    text = "ek_cert_serial,ek_cert_issuer,ek_public_sha256,name\n# first\n"
    text += rows[0] + "\n\n" + f",,{'cd' * 32},\n" + rows[1] + "\n"
    err = _error(text)
    assert (err.line, err.column) == (6, column)
    assert "line 3" in str(err) and str(err).startswith("line 6,")


def test_same_serial_from_different_issuers_is_not_a_duplicate() -> None:
    entries = _parse(
        f'ek_cert_serial,ek_cert_issuer\n0a1b,"{ISSUER}"\n0a1b,"CN=Other EK CA,O=Other,C=DE"\n'
    )
    assert len(entries) == 2


def test_oversize_file() -> None:
    data = b"ek_public_sha256\n" + b"#" * manifest.MAX_MANIFEST_BYTES
    err = _error(data)
    assert (err.line, err.column) == (0, "")
    assert "16777216 bytes" in str(err)


def test_too_many_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "MAX_MANIFEST_ROWS", 2)
    ok = f"ek_public_sha256\n# comments do not count\n{HASH}\n\n{HASH2}\n"
    assert len(_parse(ok)) == 2
    err = _error(ok + f"{'cd' * 32}\n")
    assert (err.line, err.column) == (6, "")


def test_a_cell_beyond_the_csv_field_limit_is_refused_and_the_limit_is_untouched() -> None:
    before = csv.field_size_limit()
    err = _error(HEADER + f",,{HASH},{'n' * (before + 1)},\n")
    assert err.line == 2
    assert csv.field_size_limit() == before


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (b"\xff\xfeek_public_sha256\n", 1),
        (b"ek_public_sha256,name\n" + HASH.encode() + b",caf\xe9\n", 2),  # Latin-1
        (b"\xef\xbb\xbfek_public_sha256,name\r\n\r\n" + HASH.encode() + b",\xc3\n", 3),
        (b"ek_public_sha256,name\r" + HASH.encode() + b",\xed\xa0\x80\r", 2),  # surrogate
    ],
)
def test_non_utf8_bytes(data: bytes, line: int) -> None:
    err = _error(data)
    assert (err.line, err.column) == (line, "")
    assert "not UTF-8" in str(err)


def test_a_bom_is_only_allowed_at_the_start() -> None:
    err = _error("ek_public_sha256,\ufeffname\n")
    assert (err.line, err.column) == (1, "\ufeffname")
