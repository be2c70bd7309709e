"""Boot state, event semantics and event-log rules, on real logs and on tampered copies.

Tampered logs are real logs (../shared/vectors/eventlogs) whose parsed events
were edited and re-serialized by the small writer below; each carries one
defect and must give exactly its failure code. Every real log gives no
failure at all from ``check_events``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from attestd.core.bootstate import (
    EFI_GLOBAL_VARIABLE,
    EFI_IMAGE_SECURITY_DATABASE,
    BootState,
    check_events,
    evaluate_rules,
    extract_state,
)
from attestd.core.errors import MalformedError
from attestd.core.eventlog import Event, EventLog, EventType, parse_event_log
from attestd.core.policy import EventLogRules
from attestd.core.tpm import Alg, hash_bytes
from attestd.core.verdict import Code, Failure

REPO = Path(__file__).resolve().parents[3]
VECTORS = REPO.parent / "shared" / "vectors"
EVENTLOGS = VECTORS / "eventlogs"
LOGS = sorted(EVENTLOGS.glob("*.bin"))
GCP_QUOTE = VECTORS / "quotes" / "windows_gcp_shielded_vm.json"

pytestmark = [
    pytest.mark.skipif(
        not EVENTLOGS.is_dir(),
        reason=f"shared vectors not checked out beside the repository ({VECTORS})",
    ),
    # Real db contents: a "C=USA" attribute, negative serial numbers. cryptography warns.
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
]

MS_UEFI_CA = (
    "CN=Microsoft Corporation UEFI CA 2011,O=Microsoft Corporation,L=Redmond,ST=Washington,C=US"
)
MS_PCA = (
    "CN=Microsoft Windows Production PCA 2011,O=Microsoft Corporation,L=Redmond,ST=Washington,C=US"
)
CANONICAL_CA = (
    "CN=Canonical Ltd. Master Certificate Authority,O=Canonical Ltd.,L=Douglas,ST=Isle of Man,C=GB"
)


def raw(name: str) -> bytes:
    return (EVENTLOGS / name).read_bytes()


def load(name: str) -> EventLog:
    return parse_event_log(raw(name))


def gcp_log() -> bytes:
    return base64.b64decode(json.loads(GCP_QUOTE.read_text())["Log"]["Raw"])


# --- a test-only writer: parsed events back to bytes --------------------------------


def write_log(log: EventLog, original: bytes) -> bytes:
    """Serialize ``log``'s events after the Spec ID header event of ``original``.

    Crypto-agile records are PFP TCG_PCR_EVENT2; in the legacy SHA-1 format
    every record is a TCG_PCR_EVENT and there is no header to keep.
    """
    if log.format == "sha1":
        out = b""
        for e in log.events:
            out += struct.pack("<II", e.pcr, e.type) + e.digests[Alg.SHA1.value]
            out += struct.pack("<I", len(e.data)) + e.data
        return out
    first = parse_event_log(original).events
    out = original[: first[0].offset] if first else original
    for e in log.events:
        out += struct.pack("<III", e.pcr, e.type, len(e.digests))
        out += b"".join(struct.pack("<H", alg) + d for alg, d in e.digests.items())
        out += struct.pack("<I", len(e.data)) + e.data
    return out


def measured(e: Event, data: bytes) -> Event:
    """``e`` carrying ``data`` with every bank's digest recomputed: a consistent event."""
    return replace(e, data=data, digests={alg: hash_bytes(alg, data) for alg in e.digests})


def variable_data(guid: bytes, name: str, value: bytes) -> bytes:
    """PFP UEFI_VARIABLE_DATA."""
    return guid + struct.pack("<QQ", len(name), len(value)) + name.encode("utf-16-le") + value


def rebuilt(name: str, edit: Callable[[list[Event]], None]) -> EventLog:
    """Parse a real log, let ``edit`` change its event list, write it and parse it again."""
    original = raw(name)
    log = parse_event_log(original)
    events = list(log.events)
    edit(events)
    events = [replace(e, number=i + 1) for i, e in enumerate(events)]
    return parse_event_log(write_log(replace(log, events=tuple(events)), original))


def codes(failures: list[Failure]) -> list[Code]:
    return [f.code for f in failures]


GO = "go-attestation-sb_cert_eventlog.bin"  # SHA-1, SHA-256, SHA-384 banks


def go_event(events: list[Event], number: int) -> int:
    """The list index of event ``number`` (1-based, as tpm2_eventlog and Failures count)."""
    return next(i for i, e in enumerate(events) if e.number == number)


# --- the writer itself ------------------------------------------------------------


@pytest.mark.parametrize("path", LOGS, ids=lambda p: p.name)
def test_writer_reproduces_every_real_log_byte_for_byte(path: Path) -> None:
    original = path.read_bytes()
    assert write_log(parse_event_log(original), original) == original


def test_writer_reproduces_the_gcp_sha1_log() -> None:
    original = gcp_log()
    assert write_log(parse_event_log(original), original) == original


# --- real logs: no findings ---------------------------------------------------------


@pytest.mark.parametrize("path", LOGS, ids=lambda p: p.name)
def test_real_logs_show_no_tampering(path: Path) -> None:
    # Includes event-arch-linux.bin, whose EV_IPL event 24 does not match its payload:
    # EV_IPL is deliberately not digest-checked (the command line is marked unverified instead).
    assert check_events(parse_event_log(path.read_bytes())) == []


def test_gcp_windows_log_shows_no_tampering() -> None:
    # Windows logs "WBCL" separators in PCRs 12-14: only PCR 0-7 separators must be 0/ffffffff.
    assert check_events(parse_event_log(gcp_log())) == []


# --- extract_state on real logs ----------------------------------------------------


def test_go_attestation_state_secure_boot_keys_and_three_authorities() -> None:
    state = extract_state(load(GO))
    assert state.secure_boot is True
    assert state.pk is not None and [c.subject for c in state.pk.certificates] == ["CN=newpk"]
    assert state.db is not None
    assert [c.subject for c in state.db.certificates] == [
        MS_UEFI_CA,
        "CN=Microsoft Root Certificate Authority 2010,O=Microsoft Corporation,L=Redmond,"
        "ST=Washington,C=US",
        MS_PCA,
        "CN=Microsoft Corporation Third Party Marketplace Root,O=Microsoft Corporation,"
        "L=Redmond,ST=Washington,C=US",
    ]
    assert all(len(c.fingerprint) == 64 for c in state.db.certificates)
    assert state.dbx is not None and not state.dbx.certificates
    assert len(state.dbx.sha256_hashes()) == 77
    assert {h.type for h in state.dbx.hashes} == {"EFI_CERT_SHA256"}

    # go-attestation's TestSecureBootBug157: three authorities after the separator.
    assert len(state.authorities) == 3
    assert [(a.event, a.variable) for a in state.authorities] == [
        (8, "db"),
        (12, "Shim"),
        (14, "Shim"),
    ]
    assert all(a.after_separator and a.verified and a.certificate for a in state.authorities)
    subjects = [a.certificate.subject for a in state.authorities if a.certificate]
    assert subjects == [MS_UEFI_CA, CANONICAL_CA, CANONICAL_CA]
    # The db entry is EFI_SIGNATURE_DATA (owner GUID + DER); shim logs bare DER.
    db_authority = state.authorities[0].certificate
    assert db_authority is not None and db_authority.owner == "d281fad2-8d88-47a4-9792-5baa47bb1b89"
    assert db_authority.fingerprint == state.db.certificates[0].fingerprint
    assert state.authorities[1].certificate is not None
    assert state.authorities[1].certificate.owner is None

    assert state.boot_applications[0].path == "\\EFI\\BOOT\\BOOTX64.EFI"
    assert all(a.digest_alg == "sha256" for a in state.boot_applications)
    assert state.kernel_cmdlines == ()
    assert state.scrtm_version == ""


def test_sd_boot_state_command_line_from_pcr_12() -> None:
    state = extract_state(load("event-sd-boot-fedora37.bin"))
    assert state.secure_boot is False  # SecureBoot measured with VariableDataLength 0
    assert state.boot_applications == ()  # this firmware logs no PCR 4 images
    assert [(c.event, c.pcr, c.text, c.verified) for c in state.kernel_cmdlines] == [
        (23, 12, " console=ttyS0 console=tty0 efi=debug ", True),
        (24, 12, " console=ttyS0 console=tty0 efi=debug ", True),
    ]
    # PCR 9's EV_EVENT_TAG "Linux initrd" (Linux's initrd tag) is not a command line.
    assert state.boot_loader_commands == ()
    assert state.firmware_blobs == 2
    assert state.pk is not None and state.pk.certificates == () and state.pk.hashes == ()


def test_arch_linux_state_boot_applications_and_unverified_command_line() -> None:
    state = extract_state(load("event-arch-linux.bin"))
    assert state.secure_boot is False
    assert [(a.event, a.path, a.digest_alg) for a in state.boot_applications] == [
        (22, "\\EFI\\SYSTEMD\\SYSTEMD-BOOTX64.EFI", "sha256"),
        (23, "\\vmlinuz-linux-lts", "sha256"),
    ]
    assert state.boot_applications[0].digest == (
        "d51e9d20c0e180d8fdded3e7d5e05b4ab8e87b2f30e6995632a14e399332103b"
    )
    # systemd-boot measured the UTF-16 command line into PCR 8, and logged a copy one
    # byte short: the text is shown, but it is not proven to be what was measured.
    (cmdline,) = state.kernel_cmdlines
    assert (cmdline.event, cmdline.pcr, cmdline.verified) == (24, 8, False)
    assert cmdline.text.startswith("initrd=\\intel-ucode.img initrd=\\initramfs-linux-lts.img ")
    assert cmdline.text.endswith(" intel_iommu=on iommu=pt l1tf=off")
    assert state.db is not None and state.db.certificates[0].subject == "CN=Joe Richey (DB)"
    assert state.scrtm_version == "1efb6b540c1d5540a4ad4ef4bf17b83a"  # a GUID, shown as hex


def test_grub_logs_give_commands_and_a_verified_kernel_command_line() -> None:
    state = extract_state(load("event-bootorder.bin"))
    assert state.boot_loader_commands[0] == (
        "[ -z (hd0,gpt15)/boot/grub -o ! -e (hd0,gpt15)/boot/grub ]"
    )
    assert len(state.boot_loader_commands) == 64
    (cmdline,) = state.kernel_cmdlines
    assert (cmdline.event, cmdline.pcr, cmdline.verified) == (94, 8, True)
    assert cmdline.text == (
        "/boot/vmlinuz-5.4.0-45-generic root=PARTUUID=78a91070-7746-4396-82b8-ffc7ba90d889 "
        "ro biosdevname=0 net.ifnames=0 console=tty1 console=ttyS0"
    )


def test_shim_authorities_that_are_not_certificates() -> None:
    state = extract_state(load("event-moklisttrusted.bin"))
    assert state.secure_boot is True
    assert [(a.variable, a.certificate is not None) for a in state.authorities] == [
        ("db", True),
        ("SbatLevel", False),
        ("MokListTrusted", False),
        ("Shim", True),
    ]
    assert bytes.fromhex(state.authorities[1].data) == b"sbat,1,2021030218\n"
    assert [a.path for a in state.boot_applications[:2]] == [
        "\\EFI\\redhat\\shimx64.efi",
        "\\EFI\\redhat\\grubx64.efi",
    ]


def test_sha1_only_log_reports_sha1_digests() -> None:
    state = extract_state(load("event-uefi-sha1-log.bin"))
    assert [a.digest_alg for a in state.boot_applications] == ["sha1", "sha1"]
    assert state.boot_applications[0].path == "\\EFI\\ubuntu\\shimx64.efi"


def test_gcp_shielded_vm_has_secure_boot_enabled() -> None:
    # go-attestation's TestSecureBoot expects exactly this.
    state = extract_state(parse_event_log(gcp_log()))
    assert state.secure_boot is True
    assert [a.path for a in state.boot_applications] == ["\\EFI\\Microsoft\\Boot\\bootmgfw.efi"]


def test_to_json_has_stable_keys_and_is_json() -> None:
    doc = extract_state(load(GO)).to_json()
    assert list(doc) == [
        "secure_boot",
        "pk",
        "kek",
        "db",
        "dbx",
        "authorities",
        "boot_applications",
        "boot_loader_commands",
        "kernel_cmdlines",
        "scrtm_version",
        "firmware_blobs",
    ]
    assert list(doc["db"]) == ["certificates", "hashes"]
    assert list(doc["db"]["certificates"][0]) == ["owner", "subject", "fingerprint_sha256"]
    assert list(doc["dbx"]["hashes"][0]) == ["owner", "type", "hash"]
    assert list(doc["authorities"][0]) == [
        "event",
        "variable",
        "after_separator",
        "digest_verified",
        "certificate",
        "data",
    ]
    assert list(doc["boot_applications"][0]) == ["event", "digest_alg", "digest", "path"]
    assert json.loads(json.dumps(doc)) == doc
    cmdline = extract_state(load("event-sd-boot-fedora37.bin")).to_json()["kernel_cmdlines"][0]
    assert list(cmdline) == ["event", "pcr", "text", "digest_verified"]
    empty = extract_state(load("event-uefiaction.bin")).to_json()
    assert empty["pk"] is None and empty["secure_boot"] is None and empty["authorities"] == []


# --- tampered copies of real logs: each gives its code -------------------------------


def test_retyped_separator() -> None:
    def edit(events: list[Event]) -> None:
        i = go_event(events, 7)
        assert events[i].type == EventType.EV_SEPARATOR and events[i].pcr == 7
        events[i] = replace(events[i], type=EventType.EV_EFI_ACTION)

    failures = check_events(rebuilt(GO, edit))
    assert codes(failures) == [Code.EVENT_RETYPED]
    assert failures[0].subject == "event[7] pcr 7 EV_EFI_ACTION"
    assert (failures[0].expected, failures[0].got) == ("EV_SEPARATOR", "EV_EFI_ACTION")


def test_separator_twice() -> None:
    def edit(events: list[Event]) -> None:
        i = go_event(events, 7)
        events.insert(i + 1, events[i])

    failures = check_events(rebuilt(GO, edit))
    assert codes(failures) == [Code.SEPARATOR_REPEATED]
    assert failures[0].subject == "event[8] pcr 7 EV_SEPARATOR"
    assert "event[7]" in failures[0].got


def test_secure_boot_variable_after_the_separator() -> None:
    def edit(events: list[Event]) -> None:
        secure_boot = events.pop(go_event(events, 2))
        events.insert(go_event(events, 7) + 1, secure_boot)

    log = rebuilt(GO, edit)
    failures = check_events(log)
    assert codes(failures) == [Code.SECURE_BOOT_VARIABLE_AFTER_SEPARATOR]
    assert failures[0].subject == "event[7] pcr 7 EV_EFI_VARIABLE_DRIVER_CONFIG"
    assert failures[0].got == "SecureBoot after it"
    # Only what was measured before the separator is the policy.
    assert extract_state(log).secure_boot is None


@pytest.mark.parametrize("name", ["db", "dbx", "PK"])
def test_a_key_database_after_the_separator(name: str) -> None:
    guid = EFI_IMAGE_SECURITY_DATABASE if name in ("db", "dbx") else EFI_GLOBAL_VARIABLE

    def edit(events: list[Event]) -> None:
        late = measured(events[go_event(events, 3)], variable_data(guid.bytes_le, name, b""))
        events.insert(go_event(events, 7) + 1, late)

    assert codes(check_events(rebuilt(GO, edit))) == [Code.SECURE_BOOT_VARIABLE_AFTER_SEPARATOR]


@pytest.mark.parametrize("value", [b"\x01\x01", b"\x01\x00\x00\x00", b"\x02"])
def test_secure_boot_variable_malformed(value: bytes) -> None:
    def edit(events: list[Event]) -> None:
        i = go_event(events, 2)
        data = variable_data(EFI_GLOBAL_VARIABLE.bytes_le, "SecureBoot", value)
        events[i] = measured(events[i], data)

    log = rebuilt(GO, edit)
    failures = check_events(log)
    assert codes(failures) == [Code.SECURE_BOOT_VARIABLE_MALFORMED]
    assert failures[0].got == value.hex()
    assert extract_state(log).secure_boot is None
    assert codes(evaluate_rules(extract_state(log), EventLogRules(require_secure_boot=True))) == [
        Code.SECURE_BOOT_DISABLED
    ]


@pytest.mark.parametrize(
    "event_type", [EventType.EV_EFI_VARIABLE_BOOT, EventType.EV_IPL, 0x12345678]
)
def test_unexpected_event_type_in_pcr7(event_type: int) -> None:
    def edit(events: list[Event]) -> None:
        template = events[go_event(events, 8)]
        events.insert(
            go_event(events, 8), measured(replace(template, type=event_type), b"not policy")
        )

    failures = check_events(rebuilt(GO, edit))
    assert codes(failures) == [Code.EVENT_TYPE_UNEXPECTED]
    assert failures[0].subject.startswith("event[8] pcr 7 ")
    assert "EV_EFI_VARIABLE_AUTHORITY" in failures[0].expected


def test_flipped_digest_of_an_efi_variable() -> None:
    def edit(events: list[Event]) -> None:
        i = go_event(events, 3)  # PK
        digests = dict(events[i].digests)
        sha256 = bytearray(digests[Alg.SHA256.value])
        sha256[0] ^= 1
        digests[Alg.SHA256.value] = bytes(sha256)
        events[i] = replace(events[i], digests=digests)

    log = rebuilt(GO, edit)
    failures = check_events(log)
    assert codes(failures) == [Code.EVENT_DIGEST_MISMATCH]
    f = failures[0]
    assert f.subject == "event[3] pcr 7 EV_EFI_VARIABLE_DRIVER_CONFIG"
    pk = log.events[2]
    assert f.expected == hashlib.sha256(pk.data).hexdigest()
    assert f.got == pk.digests[Alg.SHA256.value].hex()
    assert "sha256" in f.detail
    # A variable whose data is not what was measured is not believed.
    assert extract_state(log).pk is None


def test_edited_secure_boot_byte_is_caught_and_not_believed() -> None:
    # The attack the digest check exists for: a log rewritten to say Secure Boot was on.
    name = "event-bootorder.bin"  # SecureBoot = 0; banks SHA-1 and SHA-256
    log = load(name)
    events = list(log.events)
    secure_boot = "SecureBoot".encode("utf-16-le")
    i = next(i for i, e in enumerate(events) if e.data[32:52] == secure_boot)
    assert events[i].data[-1:] == b"\x00"
    events[i] = replace(events[i], data=events[i].data[:-1] + b"\x01")
    tampered = parse_event_log(write_log(replace(log, events=tuple(events)), raw(name)))
    failures = check_events(tampered)
    assert codes(failures) == [Code.EVENT_DIGEST_MISMATCH] * 2  # one per bank
    assert extract_state(log).secure_boot is False
    assert extract_state(tampered).secure_boot is None


def test_flipped_efi_action() -> None:
    log = load("event-bootorder.bin")
    original = raw("event-bootorder.bin")
    events = list(log.events)
    i = next(i for i, e in enumerate(events) if e.type == EventType.EV_EFI_ACTION)
    events[i] = replace(events[i], data=b"Calling EFI Application from Boot Optioo")
    failures = check_events(
        parse_event_log(write_log(replace(log, events=tuple(events)), original))
    )
    assert codes(failures) == [Code.EVENT_DIGEST_MISMATCH] * 2
    assert failures[0].subject == f"event[{events[i].number}] pcr 4 EV_EFI_ACTION"


def test_flipped_separator_digest() -> None:
    def edit(events: list[Event]) -> None:
        i = go_event(events, 7)
        digests = dict(events[i].digests)
        digests[Alg.SHA1.value] = bytes(20)
        events[i] = replace(events[i], digests=digests)

    failures = check_events(rebuilt(GO, edit))
    assert codes(failures) == [Code.EVENT_DIGEST_MISMATCH]
    assert failures[0].got == "00" * 20


@pytest.mark.parametrize("value", [b"\x01\x00\x00\x00", b"\x00\x00\x00", b"WBCL"])
def test_separator_value_other_than_zero_or_ones(value: bytes) -> None:
    # Consistent digest, wrong value: 00000001 is the firmware's error separator.
    def edit(events: list[Event]) -> None:
        i = go_event(events, 7)
        events[i] = measured(events[i], value)

    failures = check_events(rebuilt(GO, edit))
    assert codes(failures) == [Code.EVENT_DIGEST_MISMATCH]
    assert failures[0].expected == "data 00000000 or ffffffff"
    assert failures[0].got == value.hex()


def test_ffffffff_separator_is_accepted() -> None:
    def edit(events: list[Event]) -> None:
        i = go_event(events, 7)
        events[i] = measured(events[i], b"\xff\xff\xff\xff")

    assert check_events(rebuilt(GO, edit)) == []


def test_flipped_crtm_version() -> None:
    def edit(events: list[Event]) -> None:
        i = go_event(events, 1)
        assert events[i].type == EventType.EV_S_CRTM_VERSION
        events[i] = replace(events[i], data=b"1\x00\x00\x00")

    failures = check_events(rebuilt(GO, edit))
    assert codes(failures) == [Code.EVENT_DIGEST_MISMATCH] * 3  # SHA-1, SHA-256, SHA-384
    assert {f.subject for f in failures} == {"event[1] pcr 0 EV_S_CRTM_VERSION"}


def test_an_event_disguised_with_a_separator_digest_in_pcr4() -> None:
    def edit(events: list[Event]) -> None:
        separator = events[go_event(events, 7)]
        events.insert(0, replace(separator, pcr=4, type=EventType.EV_EFI_BOOT_SERVICES_APPLICATION))

    failures = check_events(rebuilt(GO, edit))
    assert codes(failures) == [Code.EVENT_RETYPED]
    assert failures[0].subject == "event[1] pcr 4 EV_EFI_BOOT_SERVICES_APPLICATION"


def test_malformed_pcr7_variable_raises_malformed_error_at_its_event() -> None:
    def edit(events: list[Event]) -> None:
        i = go_event(events, 3)
        data = bytearray(events[i].data)
        struct.pack_into("<Q", data, 16, 2**63)  # UnicodeNameLength
        events[i] = measured(events[i], bytes(data))

    log = rebuilt(GO, edit)
    steps: tuple[Callable[[EventLog], object], ...] = (check_events, extract_state)
    for step in steps:
        with pytest.raises(MalformedError) as info:
            step(log)
        assert info.value.field == "event_log"
        assert info.value.offset == log.events[2].offset
        assert "UnicodeNameLength" in str(info.value)


@pytest.mark.parametrize(
    ("field_offset", "value", "message"),
    [
        (16, 0xFFFFFFFF, "SignatureListSize"),
        (24, 0, "SignatureSize"),
        (20, 0x7FFFFFFF, "HeaderSize"),
    ],
)
def test_malformed_signature_list_raises_malformed_error(
    field_offset: int, value: int, message: str
) -> None:
    def edit(events: list[Event]) -> None:
        i = go_event(events, 5)  # db
        data = bytearray(events[i].data)
        start = 32 + 2 * len("db")  # VariableData: the first EFI_SIGNATURE_LIST
        struct.pack_into("<I", data, start + field_offset, value)
        events[i] = measured(events[i], bytes(data))

    log = rebuilt(GO, edit)
    assert check_events(log) == []  # consistent digests: the structure is the problem
    with pytest.raises(MalformedError) as info:
        extract_state(log)
    assert info.value.offset == log.events[4].offset and message in str(info.value)


def _flip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(min(len(out), 96)) if rng.random() < 0.6 else rng.randrange(len(out))
        out[at] = rng.randrange(256) if rng.random() < 0.7 else rng.choice((0x00, 0xFF, 0x80))
    return bytes(out)


ALL_RULES = EventLogRules(
    require_secure_boot=True,
    boot_applications=frozenset({bytes(32)}),
    kernel_cmdline_exact=("quiet",),
    kernel_cmdline_regex=(r"root=\S+ .*",),
    dbx_contains=frozenset({bytes(32)}),
    forbidden_authorities=frozenset({bytes(32)}),
)


def _run_all(log: EventLog) -> None:
    check_events(log)
    state = extract_state(log)
    json.dumps(state.to_json())
    evaluate_rules(state, ALL_RULES)


@pytest.mark.parametrize("name", [GO, "event-moklisttrusted.bin", "event-arch-linux.bin"])
def test_fuzzed_event_data_raises_only_malformed_error_at_the_event(name: str) -> None:
    """Fixed-seed fuzz of the event data this module parses, with digests kept consistent."""
    log = load(name)
    targets = [
        i
        for i, e in enumerate(log.events)
        if e.pcr in (4, 7, 8, 9, 12) or e.type == EventType.EV_S_CRTM_VERSION
    ]
    rng = random.Random(7)
    malformed = 0
    for _ in range(300):
        i = rng.choice(targets)
        events = list(log.events)
        events[i] = measured(events[i], _flip(rng, events[i].data))
        try:
            _run_all(replace(log, events=tuple(events)))
        except MalformedError as e:
            assert e.field == "event_log" and e.offset == events[i].offset, e
            malformed += 1
    assert 0 < malformed < 300  # both outcomes exercised


def test_fuzzed_log_bytes_raise_only_malformed_error() -> None:
    original = raw(GO)
    rng = random.Random(11)
    for _ in range(300):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            log = parse_event_log(bytes(data))
            _run_all(log)
        except MalformedError as e:
            assert e.field == "event_log" and e.offset is not None


# --- evaluate_rules ------------------------------------------------------------------


@pytest.fixture(scope="module")
def go_state() -> BootState:
    return extract_state(load(GO))


def test_no_rules_no_failures(go_state: BootState) -> None:
    assert evaluate_rules(go_state, EventLogRules()) == []
    assert evaluate_rules(extract_state(load("event-uefiaction.bin")), EventLogRules()) == []


def test_require_secure_boot(go_state: BootState) -> None:
    rules = EventLogRules(require_secure_boot=True)
    assert evaluate_rules(go_state, rules) == []
    (f,) = evaluate_rules(extract_state(load("event-sd-boot-fedora37.bin")), rules)
    assert (f.code, f.subject, f.expected, f.got) == (
        Code.SECURE_BOOT_DISABLED,
        "secure_boot",
        "enabled",
        "disabled",
    )
    (f,) = evaluate_rules(extract_state(load("event.bin")), rules)  # no SecureBoot event
    assert f.got == "unknown"


def test_boot_applications(go_state: BootState) -> None:
    digests = [bytes.fromhex(a.digest) for a in go_state.boot_applications]
    assert evaluate_rules(go_state, EventLogRules(boot_applications=frozenset(digests))) == []

    failures = evaluate_rules(go_state, EventLogRules(boot_applications=frozenset(digests[:1])))
    assert codes(failures) == [Code.BOOT_APPLICATION_NOT_ALLOWED] * 2
    assert [f.subject for f in failures] == ["boot_application[1]", "boot_application[2]"]
    assert failures[0].got == f"sha256:{digests[1].hex()}"
    assert "eventlog.boot_applications" in failures[0].detail

    # A SHA-1-only log cannot satisfy a SHA-256 allow-list.
    sha1_state = extract_state(load("event-uefi-sha1-log.bin"))
    failures = evaluate_rules(sha1_state, EventLogRules(boot_applications=frozenset(digests)))
    assert codes(failures) == [Code.BOOT_APPLICATION_NOT_ALLOWED] * 2
    assert failures[0].got.startswith("sha1:") and "no SHA-256" in failures[0].detail


def test_kernel_cmdline_exact_and_regex() -> None:
    state = extract_state(load("event-moklisttrusted.bin"))
    (cmdline,) = state.kernel_cmdlines
    assert evaluate_rules(state, EventLogRules(kernel_cmdline_exact=(cmdline.text,))) == []
    assert (
        evaluate_rules(state, EventLogRules(kernel_cmdline_regex=(r".* console=ttyS0,115200 .*",)))
        == []
    )
    # The regex must match the whole line.
    (f,) = evaluate_rules(state, EventLogRules(kernel_cmdline_regex=(r"console=ttyS0,115200",)))
    assert (f.code, f.subject, f.got) == (
        Code.KERNEL_CMDLINE_NOT_ALLOWED,
        "kernel_cmdline[0]",
        cmdline.text,
    )
    assert f.expected == "matching /console=ttyS0,115200/"
    (f,) = evaluate_rules(
        state, EventLogRules(kernel_cmdline_exact=(cmdline.text + " init=/bin/sh",))
    )
    assert f.code == Code.KERNEL_CMDLINE_NOT_ALLOWED


def test_kernel_cmdline_rule_with_no_command_line_in_the_log(go_state: BootState) -> None:
    (f,) = evaluate_rules(go_state, EventLogRules(kernel_cmdline_exact=("quiet",)))
    assert (f.code, f.subject, f.got) == (Code.KERNEL_CMDLINE_NOT_ALLOWED, "kernel_cmdline", "none")


def test_kernel_cmdline_whose_digest_does_not_match_fails_even_if_its_text_is_allowed() -> None:
    state = extract_state(load("event-arch-linux.bin"))
    (cmdline,) = state.kernel_cmdlines
    (f,) = evaluate_rules(state, EventLogRules(kernel_cmdline_exact=(cmdline.text,)))
    assert f.code == Code.KERNEL_CMDLINE_NOT_ALLOWED and "not proven" in f.detail


def test_edited_grub_kernel_cmdline_is_not_verified() -> None:
    name = "event-bootorder.bin"
    log = load(name)
    events = list(log.events)
    i = next(i for i, e in enumerate(events) if e.data.startswith(b"kernel_cmdline: "))
    events[i] = replace(events[i], data=events[i].data.replace(b" ro ", b" rw "))
    tampered = parse_event_log(write_log(replace(log, events=tuple(events)), raw(name)))
    assert check_events(tampered) == []  # EV_IPL is not digest-checked …
    state = extract_state(tampered)
    (cmdline,) = state.kernel_cmdlines
    assert not cmdline.verified  # … but its text is not believed
    rules = EventLogRules(kernel_cmdline_regex=(r".*",))
    assert codes(evaluate_rules(state, rules)) == [Code.KERNEL_CMDLINE_NOT_ALLOWED]
    assert evaluate_rules(extract_state(log), rules) == []


def test_dbx_contains(go_state: BootState) -> None:
    assert go_state.dbx is not None
    present = sorted(go_state.dbx.sha256_hashes())[:2]
    assert evaluate_rules(go_state, EventLogRules(dbx_contains=frozenset(present))) == []
    missing = hashlib.sha256(b"a revoked shim").digest()
    (f,) = evaluate_rules(go_state, EventLogRules(dbx_contains=frozenset({*present, missing})))
    assert (f.code, f.subject, f.expected) == (Code.DBX_MISSING_HASH, "dbx", missing.hex())
    assert "77 EFI_CERT_SHA256" in f.got
    # No dbx measured at all: every required hash is missing.
    (f,) = evaluate_rules(
        extract_state(load("event.bin")), EventLogRules(dbx_contains=frozenset({missing}))
    )
    assert f.code == Code.DBX_MISSING_HASH and "not measured" in f.got


def test_forbidden_authorities(go_state: BootState) -> None:
    canonical = go_state.authorities[1].certificate
    assert canonical is not None
    unrelated = frozenset({hashlib.sha256(b"another CA").digest()})
    assert evaluate_rules(go_state, EventLogRules(forbidden_authorities=unrelated)) == []
    failures = evaluate_rules(
        go_state,
        EventLogRules(forbidden_authorities=frozenset({bytes.fromhex(canonical.fingerprint)})),
    )
    assert codes(failures) == [Code.FORBIDDEN_AUTHORITY] * 2
    assert [f.subject for f in failures] == ["authority[1]", "authority[2]"]
    assert failures[0].got == canonical.fingerprint
    assert "Canonical Ltd. Master Certificate Authority" in failures[0].detail


def test_an_edited_authority_fails_a_forbidden_authorities_rule() -> None:
    # Swapping the certificate in an authority event (digest kept) must not hide it.
    def edit(events: list[Event]) -> None:
        i = go_event(events, 12)
        data = bytearray(events[i].data)
        data[-20] ^= 0xFF  # inside the DER, past the subject
        events[i] = replace(events[i], data=bytes(data))

    state = extract_state(rebuilt(GO, edit))
    assert not state.authorities[1].verified
    rules = EventLogRules(forbidden_authorities=frozenset({hashlib.sha256(b"x").digest()}))
    (f,) = evaluate_rules(state, rules)
    assert (f.code, f.subject) == (Code.FORBIDDEN_AUTHORITY, "authority[1]")
    assert "not what was measured" in f.detail


def test_efi_action_logged_with_a_nul_it_did_not_hash_is_accepted() -> None:
    name = "event-bootorder.bin"
    log = load(name)
    events = list(log.events)
    i = next(i for i, e in enumerate(events) if e.type == EventType.EV_EFI_ACTION)
    events[i] = replace(events[i], data=events[i].data + b"\x00")
    tampered = parse_event_log(write_log(replace(log, events=tuple(events)), raw(name)))
    assert check_events(tampered) == []


def test_unparsable_pcr7_variable_that_was_not_measured_is_a_mismatch_not_an_error() -> None:
    def edit(events: list[Event]) -> None:
        i = go_event(events, 3)
        data = bytearray(events[i].data)
        struct.pack_into("<Q", data, 24, 2**40)  # VariableDataLength, digest left as it was
        events[i] = replace(events[i], data=bytes(data))

    log = rebuilt(GO, edit)
    assert codes(check_events(log)) == [Code.EVENT_DIGEST_MISMATCH] * 3
    assert extract_state(log).pk is None


def test_unparsable_authority_that_was_not_measured_is_kept_unverified() -> None:
    def edit(events: list[Event]) -> None:
        i = go_event(events, 8)
        events[i] = replace(events[i], data=b"\xff" * 40)

    state = extract_state(rebuilt(GO, edit))
    first = state.authorities[0]
    assert (first.variable, first.verified, first.certificate, first.data) == (
        "",
        False,
        None,
        "ff" * 40,
    )


def test_authority_relabelled_as_an_efi_action_is_retyped() -> None:
    # Both types hash their whole data, so only the data's shape gives it away.
    def edit(events: list[Event]) -> None:
        i = go_event(events, 12)
        events[i] = replace(events[i], type=EventType.EV_EFI_ACTION)

    log = rebuilt(GO, edit)
    failures = check_events(log)
    assert codes(failures) == [Code.EVENT_RETYPED]
    assert failures[0].subject == "event[12] pcr 7 EV_EFI_ACTION"
    assert [a.event for a in extract_state(log).authorities] == [8, 14]


def test_authority_relabelled_as_configuration_after_the_separator() -> None:
    def edit(events: list[Event]) -> None:
        i = go_event(events, 8)  # the firmware's db authority, after the separator
        events[i] = replace(events[i], type=EventType.EV_EFI_VARIABLE_DRIVER_CONFIG)

    (f,) = check_events(rebuilt(GO, edit))
    assert (f.code, f.got) == (Code.SECURE_BOOT_VARIABLE_AFTER_SEPARATOR, "db after it")

    def edit_shim(events: list[Event]) -> None:
        i = go_event(events, 12)  # old shim: its digest skips the last byte, so it shows too
        events[i] = replace(events[i], type=EventType.EV_EFI_VARIABLE_DRIVER_CONFIG)

    assert codes(check_events(rebuilt(GO, edit_shim))) == [Code.EVENT_DIGEST_MISMATCH] * 3


def test_authority_relabelled_as_configuration_before_the_separator() -> None:
    # A pre-separator db authority (an option ROM's) disguised as a second db measurement.
    def edit(events: list[Event]) -> None:
        authority = events.pop(go_event(events, 8))
        relabelled = replace(authority, type=EventType.EV_EFI_VARIABLE_DRIVER_CONFIG)
        events.insert(go_event(events, 7), relabelled)

    (f,) = check_events(rebuilt(GO, edit))
    assert (f.code, f.subject) == (
        Code.EVENT_RETYPED,
        "event[7] pcr 7 EV_EFI_VARIABLE_DRIVER_CONFIG",
    )
    assert f.got == "another after event[5]"


def test_grub_string_hashed_with_its_prefix_is_also_verified() -> None:
    name = "event-bootorder.bin"
    log = load(name)
    events = list(log.events)
    i = next(i for i, e in enumerate(events) if e.data.startswith(b"kernel_cmdline: "))
    events[i] = measured(events[i], events[i].data)  # now hashed with prefix and NUL
    with_nul = extract_state(
        parse_event_log(write_log(replace(log, events=tuple(events)), raw(name)))
    )
    assert not with_nul.kernel_cmdlines[0].verified  # the NUL is never part of the hash
    events[i] = replace(measured(events[i], events[i].data[:-1]), data=events[i].data)
    prefixed = extract_state(
        parse_event_log(write_log(replace(log, events=tuple(events)), raw(name)))
    )
    assert prefixed.kernel_cmdlines[0].verified
