"""What a boot event log says about the boot, and the event semantics that betray tampering.

The PCRs authenticate only the *digests* of a TCG PC Client event log: each
event's type, PCR-independent data and the order of NO_ACTION records are
unsigned annotations that anyone holding the log can rewrite. So this module
trusts an event's data only where it can prove that the data is what was
measured (the event's digest is the hash of that data, per the measuring
agent's rule), and it reports as a ``Failure`` every pattern by which a
rewritten log could mislead a verifier (TCG PC Client Platform Firmware
Profile, "PFP": its PCR usage chapter and its event-log structures).

Three steps, meant to run after ``eventlog.replay`` agreed with a signed quote:

- ``check_events(log)``: per-event semantics (digest against data, retyped
  separators, stray event types in PCR 7, Secure Boot variables measured
  after the separator, a malformed SecureBoot variable).
- ``extract_state(log)``: the boot state (Secure Boot, PK/KEK/db/dbx,
  authorities that verified boot code, boot applications, boot-loader
  commands, kernel command lines, S-CRTM version).
- ``evaluate_rules(state, rules)``: the policy's event-log rules.

Pure: no I/O. Every parse of event data is bounded by the event's own length;
malformed structures this module must read raise ``MalformedError`` (field
``event_log``, offset = the event record's byte offset in the log).
"""

from __future__ import annotations

import hashlib
import re
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias

from cryptography import x509

from attestd.core.errors import MalformedError
from attestd.core.eventlog import BANK_ALGS, Event, EventLog, EventType
from attestd.core.policy import EventLogRules
from attestd.core.tpm import Alg, Bank, hash_bytes
from attestd.core.verdict import Code, Failure

FIELD = "event_log"

# UEFI spec: EFI_GLOBAL_VARIABLE ("Globally Defined Variables") and
# EFI_IMAGE_SECURITY_DATABASE_GUID (the db/dbx namespace).
EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")

# UEFI spec, "Signature Database" (EFI_SIGNATURE_LIST.SignatureType GUIDs).
EFI_CERT_X509 = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
EFI_CERT_SHA256 = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")
SIGNATURE_TYPES: dict[uuid.UUID, str] = {
    EFI_CERT_X509: "EFI_CERT_X509",
    EFI_CERT_SHA256: "EFI_CERT_SHA256",
    uuid.UUID("826ca512-cf10-4ac9-b187-be01496631bd"): "EFI_CERT_SHA1",
    uuid.UUID("0b6e5233-a65c-44c9-9407-d9ab83bfc8bd"): "EFI_CERT_SHA224",
    uuid.UUID("ff3e5307-9fd0-48c9-85f1-8ad56c701e01"): "EFI_CERT_SHA384",
    uuid.UUID("093e0fae-a6c4-4f50-9f1b-d41e2b89c19a"): "EFI_CERT_SHA512",
    uuid.UUID("3c5766e8-269c-4e34-aa14-ed776e85b3b6"): "EFI_CERT_RSA2048",
    uuid.UUID("e2b36190-879b-4a3d-ad8d-f2e7bba32784"): "EFI_CERT_RSA2048_SHA256",
    uuid.UUID("67f8444f-8743-48f1-a328-1eaab8736080"): "EFI_CERT_RSA2048_SHA1",
    uuid.UUID("3bd2a492-96c0-4079-b420-fcf98ef103ed"): "EFI_CERT_X509_SHA256",
    uuid.UUID("7076876e-80c2-4ee6-aad2-28b349a6865b"): "EFI_CERT_X509_SHA384",
    uuid.UUID("446dbf63-2502-4cda-bcfa-2465d2b0fe9d"): "EFI_CERT_X509_SHA512",
    uuid.UUID("4aafd29d-68df-49ee-8aa9-347d375665a7"): "EFI_CERT_TYPE_PKCS7",
}

# The GUIDs as UEFI stores them (EFI_GUID: UUID.bytes_le), compared as bytes.
_GLOBAL_VARIABLE = EFI_GLOBAL_VARIABLE.bytes_le
_IMAGE_SECURITY_DATABASE = EFI_IMAGE_SECURITY_DATABASE.bytes_le
_CERT_X509 = EFI_CERT_X509.bytes_le
_SIGNATURE_TYPE_NAMES = {guid.bytes_le: name for guid, name in SIGNATURE_TYPES.items()}

# PFP 1.06 adds two SPDM event types for PCR 7 that eventlog.EventType lacks.
EV_EFI_SPDM_DEVICE_POLICY = 0x800000E3
EV_EFI_SPDM_DEVICE_AUTHORITY = 0x800000E4

# PFP "PCR[7] - Secure Boot Policy Measurements": what may be measured into PCR 7.
# Checked against every shared real log (firmware from several vendors, shim,
# Windows Boot Manager): none measures anything else into PCR 7.
PCR7_TYPES = frozenset(
    {
        EventType.EV_EFI_VARIABLE_DRIVER_CONFIG,
        EventType.EV_SEPARATOR,
        EventType.EV_EFI_VARIABLE_AUTHORITY,
        EventType.EV_EFI_ACTION,  # "UEFI Debug Mode", "DMA Protection Disabled"
        EventType.EV_NO_ACTION,
        EventType.EV_EFI_SPDM_FIRMWARE_BLOB,
        EventType.EV_EFI_SPDM_FIRMWARE_CONFIG,
        EV_EFI_SPDM_DEVICE_POLICY,
        EV_EFI_SPDM_DEVICE_AUTHORITY,
    }
)

# PFP 10.4.1 EV_SEPARATOR: the event data of a PCR 0-7 separator is the
# 4-byte value measured: 00000000, or ffffffff. (00000001 signals a
# firmware error, after which the pre-OS measurements cannot be relied on.)
SEPARATOR_VALUES = (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff")
PRE_OS_PCRS = range(8)

# The PCR 7 variables whose value is the Secure Boot policy.
SECURE_BOOT_VARIABLES = frozenset({"SecureBoot", "PK", "KEK", "db", "dbx"})
_DATABASES = {
    "PK": _GLOBAL_VARIABLE,
    "KEK": _GLOBAL_VARIABLE,
    "db": _IMAGE_SECURITY_DATABASE,
    "dbx": _IMAGE_SECURITY_DATABASE,
}

# GRUB (grub-core/commands/tpm.c) logs "<prefix><string>" as EV_IPL in PCR 8
# but measures only <string>, without the prefix or the terminating NUL (so
# do all GRUB strings in the shared real logs).
GRUB_COMMAND = b"grub_cmd: "
GRUB_KERNEL_CMDLINE = b"kernel_cmdline: "
GRUB_PCR = 8
# systemd-boot/systemd-stub measure the UTF-16 kernel command line into PCR 12
# (older systemd-boot: PCR 8; the Linux EFI stub's tagged events: PCR 9).
SYSTEMD_CMDLINE_PCRS = frozenset({9, 12})
# Linux / systemd LOAD_OPTIONS_EVENT_TAG_ID for a TCG_PCClientTaggedEvent.
LOAD_OPTIONS_EVENT_TAG_ID = 0x8F3B22ED

# VariableName GUID, UnicodeNameLength, VariableDataLength
_VARIABLE_HEADER = struct.Struct("<16sQQ")
# SignatureType, SignatureListSize, SignatureHeaderSize, SignatureSize
_SIGNATURE_LIST_HEADER = struct.Struct("<16sIII")
_IMAGE_LOAD_HEADER = struct.Struct("<QQQQ")  # Location, Length, LinkTimeAddress, LengthOfDevicePath
_TAGGED_EVENT_HEADER = struct.Struct("<II")  # taggedEventID, taggedEventDataSize
_DEVICE_PATH_NODE = struct.Struct("<BBH")  # Type, SubType, Length

# The event types the per-event loops dispatch on, as plain ints: on Python 3.11
# each EventType attribute lookup is a Python-level descriptor call.
_EV_NO_ACTION = int(EventType.EV_NO_ACTION)
_EV_SEPARATOR = int(EventType.EV_SEPARATOR)
_EV_ACTION = int(EventType.EV_EFI_ACTION)
_EV_IPL = int(EventType.EV_IPL)
_EV_EVENT_TAG = int(EventType.EV_EVENT_TAG)
_EV_S_CRTM_VERSION = int(EventType.EV_S_CRTM_VERSION)
_EV_VARIABLE_DRIVER_CONFIG = int(EventType.EV_EFI_VARIABLE_DRIVER_CONFIG)
_EV_VARIABLE_AUTHORITY = int(EventType.EV_EFI_VARIABLE_AUTHORITY)
_EV_BOOT_SERVICES_APPLICATION = int(EventType.EV_EFI_BOOT_SERVICES_APPLICATION)
_EV_FIRMWARE_BLOBS = frozenset(
    {int(EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB), int(EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB2)}
)
_SYSTEMD_CMDLINE_TYPES = frozenset({_EV_IPL, _EV_EVENT_TAG})

_set_field = object.__setattr__  # sets a field of a frozen dataclass in its own __init__

# The certificates one extract_state call has read: DER -> (subject, fingerprint).
_ReadCertificates: TypeAlias = dict[bytes, tuple[str | None, str]]


# --- the boot state ------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """An X.509 certificate found in a signature database or an authority event."""

    owner: str | None  # EFI_SIGNATURE_DATA.SignatureOwner; None when measured as bare DER
    subject: str | None  # RFC 4514; None when the DER does not parse as a certificate
    fingerprint: str  # SHA-256 of the DER, hex

    def to_json(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "subject": self.subject,
            "fingerprint_sha256": self.fingerprint,
        }


@dataclass(frozen=True)
class SignatureHash:
    """A non-certificate EFI_SIGNATURE_DATA entry (a hash, usually EFI_CERT_SHA256)."""

    owner: str
    type: str  # "EFI_CERT_SHA256", …; the SignatureType GUID when unknown
    hash: str  # hex of SignatureData

    def __init__(self, owner: str, type: str, hash: str) -> None:
        # As eventlog.Event: the dataclass's frozen __init__ costs more than reading
        # the entry, and a dbx holds hundreds.
        _set_field(self, "owner", owner)
        _set_field(self, "type", type)
        _set_field(self, "hash", hash)

    def to_json(self) -> dict[str, Any]:
        return {"owner": self.owner, "type": self.type, "hash": self.hash}


@dataclass(frozen=True)
class SignatureDatabase:
    """The content of PK, KEK, db or dbx as measured: EFI_SIGNATURE_LISTs."""

    certificates: tuple[Certificate, ...]
    hashes: tuple[SignatureHash, ...]

    def sha256_hashes(self) -> frozenset[bytes]:
        return frozenset(bytes.fromhex(h.hash) for h in self.hashes if h.type == "EFI_CERT_SHA256")

    def to_json(self) -> dict[str, Any]:
        return {
            "certificates": [c.to_json() for c in self.certificates],
            "hashes": [h.to_json() for h in self.hashes],
        }


@dataclass(frozen=True)
class Authority:
    """An EV_EFI_VARIABLE_AUTHORITY event in PCR 7: what verified a piece of boot code.

    Firmware measures the db entry (EFI_SIGNATURE_DATA: owner GUID + DER) that
    verified an image; shim measures its own vendor certificate as bare DER, and
    also SbatLevel / MokListTrusted values, which are not certificates
    (``certificate`` None, the value in ``data``).
    """

    event: int
    variable: str  # the UEFI_VARIABLE_DATA name: "db", "Shim", "MokList", "SbatLevel", …
    after_separator: bool  # False: verified an option ROM / driver before PCR 7's separator
    verified: bool  # the event's digests are the hash of its data
    certificate: Certificate | None
    data: str  # hex of VariableData when it is not a certificate, else ""

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "variable": self.variable,
            "after_separator": self.after_separator,
            "digest_verified": self.verified,
            "certificate": self.certificate.to_json() if self.certificate else None,
            "data": self.data,
        }


@dataclass(frozen=True)
class BootApplication:
    """An EV_EFI_BOOT_SERVICES_APPLICATION in PCR 4 (PE/COFF Authenticode digest)."""

    event: int
    digest_alg: str  # "sha256" when the log has that bank, else "sha1" (or another bank)
    digest: str  # hex
    path: str  # the device path's file path (or FvFile(GUID)); hex when not decodable

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "digest_alg": self.digest_alg,
            "digest": self.digest,
            "path": self.path,
        }


@dataclass(frozen=True)
class KernelCmdline:
    """A kernel command line the boot loader measured.

    ``verified`` says the event's digests are the hash of ``text`` as that boot
    loader measures it; when False, the text in the log is not proven to be what
    was measured (arch-linux's systemd-boot logged a truncated copy) and the
    policy's command-line rules fail it.
    """

    event: int
    pcr: int
    text: str
    verified: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "pcr": self.pcr,
            "text": self.text,
            "digest_verified": self.verified,
        }


@dataclass(frozen=True)
class BootState:
    """The boot as the event log tells it. Fields are in log order."""

    secure_boot: bool | None  # None: not measured, malformed, or not verifiable
    pk: SignatureDatabase | None  # None: not measured (or its digest does not match)
    kek: SignatureDatabase | None
    db: SignatureDatabase | None
    dbx: SignatureDatabase | None
    authorities: tuple[Authority, ...]
    boot_applications: tuple[BootApplication, ...]
    boot_loader_commands: tuple[str, ...]  # GRUB's "grub_cmd: …" strings, prefix removed
    kernel_cmdlines: tuple[KernelCmdline, ...]
    scrtm_version: str | None
    firmware_blobs: int  # EV_EFI_PLATFORM_FIRMWARE_BLOB(2) events

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict with stable snake_case keys (``attestd eventlog state --json``)."""

        def db(d: SignatureDatabase | None) -> dict[str, Any] | None:
            return None if d is None else d.to_json()

        return {
            "secure_boot": self.secure_boot,
            "pk": db(self.pk),
            "kek": db(self.kek),
            "db": db(self.db),
            "dbx": db(self.dbx),
            "authorities": [a.to_json() for a in self.authorities],
            "boot_applications": [a.to_json() for a in self.boot_applications],
            "boot_loader_commands": list(self.boot_loader_commands),
            "kernel_cmdlines": [c.to_json() for c in self.kernel_cmdlines],
            "scrtm_version": self.scrtm_version,
            "firmware_blobs": self.firmware_blobs,
        }


def extract_state(log: EventLog) -> BootState:
    """The boot state the log shows.

    Only data proven measured is believed: a PCR 7 variable whose digest is not
    the hash of its UEFI_VARIABLE_DATA is ignored (so an edited SecureBoot byte
    yields ``secure_boot=None``, never True), and command lines and authorities
    carry a ``verified`` flag. The state is worth as much as the log's replay
    against a signed quote; ``check_events`` reports the tampering patterns.

    Raises ``MalformedError`` for a PCR 7 variable or signature list that does
    not parse within its bounds.
    """
    separator = _pcr7_separator_index(log)
    secure_boot_values: list[bytes] = []
    databases: dict[str, SignatureDatabase] = {}
    authorities: list[Authority] = []
    applications: list[BootApplication] = []
    commands: list[str] = []
    cmdlines: list[KernelCmdline] = []
    scrtm: str | None = None
    blobs = 0
    parsed: _ReadCertificates = {}  # authorities repeat db entries

    for index, e in enumerate(log.events):
        after_separator = separator is not None and index > separator
        pcr, etype = e.pcr, e.type
        if pcr == 7 and etype == _EV_VARIABLE_DRIVER_CONFIG:
            # PFP (PCR[7]): the policy is what was measured before the separator;
            # later measurements are reported by check_events, not believed here.
            if after_separator or not _digest_matches(e, e.data):
                continue
            var = _parse_variable(e, strict=True)
            if var.guid == _GLOBAL_VARIABLE and var.name == "SecureBoot":
                secure_boot_values.append(var.data)
            elif _DATABASES.get(var.name) == var.guid and var.name not in databases:
                databases[var.name] = _parse_signature_lists(e, var.data, parsed)
        elif pcr == 7 and etype == _EV_VARIABLE_AUTHORITY:
            authorities.append(_authority(e, after_separator, parsed))
        elif pcr == 4 and etype == _EV_BOOT_SERVICES_APPLICATION:
            applications.append(_boot_application(e))
        elif pcr == GRUB_PCR and etype == _EV_IPL:
            if e.data.startswith(GRUB_COMMAND):
                commands.append(_grub_string(e, GRUB_COMMAND)[0])
            elif e.data.startswith(GRUB_KERNEL_CMDLINE):
                text, verified = _grub_string(e, GRUB_KERNEL_CMDLINE)
                cmdlines.append(KernelCmdline(e.number, pcr, text, verified))
            elif (utf16 := _utf16_text(e.data)) is not None:
                # systemd-boot before v251 measured the UTF-16 command line into PCR 8.
                cmdlines.append(KernelCmdline(e.number, pcr, utf16, _digest_matches(e, e.data)))
        elif pcr in SYSTEMD_CMDLINE_PCRS and etype in _SYSTEMD_CMDLINE_TYPES:
            cmdline = _systemd_cmdline(e)
            if cmdline is not None:
                cmdlines.append(cmdline)
        elif etype == _EV_S_CRTM_VERSION and scrtm is None:
            scrtm = _scrtm_version(e.data)
        elif etype in _EV_FIRMWARE_BLOBS:
            blobs += 1

    return BootState(
        secure_boot=_secure_boot(secure_boot_values),
        pk=databases.get("PK"),
        kek=databases.get("KEK"),
        db=databases.get("db"),
        dbx=databases.get("dbx"),
        authorities=tuple(authorities),
        boot_applications=tuple(applications),
        boot_loader_commands=tuple(commands),
        kernel_cmdlines=tuple(cmdlines),
        scrtm_version=scrtm,
        firmware_blobs=blobs,
    )


def _pcr7_separator_index(log: EventLog) -> int | None:
    for index, e in enumerate(log.events):
        if e.pcr == 7 and e.type == _EV_SEPARATOR:
            return index
    return None


def _secure_boot(values: list[bytes]) -> bool | None:
    """The SecureBoot variable (UEFI 3.3): 1 enabled, 0 disabled.

    PFP (PCR[7] measurements): a variable that does not exist is measured with
    VariableDataLength 0 — Secure Boot is then not enabled. Any other length or
    value, or two measurements that disagree, leave the state unknown.
    """
    if not values or any(len(v) > 1 or (v and v[0] not in (0, 1)) for v in values):
        return None
    if len(set(values)) != 1:
        return None
    return values[0] == b"\x01"


# --- event data structures ------------------------------------------------------


def _fail(e: Event, message: str) -> MalformedError:
    return MalformedError(
        f"event {e.number} (PCR {e.pcr} {e.type_name}): {message}", field=FIELD, offset=e.offset
    )


class _Variable(NamedTuple):
    guid: bytes  # VariableName, as stored (UUID.bytes_le)
    name: str
    data: bytes


def _parse_variable(e: Event, *, strict: bool) -> _Variable:
    """PFP UEFI_VARIABLE_DATA: VariableName GUID, two UINT64 lengths, UnicodeName, VariableData.

    ``strict`` refuses bytes after VariableData. EV_EFI_VARIABLE_AUTHORITY
    events are parsed leniently: shim before rhboot/shim commit 8a27a48 logged
    extra bytes after its vendor certificate (go-attestation issue 157).
    """
    data = e.data
    if len(data) < _VARIABLE_HEADER.size:
        raise _fail(e, f"UEFI_VARIABLE_DATA needs {_VARIABLE_HEADER.size} bytes, has {len(data)}")
    guid, name_length, data_length = _VARIABLE_HEADER.unpack_from(data)
    remaining = len(data) - _VARIABLE_HEADER.size
    if name_length > remaining // 2:
        raise _fail(e, f"UnicodeNameLength {name_length} overruns the event data")
    name_end = _VARIABLE_HEADER.size + 2 * name_length
    if data_length > len(data) - name_end:
        raise _fail(e, f"VariableDataLength {data_length} overruns the event data")
    end = name_end + data_length
    if strict and end != len(data):
        raise _fail(e, f"{len(data) - end} bytes after UEFI_VARIABLE_DATA")
    try:
        name = data[_VARIABLE_HEADER.size : name_end].decode("utf-16-le")
    except UnicodeDecodeError:
        raise _fail(e, "UnicodeName is not UTF-16") from None
    return _Variable(guid, name.rstrip("\0"), data[name_end:end])


def _parse_signature_lists(e: Event, data: bytes, parsed: _ReadCertificates) -> SignatureDatabase:
    """A signature database: EFI_SIGNATURE_LIST records back to back (UEFI "Signature Database").

    Each list: SignatureType, SignatureListSize, SignatureHeaderSize, SignatureSize,
    a header, then EFI_SIGNATURE_DATA entries (SignatureOwner GUID + SignatureData).
    """
    certificates: list[Certificate] = []
    hashes: list[SignatureHash] = []
    owners: dict[bytes, str] = {}  # a dbx holds hundreds of entries from a few owners
    pos = 0
    while pos < len(data):
        if len(data) - pos < _SIGNATURE_LIST_HEADER.size:
            raise _fail(e, f"truncated EFI_SIGNATURE_LIST header at +{pos}")
        raw_type, list_size, header_size, signature_size = _SIGNATURE_LIST_HEADER.unpack_from(
            data, pos
        )
        if list_size > len(data) - pos:
            raise _fail(e, f"SignatureListSize {list_size} overruns the variable at +{pos}")
        body = list_size - _SIGNATURE_LIST_HEADER.size - header_size
        if body < 0:
            raise _fail(e, f"SignatureHeaderSize {header_size} overruns its list at +{pos}")
        if signature_size < 16 or body % signature_size:
            raise _fail(
                e, f"SignatureSize {signature_size} does not divide the list body at +{pos}"
            )
        type_name = _SIGNATURE_TYPE_NAMES.get(raw_type) or _guid_text(raw_type)
        is_x509 = raw_type == _CERT_X509
        start = pos + _SIGNATURE_LIST_HEADER.size + header_size
        for entry in range(start, start + body, signature_size):
            raw_owner = data[entry : entry + 16]
            owner = owners.get(raw_owner)
            if owner is None:
                owner = owners[raw_owner] = _guid_text(raw_owner)
            value = data[entry + 16 : entry + signature_size]
            if is_x509:
                certificates.append(_certificate(value, owner, parsed))
            else:
                hashes.append(SignatureHash(owner, type_name, value.hex()))
        pos += list_size
    return SignatureDatabase(tuple(certificates), tuple(hashes))


def _guid_text(raw: bytes) -> str:
    """The registry-format string of a 16-byte EFI_GUID, as ``str(uuid.UUID(bytes_le=raw))``."""
    h = (raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:16]).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _certificate(der: bytes, owner: str | None, parsed: _ReadCertificates) -> Certificate:
    known = parsed.get(der)
    if known is None:
        subject: str | None
        try:
            subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        except Exception:  # hostile DER: cryptography raises several types; the fingerprint stands
            subject = None
        known = parsed[der] = (subject, hashlib.sha256(der).hexdigest())
    return Certificate(owner, *known)


def _der_length(data: bytes) -> int | None:
    """The total length of the DER SEQUENCE starting ``data``, or None."""
    if len(data) < 2 or data[0] != 0x30:
        return None
    first = data[1]
    if first < 0x80:
        return 2 + first
    count = first - 0x80
    if not 1 <= count <= 3 or len(data) < 2 + count:
        return None
    return 2 + count + int.from_bytes(data[2 : 2 + count], "big")


def _authority(e: Event, after_separator: bool, parsed: _ReadCertificates) -> Authority:
    # The old-shim quirk (see _parse_variable) also left the last byte out of the digest.
    verified = _digest_matches(e, e.data) or (len(e.data) > 0 and _digest_matches(e, e.data[:-1]))
    try:
        var = _parse_variable(e, strict=False)
    except MalformedError:
        if verified:
            raise
        # Not what was measured, and not even well-formed: kept, unbelieved, as hex.
        return Authority(e.number, "", after_separator, False, None, e.data.hex())
    value = var.data
    certificate = None
    if _der_length(value) == len(value):  # shim: bare DER
        certificate = _certificate(value, None, parsed)
    elif len(value) > 16 and _der_length(value[16:]) == len(value) - 16:  # EFI_SIGNATURE_DATA
        certificate = _certificate(value[16:], _guid_text(value[:16]), parsed)
    return Authority(
        event=e.number,
        variable=var.name,
        after_separator=after_separator,
        verified=verified,
        certificate=certificate,
        data="" if certificate else value.hex(),
    )


def _boot_application(e: Event) -> BootApplication:
    """PFP UEFI_IMAGE_LOAD_EVENT; the digest is the image's PE/COFF Authenticode hash."""
    alg = _preferred_alg(e)
    digest = e.digests[alg].hex() if alg is not None else ""
    return BootApplication(e.number, _alg_label(alg), digest, _image_path(e.data))


_PREFERRED_ALGS = tuple(alg.value for alg in (Alg.SHA256, Alg.SHA1, Alg.SHA384, Alg.SHA512))
_BANK_NAMES = {bank.alg.value: bank.value for bank in Bank}


def _preferred_alg(e: Event) -> int | None:
    for alg in _PREFERRED_ALGS:
        if alg in e.digests:
            return alg
    return next(iter(e.digests), None)


def _alg_label(alg: int | None) -> str:
    if alg is None:
        return ""
    name = _BANK_NAMES.get(alg)
    return name if name is not None else f"0x{alg:04x}"


def _image_path(data: bytes) -> str:
    """The file path of a UEFI_IMAGE_LOAD_EVENT's device path, else the path's hex.

    Display only: the path is not part of what PCR 4 measures. Some loaders log
    LengthOfDevicePath 0 and bytes after the header anyway; those are shown as hex.
    """
    if len(data) < _IMAGE_LOAD_HEADER.size:
        return data.hex()
    length = _IMAGE_LOAD_HEADER.unpack_from(data)[3]
    rest = data[_IMAGE_LOAD_HEADER.size :]
    path = rest[:length] if 0 < length <= len(rest) else rest
    return _device_path_text(path) or path.hex()


def _device_path_text(path: bytes) -> str | None:
    """File Path media nodes (UEFI "Device Path Protocol": type 4 subtype 4), joined.

    Without one, a PIWG firmware-volume file node (type 4 subtype 6) names the image.
    """
    parts: list[str] = []
    firmware_file: str | None = None
    pos = 0
    while pos + _DEVICE_PATH_NODE.size <= len(path):
        node_type, subtype, length = _DEVICE_PATH_NODE.unpack_from(path, pos)
        if length < _DEVICE_PATH_NODE.size or pos + length > len(path):
            return None
        body = path[pos + _DEVICE_PATH_NODE.size : pos + length]
        if node_type == 0x7F and subtype == 0xFF:  # End of Hardware Device Path
            break
        if node_type == 0x04 and subtype == 0x04:  # Media / File Path
            try:
                parts.append(body.decode("utf-16-le").rstrip("\0"))
            except UnicodeDecodeError:
                return None
        elif node_type == 0x04 and subtype == 0x06 and len(body) == 16:  # PIWG FV file
            firmware_file = f"FvFile({_guid_text(body)})"
        pos += length
    if parts:
        joined = parts[0]
        for part in parts[1:]:
            sep = "" if joined.endswith("\\") or part.startswith("\\") else "\\"
            joined += sep + part
        return joined
    return firmware_file


def _grub_string(e: Event, prefix: bytes) -> tuple[str, bool]:
    """A GRUB PCR 8 string without its prefix; verified when the digest is its hash.

    Upstream GRUB hashes the string alone; a hash of prefix + string binds the
    text just as well, so it is accepted too (some GRUB builds and simulators).
    """
    raw = e.data[len(prefix) :]
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    verified = b"\0" not in raw and (_digest_matches(e, raw) or _digest_matches(e, prefix + raw))
    return raw.decode("utf-8", "backslashreplace"), verified


def _systemd_cmdline(e: Event) -> KernelCmdline | None:
    """A UTF-16 command line measured by systemd-boot/-stub or Linux into PCR 9/12.

    systemd measures the very string it logs, so the digest must equal the hash
    of the logged bytes; other UTF-16 descriptions in these PCRs (systemd-stub's
    credential and system-extension initrds) describe a different payload and
    are not command lines.
    """
    payload = e.data
    if e.type == _EV_EVENT_TAG:
        # PFP TCG_PCClientTaggedEvent: taggedEventID, taggedEventDataSize, taggedEventData.
        if len(payload) < _TAGGED_EVENT_HEADER.size:
            return None
        tag, size = _TAGGED_EVENT_HEADER.unpack_from(payload)
        payload = payload[_TAGGED_EVENT_HEADER.size :]
        if tag != LOAD_OPTIONS_EVENT_TAG_ID or size != len(payload):
            return None
    text = _utf16_text(payload)
    if text is None or not _digest_matches(e, payload):
        return None
    return KernelCmdline(e.number, e.pcr, text, True)


def _utf16_text(data: bytes) -> str | None:
    """Printable-ASCII text in UTF-16LE, terminating NULs removed; None otherwise.

    Requiring ASCII keeps ASCII strings (GRUB's paths in PCR 9, even in length)
    from being read as UTF-16. An odd trailing NUL byte is tolerated: systemd-boot
    on event-arch-linux.bin logged the command line one byte short.
    """
    if len(data) % 2:
        if data[-1] != 0:
            return None
        data = data[:-1]
    try:
        text = data.decode("utf-16-le").rstrip("\0")
    except UnicodeDecodeError:
        return None
    if not text or any(not (0x20 <= ord(c) < 0x7F or c in "\t\n") for c in text):
        return None
    return text


def _scrtm_version(data: bytes) -> str:
    """EV_S_CRTM_VERSION data (PFP 10.4.1): UTF-16LE, or ASCII, else hex (some log a GUID)."""
    if data and not data.strip(b"\0"):
        return ""  # an empty UTF-16 string
    text = _utf16_text(data)
    if text is not None:
        return text
    ascii_text = data.rstrip(b"\0")
    if ascii_text and all(0x20 <= b < 0x7F for b in ascii_text):
        return ascii_text.decode("ascii")
    return data.hex()


# --- digests -------------------------------------------------------------------


def _digest_matches(e: Event, data: bytes) -> bool:
    """Every digest of ``e`` that attestd can compute is H(data); at least one is.

    Banks without a hash attestd knows (e.g. SM3) are carried, not checked. The
    hashes of the event's own data are computed once per event (``Event.data_hashes``).
    """
    hashes = e.data_hashes if data == e.data else None
    checked = False
    for alg, digest in e.digests.items():
        if alg not in BANK_ALGS:
            continue
        expected = hash_bytes(alg, data) if hashes is None else hashes[alg]
        if expected != digest:
            return False
        checked = True
    return checked


# (TPM_ALG_ID, digest) of the PCR 0-7 separator values in each bank.
_SEPARATOR_DIGESTS = frozenset(
    (alg, hash_bytes(alg, value)) for alg in BANK_ALGS for value in SEPARATOR_VALUES
)


# --- event semantics ------------------------------------------------------------


def _subject(e: Event) -> str:
    return f"event[{e.number}] pcr {e.pcr} {e.type_name}"


def _digest_failures(e: Event, what: str) -> list[Failure]:
    """EVENT_DIGEST_MISMATCH for each digest of ``e`` that is not the hash of its data."""
    out = []
    hashes = e.data_hashes
    for alg, digest in e.digests.items():
        expected = hashes.get(alg)
        if expected is None or expected == digest:
            continue
        out.append(
            Failure(
                Code.EVENT_DIGEST_MISMATCH,
                _subject(e),
                expected.hex(),
                digest.hex(),
                f"the {_alg_label(alg)} digest is not the hash of {what}: the data in the log "
                "is not what was measured (edited after boot)",
            )
        )
    return out


def check_events(log: EventLog) -> list[Failure]:
    """Per-event semantics that a rewritten log breaks (fail closed).

    - EVENT_DIGEST_MISMATCH: for EV_SEPARATOR, EV_EFI_VARIABLE_DRIVER_CONFIG
      (the whole UEFI_VARIABLE_DATA), EV_EFI_ACTION (the ASCII string) and
      EV_S_CRTM_VERSION, each bank's digest must be the hash of the event data;
      a PCR 0-7 separator's data must be 00000000 or ffffffff (PFP 10.4.1).
      EV_IPL is not checked: real firmware and boot loaders log descriptions
      that differ from what they hash (event-arch-linux.bin event 24).
    - EVENT_RETYPED: the event's unsigned type was rewritten. Seen as a PCR 0-7
      event whose digest is a separator's digest but whose type is not
      EV_SEPARATOR (a hidden separator); an EV_EFI_ACTION whose data is not an
      ASCII string (e.g. an EV_EFI_VARIABLE_AUTHORITY relabelled to hide the
      certificate it names: both types hash their whole data); a second
      pre-separator measurement of a Secure Boot variable in PCR 7 (the same
      trick with EV_EFI_VARIABLE_DRIVER_CONFIG: firmware measures each once).
    - EVENT_TYPE_UNEXPECTED: PCR 7 holds only the types its PFP chapter lists.
    - SEPARATOR_REPEATED: one EV_SEPARATOR per PCR 0-7 (the pre-OS/OS boundary).
    - SECURE_BOOT_VARIABLE_AFTER_SEPARATOR: any EV_EFI_VARIABLE_DRIVER_CONFIG
      in PCR 7 after its separator (the policy, SecureBoot/PK/KEK/db/dbx above
      all, is fixed before it; a later one may also be a relabelled authority).
    - SECURE_BOOT_VARIABLE_MALFORMED: SecureBoot data other than one byte 0/1
      (length 0 is the measurement of an absent variable, per the PFP).

    Raises ``MalformedError`` for a PCR 7 EV_EFI_VARIABLE_DRIVER_CONFIG whose
    UEFI_VARIABLE_DATA does not parse.
    """
    failures: list[Failure] = []
    separators: dict[int, Event] = {}
    policy_variables: dict[tuple[bytes, str], Event] = {}
    for e in log.events:
        etype = e.type
        if etype == _EV_NO_ACTION:
            continue  # not extended (PFP 10.4.5); replay ignores them too
        if e.pcr in PRE_OS_PCRS and etype != _EV_SEPARATOR and _is_separator_digest(e):
            failures.append(
                Failure(
                    Code.EVENT_RETYPED,
                    _subject(e),
                    "EV_SEPARATOR",
                    e.type_name,
                    "the event's digest is the separator's (hash of 00000000 or ffffffff) but "
                    "its type is not: the unsigned type field was rewritten, hiding a separator",
                )
            )
            continue  # its type is a lie: the type's own checks would only repeat this
        if etype == _EV_SEPARATOR:
            failures.extend(_check_separator(e, separators))
        elif etype == _EV_VARIABLE_DRIVER_CONFIG:
            failures.extend(_digest_failures(e, "its UEFI_VARIABLE_DATA"))
        elif etype == _EV_ACTION:
            failures.extend(_check_action(e))
        elif etype == _EV_S_CRTM_VERSION:
            failures.extend(_digest_failures(e, "its version data"))
        if e.pcr == 7:
            failures.extend(_check_pcr7(e, 7 in separators, policy_variables))
    return failures


def _check_action(e: Event) -> list[Failure]:
    """EV_EFI_ACTION: an ASCII string (PFP 10.4.1), hashed as it stands."""
    text = e.data.rstrip(b"\0")  # PFP strings carry no NUL; some firmware logs one unhashed
    if not text or not all(0x20 <= b < 0x7F for b in text):
        return [
            Failure(
                Code.EVENT_RETYPED,
                _subject(e),
                "an ASCII action string",
                e.data[:32].hex() + ("…" if len(e.data) > 32 else ""),
                "EV_EFI_ACTION data is a short ASCII string; binary data here is another "
                "event (an authority, a variable) whose unsigned type was rewritten",
            )
        ]
    if _digest_matches(e, text):
        return []
    return _digest_failures(e, "its action string")


def _is_separator_digest(e: Event) -> bool:
    return not _SEPARATOR_DIGESTS.isdisjoint(e.digests.items())


def _check_separator(e: Event, separators: dict[int, Event]) -> list[Failure]:
    out: list[Failure] = []
    if e.pcr in PRE_OS_PCRS:
        first = separators.get(e.pcr)
        if first is not None:
            out.append(
                Failure(
                    Code.SEPARATOR_REPEATED,
                    _subject(e),
                    f"one EV_SEPARATOR in PCR {e.pcr}",
                    f"another after event[{first.number}]",
                    "a second separator lets measurements after the first pass as pre-OS ones",
                )
            )
        else:
            separators[e.pcr] = e
        if e.data not in SEPARATOR_VALUES:
            out.append(
                Failure(
                    Code.EVENT_DIGEST_MISMATCH,
                    _subject(e),
                    "data 00000000 or ffffffff",
                    e.data.hex(),
                    "a PCR 0-7 separator measures 00000000 (or ffffffff); 00000001 means the "
                    "firmware reported an error, anything else is not a separator",
                )
            )
    out.extend(_digest_failures(e, "its separator value"))
    return out


def _check_pcr7(
    e: Event,
    after_separator: bool,
    policy_variables: dict[tuple[bytes, str], Event],
) -> list[Failure]:
    if e.type not in PCR7_TYPES:
        allowed = ", ".join(_type_label(t) for t in sorted(PCR7_TYPES))
        return [
            Failure(
                Code.EVENT_TYPE_UNEXPECTED,
                _subject(e),
                f"one of {allowed}",
                e.type_name,
                "PCR 7 holds only the Secure Boot policy and the authorities used under it",
            )
        ]
    if e.type != _EV_VARIABLE_DRIVER_CONFIG:
        return []
    try:
        var = _parse_variable(e, strict=True)
    except MalformedError:
        if not _digest_matches(e, e.data):
            return []  # fiction, already reported as EVENT_DIGEST_MISMATCH
        raise  # measured as it stands: the firmware's structure is malformed
    out: list[Failure] = []
    if after_separator:
        out.append(
            Failure(
                Code.SECURE_BOOT_VARIABLE_AFTER_SEPARATOR,
                _subject(e),
                "measured before PCR 7's EV_SEPARATOR",
                f"{var.name or 'a variable'} after it",
                "the Secure Boot policy is fixed before the separator; a later measurement "
                "means the policy changed after firmware handed over, or the log lies "
                "(an EV_EFI_VARIABLE_AUTHORITY relabelled as configuration looks like this)"
                if var.name in SECURE_BOOT_VARIABLES
                else "PCR 7 configuration is measured before the separator; after it, this is "
                "most likely an EV_EFI_VARIABLE_AUTHORITY relabelled to hide the certificate",
            )
        )
    elif var.name in SECURE_BOOT_VARIABLES:
        first = policy_variables.setdefault((var.guid, var.name), e)
        if first is not e:
            out.append(
                Failure(
                    Code.EVENT_RETYPED,
                    _subject(e),
                    f"one measurement of {var.name}",
                    f"another after event[{first.number}]",
                    "firmware measures each Secure Boot variable once; a second one is "
                    "another event (an EV_EFI_VARIABLE_AUTHORITY) whose type was rewritten",
                )
            )
    if (
        var.guid == _GLOBAL_VARIABLE
        and var.name == "SecureBoot"
        and (len(var.data) > 1 or (var.data and var.data[0] not in (0, 1)))
    ):
        out.append(
            Failure(
                Code.SECURE_BOOT_VARIABLE_MALFORMED,
                _subject(e),
                "one byte, 00 or 01",
                var.data[:16].hex() + ("…" if len(var.data) > 16 else ""),
                f"SecureBoot holds {len(var.data)} bytes; the variable is a single UINT8",
            )
        )
    return out


def _type_label(event_type: int) -> str:
    if event_type == EV_EFI_SPDM_DEVICE_POLICY:
        return "EV_EFI_SPDM_DEVICE_POLICY"
    if event_type == EV_EFI_SPDM_DEVICE_AUTHORITY:
        return "EV_EFI_SPDM_DEVICE_AUTHORITY"
    return EventType(event_type).name


# --- the policy's event-log rules -----------------------------------------------


def evaluate_rules(state: BootState, rules: EventLogRules) -> list[Failure]:
    """The policy's ``eventlog:`` rules against the boot state. Empty rules impose nothing."""
    failures: list[Failure] = []
    if rules.require_secure_boot and state.secure_boot is not True:
        got = {False: "disabled", None: "unknown"}[state.secure_boot]
        failures.append(
            Failure(
                Code.SECURE_BOOT_DISABLED,
                "secure_boot",
                "enabled",
                got,
                "the policy requires Secure Boot; the log's PCR 7 SecureBoot variable "
                + (
                    "is 0 or absent"
                    if state.secure_boot is False
                    else "is missing, malformed, or does not match its digest"
                ),
            )
        )
    if rules.boot_applications:
        failures.extend(_check_applications(state.boot_applications, rules.boot_applications))
    if rules.kernel_cmdline_exact or rules.kernel_cmdline_regex:
        failures.extend(_check_cmdlines(state.kernel_cmdlines, rules))
    if rules.dbx_contains:
        failures.extend(_check_dbx(state.dbx, rules.dbx_contains))
    if rules.forbidden_authorities:
        failures.extend(_check_authorities(state.authorities, rules.forbidden_authorities))
    return failures


def _check_applications(
    applications: Iterable[BootApplication], allowed: frozenset[bytes]
) -> list[Failure]:
    out = []
    for i, app in enumerate(applications):
        if app.digest_alg == "sha256" and bytes.fromhex(app.digest) in allowed:
            continue
        if app.digest_alg == "sha256":
            detail = (
                f"event[{app.event}] loaded {app.path or 'an image'}; if it is approved, add its "
                "Authenticode SHA-256 to the policy's eventlog.boot_applications"
            )
        else:
            detail = (
                f"event[{app.event}] ({app.path or 'an image'}) has no SHA-256 digest in the log, "
                "so it cannot be matched against eventlog.boot_applications"
            )
        out.append(
            Failure(
                Code.BOOT_APPLICATION_NOT_ALLOWED,
                f"boot_application[{i}]",
                "a SHA-256 digest listed in eventlog.boot_applications",
                f"{app.digest_alg}:{app.digest}",
                detail,
            )
        )
    return out


def _check_cmdlines(cmdlines: tuple[KernelCmdline, ...], rules: EventLogRules) -> list[Failure]:
    expected = _cmdline_expectation(rules)
    if not cmdlines:
        return [
            Failure(
                Code.KERNEL_CMDLINE_NOT_ALLOWED,
                "kernel_cmdline",
                expected,
                "none",
                "the policy constrains the kernel command line but the log holds none (GRUB's "
                "'kernel_cmdline:' in PCR 8, or systemd's UTF-16 command line in PCR 8/9/12)",
            )
        ]
    out = []
    for i, cmdline in enumerate(cmdlines):
        if not cmdline.verified:
            detail = (
                f"event[{cmdline.event}] (PCR {cmdline.pcr}): its digest is not the hash of this "
                "text, so the text in the log is not proven to be what was measured"
            )
        elif cmdline.text in rules.kernel_cmdline_exact or any(
            re.fullmatch(pattern, cmdline.text) for pattern in rules.kernel_cmdline_regex
        ):
            continue
        else:
            detail = (
                f"event[{cmdline.event}] (PCR {cmdline.pcr}) matches no exact string and no "
                "regex (which must match the whole line) in eventlog.kernel_cmdline"
            )
        out.append(
            Failure(
                Code.KERNEL_CMDLINE_NOT_ALLOWED,
                f"kernel_cmdline[{i}]",
                expected,
                cmdline.text,
                detail,
            )
        )
    return out


def _cmdline_expectation(rules: EventLogRules) -> str:
    parts = [f"exactly {s!r}" for s in rules.kernel_cmdline_exact]
    parts += [f"matching /{p}/" for p in rules.kernel_cmdline_regex]
    return " or ".join(parts)


def _check_dbx(dbx: SignatureDatabase | None, required: frozenset[bytes]) -> list[Failure]:
    present = dbx.sha256_hashes() if dbx is not None else frozenset()
    if dbx is None:
        got = "absent: dbx not measured (or its digest does not match)"
    else:
        got = f"absent from dbx's {len(present)} EFI_CERT_SHA256 entries"
    return [
        Failure(
            Code.DBX_MISSING_HASH,
            "dbx",
            h.hex(),
            got,
            "the platform's forbidden-signature database lacks a revocation the policy "
            "requires; apply the dbx update that carries it",
        )
        for h in sorted(required)
        if h not in present
    ]


def _check_authorities(
    authorities: tuple[Authority, ...], forbidden: frozenset[bytes]
) -> list[Failure]:
    out = []
    for i, authority in enumerate(authorities):
        cert = authority.certificate
        if not authority.verified:
            out.append(
                Failure(
                    Code.FORBIDDEN_AUTHORITY,
                    f"authority[{i}]",
                    "an authority whose logged data matches its digest",
                    cert.fingerprint if cert else authority.data[:64],
                    f"event[{authority.event}] ({authority.variable}): the logged data is not "
                    "what was measured, so which certificate verified the code is unknown",
                )
            )
        elif cert is not None and bytes.fromhex(cert.fingerprint) in forbidden:
            out.append(
                Failure(
                    Code.FORBIDDEN_AUTHORITY,
                    f"authority[{i}]",
                    "no certificate listed in eventlog.forbidden_authorities",
                    cert.fingerprint,
                    f"event[{authority.event}]: boot code was verified by "
                    f"{cert.subject or 'an unparsable certificate'} (from {authority.variable}), "
                    "which the policy forbids; remove it from db/MokList or revoke it in dbx",
                )
            )
    return out
