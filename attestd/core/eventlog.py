"""TCG PC Client boot event logs: strict, bounded parsing and replay.

Structures and constants follow the TCG PC Client Platform Firmware Profile
(PFP) specification, section 10: the crypto-agile format (a TCG_PCR_EVENT
carrying the TCG_EfiSpecIDEvent "Spec ID Event03" header, then
TCG_PCR_EVENT2 records whose digest sizes come from that header) and the
legacy SHA-1 format (TCG_PCR_EVENT records only). All integers are
little-endian. Every length is checked against the remaining bytes and
against ``Limits``; a malformed log raises ``MalformedError`` with the byte
offset, never ``struct.error`` or ``IndexError``.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from attestd.core.errors import MalformedError
from attestd.core.limits import DEFAULT_LIMITS, Limits
from attestd.core.tpm import PCR_COUNT, Alg, Bank, hash_bytes

FIELD = "event_log"
SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"


class EventType(enum.IntEnum):
    """TCG PFP 10.4.1 event types."""

    EV_PREBOOT_CERT = 0x0
    EV_POST_CODE = 0x1
    EV_UNUSED = 0x2
    EV_NO_ACTION = 0x3
    EV_SEPARATOR = 0x4
    EV_ACTION = 0x5
    EV_EVENT_TAG = 0x6
    EV_S_CRTM_CONTENTS = 0x7
    EV_S_CRTM_VERSION = 0x8
    EV_CPU_MICROCODE = 0x9
    EV_PLATFORM_CONFIG_FLAGS = 0xA
    EV_TABLE_OF_DEVICES = 0xB
    EV_COMPACT_HASH = 0xC
    EV_IPL = 0xD
    EV_IPL_PARTITION_DATA = 0xE
    EV_NONHOST_CODE = 0xF
    EV_NONHOST_CONFIG = 0x10
    EV_NONHOST_INFO = 0x11
    EV_OMIT_BOOT_DEVICE_EVENTS = 0x12
    EV_POST_CODE2 = 0x13
    EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
    EV_EFI_VARIABLE_BOOT = 0x80000002
    EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
    EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
    EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
    EV_EFI_GPT_EVENT = 0x80000006
    EV_EFI_ACTION = 0x80000007
    EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
    EV_EFI_HANDOFF_TABLES = 0x80000009
    EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
    EV_EFI_HANDOFF_TABLES2 = 0x8000000B
    EV_EFI_VARIABLE_BOOT2 = 0x8000000C
    EV_EFI_GPT_EVENT2 = 0x8000000D
    EV_EFI_HCRTM_EVENT = 0x80000010
    EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
    EV_EFI_SPDM_FIRMWARE_BLOB = 0x800000E1
    EV_EFI_SPDM_FIRMWARE_CONFIG = 0x800000E2


# A plain int for the loops over every event (an enum attribute lookup costs more).
_EV_NO_ACTION = int(EventType.EV_NO_ACTION)

# The TPM_ALG_IDs that have a PCR bank: the digests attestd can compute and replay.
BANK_ALGS = frozenset(bank.alg.value for bank in Bank)
# hashlib's constructor for each bank, which replay looks up once per bank.
_BANK_HASHES = {
    Bank.SHA1: hashlib.sha1,
    Bank.SHA256: hashlib.sha256,
    Bank.SHA384: hashlib.sha384,
    Bank.SHA512: hashlib.sha512,
}


def type_name(event_type: int) -> str:
    try:
        return EventType(event_type).name
    except ValueError:
        return f"0x{event_type:08x}"


_set_field = object.__setattr__  # sets a field of a frozen dataclass in its own __init__


@dataclass(frozen=True)
class Event:
    """One measured (or EV_NO_ACTION) event of the log."""

    number: int  # position in the log, 0 for the header event
    offset: int  # byte offset of the record in the log
    pcr: int
    type: int
    digests: Mapping[int, bytes]  # TPM_ALG_ID -> digest
    data: bytes

    def __init__(
        self,
        number: int,
        offset: int,
        pcr: int,
        type: int,
        digests: Mapping[int, bytes],
        data: bytes,
    ) -> None:
        # The dataclass's frozen __init__, with object.__setattr__ looked up for each
        # field, costs more than reading the record; a log has hundreds of events.
        _set_field(self, "number", number)
        _set_field(self, "offset", offset)
        _set_field(self, "pcr", pcr)
        _set_field(self, "type", type)
        _set_field(self, "digests", digests)
        _set_field(self, "data", data)

    @property
    def type_name(self) -> str:
        return type_name(self.type)

    def digest(self, bank: Bank) -> bytes | None:
        return self.digests.get(bank.alg.value)

    @functools.cached_property
    def data_hashes(self) -> Mapping[int, bytes]:
        """H_alg(data) for each algorithm of ``digests`` that has a PCR bank (not SM3).

        Computed on first use and kept with the event (whose fields are frozen), so
        the checks that compare digests with the data hash it once.
        """
        return {alg: hash_bytes(alg, self.data) for alg in self.digests if alg in BANK_ALGS}


@dataclass(frozen=True)
class EventLog:
    format: str  # "crypto-agile" or "sha1"
    algorithms: Mapping[int, int]  # TPM_ALG_ID -> digest size, from the Spec ID header
    events: tuple[Event, ...]  # measured records (the Spec ID header event excluded)
    size: int

    @property
    def banks(self) -> tuple[Bank, ...]:
        """The banks attestd can replay: declared, known, and in every measured event.

        A bank some event lacks a digest for cannot be replayed, so it is left out
        (and a quoted PCR of that bank is then "not explained by the log").
        """
        out = []
        measured = [e.digests for e in self.events if e.type != _EV_NO_ACTION]
        for alg in self.algorithms:
            if not all(alg in digests for digests in measured):
                continue
            try:
                out.append(Bank.from_alg(alg))
            except ValueError:
                continue  # e.g. SM3: carried, not replayed
        return tuple(sorted(out, key=lambda b: b.alg.value))


class _Cursor:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def fail(self, message: str, at: int | None = None) -> MalformedError:
        return MalformedError(message, field=FIELD, offset=self.pos if at is None else at)

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[int, ...]:
        if self.pos + fmt.size > len(self.data):
            raise self.fail(f"truncated: {what} needs {fmt.size} bytes")
        values = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return values

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(
                f"truncated: {what} declares {n} bytes, {len(self.data) - self.pos} remain"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


_HEADER = struct.Struct("<II")  # pcrIndex, eventType
_U32 = struct.Struct("<I")
_ALG = struct.Struct("<HH")  # algorithmId, digestSize
_DIGEST_ALG = struct.Struct("<H")
_U8 = struct.Struct("<B")
# platformClass, specVersionMinor, specVersionMajor, specErrata, uintnSize
_SPEC_ID_FIELDS = struct.Struct("<IBBBB")


def parse_event_log(data: bytes, limits: Limits = DEFAULT_LIMITS) -> EventLog:
    """Parse a crypto-agile or legacy SHA-1 event log (PFP 10.2)."""
    if len(data) > limits.max_event_log_size:
        raise MalformedError(
            f"{len(data)} bytes exceeds the limit of {limits.max_event_log_size}", field=FIELD
        )
    if not data:
        raise MalformedError("empty", field=FIELD, offset=0)
    c = _Cursor(bytes(data))
    first = _read_legacy(c, 0, limits)
    if first.type == EventType.EV_NO_ACTION and first.data.startswith(SPEC_ID_SIGNATURE):
        algorithms = _spec_id(first)
        events = _read_agile_records(c, algorithms, limits)
        return EventLog("crypto-agile", algorithms, tuple(events), len(data))
    events = _read_legacy_records(c, first, limits)
    return EventLog("sha1", {Alg.SHA1.value: 20}, tuple(events), len(data))


# The record loops below read a well-formed record with one struct.unpack_from of
# its fixed-size part and check each value against the same bounds as the
# _Cursor readers. A record they do not accept as it stands is read again by
# _read_agile / _read_legacy, which raise the precise MalformedError (or read
# it: a crypto-agile record may list fewer digests, or another order).


def _read_agile_records(c: _Cursor, algorithms: Mapping[int, int], limits: Limits) -> list[Event]:
    """TCG_PCR_EVENT2 records from ``c.pos`` to the end of the log."""
    data = c.data
    end = len(data)
    algs = tuple(algorithms)
    banks = len(algs)
    # pcrIndex, eventType, digests.count, then (hashAlg, digest) for each bank in
    # the Spec ID header's order (as every real log lists them), eventSize.
    record = struct.Struct("<III" + "".join(f"H{size}s" for size in algorithms.values()) + "I")
    fixed = record.size
    max_events = limits.max_events
    max_size = limits.max_event_size
    events: list[Event] = []
    pos = c.pos
    while pos < end:
        if len(events) < max_events and pos + fixed <= end:
            fields = record.unpack_from(data, pos)
            pcr, etype, count, size = fields[0], fields[1], fields[2], fields[-1]
            start = pos + fixed
            if (
                pcr < PCR_COUNT
                and count == banks
                and fields[3:-1:2] == algs
                and size <= max_size
                and start + size <= end
            ):
                digests = dict(zip(algs, fields[4:-1:2]))  # noqa: B905 (same length)
                body = data[start : start + size]
                events.append(Event(len(events) + 1, pos, pcr, etype, digests, body))
                pos = start + size
                continue
        c.pos = pos
        _check_count(c, len(events), limits)
        events.append(_read_agile(c, len(events) + 1, algorithms, limits))
        pos = c.pos
    return events


_LEGACY_RECORD = struct.Struct("<II20sI")  # pcrIndex, eventType, SHA-1 digest, eventDataSize


def _read_legacy_records(c: _Cursor, first: Event, limits: Limits) -> list[Event]:
    """TCG_PCR_EVENT records from ``c.pos`` to the end of the log, after ``first``."""
    data = c.data
    end = len(data)
    fixed = _LEGACY_RECORD.size
    sha1 = Alg.SHA1.value
    max_events = limits.max_events
    max_size = limits.max_event_size
    events = [first]
    pos = c.pos
    while pos < end:
        if len(events) < max_events and pos + fixed <= end:
            pcr, etype, digest, size = _LEGACY_RECORD.unpack_from(data, pos)
            start = pos + fixed
            if pcr < PCR_COUNT and size <= max_size and start + size <= end:
                body = data[start : start + size]
                events.append(Event(len(events), pos, pcr, etype, {sha1: digest}, body))
                pos = start + size
                continue
        c.pos = pos
        _check_count(c, len(events), limits)
        events.append(_read_legacy(c, len(events), limits))
        pos = c.pos
    return events


def _check_count(c: _Cursor, count: int, limits: Limits) -> None:
    if count >= limits.max_events:
        raise c.fail(f"more than {limits.max_events} events")


def _check_pcr(c: _Cursor, pcr: int, at: int) -> None:
    if pcr >= PCR_COUNT:
        raise c.fail(f"PCR index {pcr} is outside 0-{PCR_COUNT - 1}", at)


def _read_data(c: _Cursor, limits: Limits) -> bytes:
    (size,) = c.unpack(_U32, "eventSize")
    if size > limits.max_event_size:
        raise c.fail(f"eventSize {size} exceeds the limit of {limits.max_event_size}", c.pos - 4)
    return c.take(size, "event data")


def _read_legacy(c: _Cursor, number: int, limits: Limits) -> Event:
    """TCG_PCR_EVENT: pcrIndex, eventType, SHA-1 digest, eventDataSize, event."""
    at = c.pos
    pcr, etype = c.unpack(_HEADER, "TCG_PCR_EVENT header")
    _check_pcr(c, pcr, at)
    digest = c.take(20, "SHA-1 digest")
    data = _read_data(c, limits)
    return Event(number, at, pcr, etype, {Alg.SHA1.value: digest}, data)


def _spec_id(header: Event) -> dict[int, int]:
    """TCG_EfiSpecIDEvent (PFP 10.4.5.1): the banks of the log and their digest sizes."""
    c = _Cursor(header.data)
    base = header.offset + 32  # where the header event's data starts in the log
    try:
        c.take(16, "signature")
        _platform, _minor, _major, _errata, uintn = c.unpack(_SPEC_ID_FIELDS, "Spec ID fields")
        (count,) = c.unpack(_U32, "numberOfAlgorithms")
        if count == 0 or count > 16:
            raise c.fail(f"numberOfAlgorithms {count} outside 1-16")
        algorithms: dict[int, int] = {}
        for _ in range(count):
            alg, size = c.unpack(_ALG, "digestSizes entry")
            if alg in algorithms:
                raise c.fail(f"algorithm 0x{alg:04x} listed twice")
            known_size = _KNOWN_SIZES.get(alg)
            if known_size is not None and known_size != size:
                raise c.fail(f"{Alg(alg).name} digest size {size}, must be {known_size}")
            if not 1 <= size <= 64:
                raise c.fail(f"digest size {size} outside 1-64")
            algorithms[alg] = size
        (vendor_size,) = c.unpack(_U8, "vendorInfoSize")
        c.take(vendor_size, "vendorInfo")
        if c.pos != len(c.data):
            raise c.fail(f"{len(c.data) - c.pos} trailing bytes in the Spec ID event")
        if uintn not in (1, 2):
            raise c.fail(f"uintnSize {uintn} must be 1 or 2")
    except MalformedError as e:
        raise MalformedError(
            f"Spec ID Event03: {e.args[0].split(': ', 1)[-1]}",
            field=FIELD,
            offset=base + (e.offset or 0),
        ) from None
    return algorithms


_KNOWN_SIZES: dict[int, int] = {
    Alg.SHA1: 20,
    Alg.SHA256: 32,
    Alg.SHA384: 48,
    Alg.SHA512: 64,
    Alg.SM3_256: 32,
}


def _read_agile(c: _Cursor, number: int, algorithms: Mapping[int, int], limits: Limits) -> Event:
    """TCG_PCR_EVENT2: pcrIndex, eventType, TPML_DIGEST_VALUES, eventSize, event."""
    at = c.pos
    pcr, etype = c.unpack(_HEADER, "TCG_PCR_EVENT2 header")
    _check_pcr(c, pcr, at)
    (count,) = c.unpack(_U32, "digests.count")
    if not 1 <= count <= len(algorithms):
        raise c.fail(
            f"event {number} has {count} digests; the log declares {len(algorithms)} banks",
            c.pos - 4,
        )
    digests: dict[int, bytes] = {}
    for _ in range(count):
        (alg,) = c.unpack(_DIGEST_ALG, "digests.hashAlg")
        size = algorithms.get(alg)
        if size is None:
            raise c.fail(
                f"event {number}: algorithm 0x{alg:04x} is not in the Spec ID header", c.pos - 2
            )
        if alg in digests:
            raise c.fail(f"event {number}: algorithm 0x{alg:04x} given twice", c.pos - 2)
        digests[alg] = c.take(size, "digest")
    data = _read_data(c, limits)
    return Event(number, at, pcr, etype, digests, data)


def startup_locality(log: EventLog) -> int | None:
    """The locality of TPM2_Startup from a StartupLocality EV_NO_ACTION event (PFP 10.4.5.3)."""
    for e in log.events:
        if (
            e.type == _EV_NO_ACTION
            and e.pcr == 0
            and e.data.startswith(STARTUP_LOCALITY_SIGNATURE)
            and len(e.data) == len(STARTUP_LOCALITY_SIGNATURE) + 1
        ):
            return e.data[-1]
    return None


def replay(log: EventLog) -> dict[Bank, dict[int, bytes]]:
    """Each bank's PCR values after extending every event of the log, in order.

    EV_NO_ACTION events are not extended (PFP 10.4.5). PCR 0 starts at the
    StartupLocality value when the log has one (0...0||locality; an H-CRTM
    start at locality 4 gives 0...04, and its EV_EFI_HCRTM_EVENT then extends
    it like any other event). Only PCRs some event touches are returned.
    """
    locality = startup_locality(log)
    measured = [(e.pcr, e.digests) for e in log.events if e.type != _EV_NO_ACTION]
    out: dict[Bank, dict[int, bytes]] = {}
    for bank in log.banks:
        size = bank.digest_size
        alg = bank.alg.value
        new = _BANK_HASHES[bank]
        zero = bytes(size)
        pcrs: dict[int, bytes] = {}
        if locality is not None:
            pcrs[0] = bytes(size - 1) + bytes([locality])
        for pcr, digests in measured:
            pcrs[pcr] = new(pcrs.get(pcr, zero) + digests[alg]).digest()
        out[bank] = dict(sorted(pcrs.items()))
    return out
