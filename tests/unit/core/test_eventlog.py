"""The event-log parser and replay against real logs, and against hostile bytes.

Real logs come from ../shared/vectors (see its README): every one must replay
to the PCR values tpm2-tools' ``tpm2_eventlog`` printed for it, and the two
go-attestation logs to the values go-attestation's own tests assert. Hostile
logs (truncations, absurd lengths and counts, flipped bytes) must give
``MalformedError`` with the byte offset where parsing stopped, and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import struct
from pathlib import Path

import pytest

from attestd.core.errors import MalformedError
from attestd.core.eventlog import EventLog, EventType, parse_event_log, replay
from attestd.core.limits import Limits
from attestd.core.tpm import Alg, Bank

REPO = Path(__file__).resolve().parents[3]
VECTORS = REPO.parent / "shared" / "vectors"
EVENTLOGS = VECTORS / "eventlogs"
LOGS = sorted(EVENTLOGS.glob("*.bin"))
GO_ATTESTATION_LOG = EVENTLOGS / "go-attestation-sb_cert_eventlog.bin"
GCP_QUOTE = VECTORS / "quotes" / "windows_gcp_shielded_vm.json"

pytestmark = pytest.mark.skipif(
    not EVENTLOGS.is_dir(),
    reason=f"shared vectors not checked out beside the repository ({VECTORS})",
)


def expected_pcrs(yaml_path: Path) -> dict[str, dict[int, bytes]]:
    """The final ``pcrs:`` block of a tpm2_eventlog YAML, read with regexes (not a YAML parser)."""
    lines = yaml_path.read_text().splitlines()
    start = max(i for i, line in enumerate(lines) if line == "pcrs:")
    out: dict[str, dict[int, bytes]] = {}
    bank: str | None = None
    for line in lines[start + 1 :]:
        if m := re.fullmatch(r"  (\w+):", line):
            bank = m.group(1)
            out[bank] = {}
        elif (m := re.fullmatch(r"    (\d+)\s*: 0x([0-9a-fA-F]+)", line)) and bank is not None:
            out[bank][int(m.group(1))] = bytes.fromhex(m.group(2))
        elif line.strip():
            break  # the block ended
    assert out, f"no pcrs: block in {yaml_path}"
    return out


def replayed(log: EventLog) -> dict[str, dict[int, bytes]]:
    return {bank.value: values for bank, values in replay(log).items()}


# --- real logs ------------------------------------------------------------------


def test_the_shared_vectors_are_all_here() -> None:
    assert len(LOGS) == 11
    for path in LOGS:
        if path != GO_ATTESTATION_LOG:
            assert (EVENTLOGS / "expected" / f"{path.name}.yaml").exists(), path.name


@pytest.mark.parametrize("path", [p for p in LOGS if p != GO_ATTESTATION_LOG], ids=lambda p: p.name)
def test_each_log_replays_to_what_tpm2_eventlog_printed(path: Path) -> None:
    log = parse_event_log(path.read_bytes())
    assert replayed(log) == expected_pcrs(EVENTLOGS / "expected" / f"{path.name}.yaml")


def test_the_expected_pcrs_reader_reads_every_bank_and_pcr() -> None:
    pcrs = expected_pcrs(EVENTLOGS / "expected" / "event-arch-linux.bin.yaml")
    assert set(pcrs) == {"sha1", "sha256"}
    assert pcrs["sha1"][0] == bytes.fromhex("a0487b0d95387d4a30560edf5f041307bf4a1dcc")
    assert all(len(d) == 32 for d in pcrs["sha256"].values())


def test_legacy_sha1_log_parses_as_the_sha1_format() -> None:
    log = parse_event_log((EVENTLOGS / "event-uefi-sha1-log.bin").read_bytes())
    assert log.format == "sha1"
    assert log.banks == (Bank.SHA1,)
    assert log.events[0].number == 0 and log.events[0].type == EventType.EV_S_CRTM_VERSION


def test_go_attestation_log_replays_to_the_pcrs_its_tests_assert() -> None:
    # ../shared/vectors/README.md quotes go-attestation's secureboot_test.go.
    readme = (VECTORS / "README.md").read_text()
    line = next(line for line in readme.splitlines() if GO_ATTESTATION_LOG.name in line)
    asserted = {int(i): bytes.fromhex(d) for i, d in re.findall(r"\b(\d+)=([0-9a-f]{40})\b", line)}
    assert set(asserted) == {0, 4, 7}
    sha1 = replayed(parse_event_log(GO_ATTESTATION_LOG.read_bytes()))["sha1"]
    for index, value in asserted.items():
        assert sha1[index] == value, f"PCR {index}"


def test_gcp_quote_log_replays_to_its_pcrs() -> None:
    doc = json.loads(GCP_QUOTE.read_text())
    log = parse_event_log(base64.b64decode(doc["Log"]["Raw"]))
    assert log.format == "sha1"
    sha1 = replayed(log)["sha1"]
    pcrs = doc["Log"]["PCRs"]
    assert len(pcrs) == 24
    for entry in pcrs:
        assert entry["DigestAlg"] == 3  # SHA-1 in go-attestation's numbering
        value = base64.b64decode(entry["Digest"])
        # PCRs no event touched hold their reset value: zeros, or ones for DRTM PCRs 17-22.
        reset = b"\xff" * 20 if 17 <= entry["Index"] <= 22 else bytes(20)
        assert sha1.get(entry["Index"], reset) == value, f"PCR {entry['Index']}"
    assert {0, 4, 7, 11, 12, 13, 14} <= set(sha1)


# --- crafted logs -----------------------------------------------------------------


def spec_id_event(algorithms: dict[int, int]) -> bytes:
    """A TCG_PCR_EVENT carrying TCG_EfiSpecIDEvent (PFP 10.4.5.1)."""
    data = b"Spec ID Event03\x00" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algorithms))
    data += b"".join(struct.pack("<HH", alg, size) for alg, size in algorithms.items()) + b"\x00"
    return (
        struct.pack("<II", 0, EventType.EV_NO_ACTION)
        + bytes(20)
        + struct.pack("<I", len(data))
        + data
    )


def agile_event(pcr: int, event_type: int, digests: dict[int, bytes], data: bytes) -> bytes:
    """A TCG_PCR_EVENT2 record."""
    out = struct.pack("<III", pcr, event_type, len(digests))
    out += b"".join(struct.pack("<H", alg) + d for alg, d in digests.items())
    return out + struct.pack("<I", len(data)) + data


SHA256 = {Alg.SHA256.value: 32}


def sha256_event(pcr: int, event_type: int, data: bytes) -> bytes:
    return agile_event(pcr, event_type, {Alg.SHA256.value: hashlib.sha256(data).digest()}, data)


def test_startup_locality_3_starts_pcr0_at_3() -> None:
    # PFP 10.4.5.3: TPM2_Startup at locality 3 leaves PCR 0 at 0...03 before the first extend.
    locality = agile_event(
        0, EventType.EV_NO_ACTION, {Alg.SHA256.value: bytes(32)}, b"StartupLocality\x00\x03"
    )
    crtm = sha256_event(0, EventType.EV_S_CRTM_VERSION, b"1\x00.\x000\x00\x00\x00")
    digest = hashlib.sha256(b"1\x00.\x000\x00\x00\x00").digest()

    with_locality = parse_event_log(spec_id_event(SHA256) + locality + crtm)
    pcr0 = replay(with_locality)[Bank.SHA256][0]
    assert pcr0 == hashlib.sha256(bytes(31) + b"\x03" + digest).digest()

    without = parse_event_log(spec_id_event(SHA256) + crtm)
    assert replay(without)[Bank.SHA256][0] == hashlib.sha256(bytes(32) + digest).digest()


def test_a_crafted_log_round_trips_through_the_parser() -> None:
    raw = spec_id_event(SHA256) + sha256_event(
        4, EventType.EV_EFI_ACTION, b"Calling EFI Application"
    )
    log = parse_event_log(raw)
    assert log.algorithms == {Alg.SHA256.value: 32}
    (event,) = log.events
    assert (event.pcr, event.type, event.data) == (
        4,
        EventType.EV_EFI_ACTION,
        b"Calling EFI Application",
    )


# --- hostile bytes -------------------------------------------------------------------

SMALL_LOG = EVENTLOGS / "event.bin"  # Spec ID header + one event, four banks


def field_offsets(log: EventLog, index: int = 0) -> dict[str, int]:
    """Byte offsets of the TCG_PCR_EVENT2 fields of ``log.events[index]``."""
    e = log.events[index]
    pos = e.offset + 12
    first_alg = pos
    for alg in e.digests:
        pos += 2 + log.algorithms[alg]
    return {"pcrIndex": e.offset, "count": e.offset + 8, "hashAlg": first_alg, "eventSize": pos}


def malformed(data: bytes, limits: Limits | None = None) -> MalformedError:
    with pytest.raises(MalformedError) as info:
        parse_event_log(data, limits) if limits else parse_event_log(data)
    assert info.value.field == "event_log"
    return info.value


def test_truncation_at_every_byte_is_malformed_with_an_offset() -> None:
    data = SMALL_LOG.read_bytes()
    log = parse_event_log(data)
    boundaries = {e.offset for e in log.events}  # a log cut between records is a shorter log
    for n in range(len(data)):
        if n in boundaries:
            assert len(parse_event_log(data[:n]).events) == sum(e.offset < n for e in log.events)
            continue
        error = malformed(data[:n])
        assert error.offset is not None and 0 <= error.offset <= n, (n, error)


def test_absurd_event_size_is_refused_at_its_field() -> None:
    data = bytearray(SMALL_LOG.read_bytes())
    at = field_offsets(parse_event_log(bytes(data)))["eventSize"]
    struct.pack_into("<I", data, at, 0xFFFFFFFF)
    assert malformed(bytes(data)).offset == at


def test_event_size_beyond_the_data_is_truncation() -> None:
    data = bytearray(SMALL_LOG.read_bytes())
    at = field_offsets(parse_event_log(bytes(data)))["eventSize"]
    struct.pack_into("<I", data, at, 1000)
    error = malformed(bytes(data))
    assert error.offset == at + 4 and "truncated" in str(error)


@pytest.mark.parametrize("count", [0, 5, 0xFFFFFFFF])
def test_absurd_digest_count_is_refused_at_its_field(count: int) -> None:
    data = bytearray(SMALL_LOG.read_bytes())
    at = field_offsets(parse_event_log(bytes(data)))["count"]
    struct.pack_into("<I", data, at, count)
    assert malformed(bytes(data)).offset == at


@pytest.mark.parametrize("count", [0, 17, 0xFFFFFFFF])
def test_absurd_number_of_algorithms_is_refused_in_the_header(count: int) -> None:
    data = bytearray(SMALL_LOG.read_bytes())
    at = 32 + 16 + 8  # TCG_PCR_EVENT header, then signature and four Spec ID fields
    assert struct.unpack_from("<I", data, at) == (4,)
    struct.pack_into("<I", data, at, count)
    error = malformed(bytes(data))
    assert (
        error.offset is not None
        and 32 <= error.offset <= parse_event_log(SMALL_LOG.read_bytes()).events[0].offset
    )


def test_pcr_index_24_is_refused_at_the_record() -> None:
    data = bytearray(SMALL_LOG.read_bytes())
    at = field_offsets(parse_event_log(bytes(data)))["pcrIndex"]
    struct.pack_into("<I", data, at, 24)
    error = malformed(bytes(data))
    assert error.offset == at and "24" in str(error)


def test_legacy_pcr_index_24_is_refused() -> None:
    data = bytearray((EVENTLOGS / "event-uefi-sha1-log.bin").read_bytes())
    second = parse_event_log(bytes(data)).events[1].offset
    struct.pack_into("<I", data, second, 24)
    assert malformed(bytes(data)).offset == second


def test_an_algorithm_not_in_the_header_is_refused() -> None:
    data = bytearray(SMALL_LOG.read_bytes())
    at = field_offsets(parse_event_log(bytes(data)))["hashAlg"]
    struct.pack_into("<H", data, at, 0x0099)
    error = malformed(bytes(data))
    assert error.offset == at and "0x0099" in str(error)


def test_more_events_than_the_limit_are_refused() -> None:
    data = (EVENTLOGS / "event-sd-boot-fedora37.bin").read_bytes()
    log = parse_event_log(data)
    assert len(log.events) == 27
    assert len(parse_event_log(data, Limits(max_events=27)).events) == 27
    error = malformed(data, Limits(max_events=10))
    assert error.offset == log.events[10].offset


def test_an_event_over_the_event_size_limit_is_refused() -> None:
    data = GO_ATTESTATION_LOG.read_bytes()
    biggest = max(parse_event_log(data).events, key=lambda e: len(e.data))
    error = malformed(data, Limits(max_event_size=len(biggest.data) - 1))
    assert error.offset is not None and biggest.offset < error.offset < biggest.offset + 200


def test_a_log_over_the_size_limit_is_refused_before_parsing() -> None:
    data = GO_ATTESTATION_LOG.read_bytes()
    assert parse_event_log(data, Limits(max_event_log_size=len(data))).size == len(data)
    error = malformed(data, Limits(max_event_log_size=len(data) - 1))
    assert "exceeds" in str(error)
    malformed(b"\x00" * 2_000_000)  # the default limit is 1 MiB


def test_empty_log_is_malformed_at_zero() -> None:
    assert malformed(b"").offset == 0


@pytest.mark.parametrize("name", ["event-sd-boot-fedora37.bin", "event-uefi-sha1-log.bin"])
def test_random_byte_flips_raise_only_malformed_error(name: str) -> None:
    """A fixed-seed fuzz loop: flipped bytes either parse and replay, or are MalformedError."""
    original = (EVENTLOGS / name).read_bytes()
    rng = random.Random(20240601)
    outcomes = {"parsed": 0, "malformed": 0}
    for _ in range(2000):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            # Bias towards the record headers, where lengths and counts live.
            at = (
                rng.randrange(min(len(data), 600))
                if rng.random() < 0.5
                else rng.randrange(len(data))
            )
            data[at] = rng.randrange(256) if rng.random() < 0.7 else rng.choice((0x00, 0xFF))
        try:
            log = parse_event_log(bytes(data))
        except MalformedError as e:
            assert e.field == "event_log" and e.offset is not None and 0 <= e.offset <= len(data)
            outcomes["malformed"] += 1
            continue
        replay(log)
        outcomes["parsed"] += 1
    assert outcomes["parsed"] > 100 and outcomes["malformed"] > 100, outcomes
