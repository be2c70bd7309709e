"""`attestd eventlog replay|show|state` on the shared real logs, as a user runs them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "eventlogs"
LOGS = sorted(VECTORS.glob("*.bin"))
pytestmark = pytest.mark.skipif(not LOGS, reason="../shared/vectors not present")


def attestd(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "attestd"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)


def expected_pcrs(log: Path) -> dict[str, dict[str, str]]:
    """The final `pcrs:` block of tpm2_eventlog's YAML for this log."""
    text = (VECTORS / "expected" / f"{log.name}.yaml").read_text()
    block = text[text.rindex("\npcrs:") :]
    out: dict[str, dict[str, str]] = {}
    bank = ""
    for line in block.splitlines()[1:]:
        if m := re.match(r"^  (\w+):$", line):
            bank = m.group(1)
            out[bank] = {}
        elif m := re.match(r"^\s+(\d+)\s*:\s*0x([0-9a-fA-F]+)", line):
            out[bank][m.group(1)] = m.group(2).lower()
    return out


@pytest.mark.parametrize(
    "log",
    [p for p in LOGS if (VECTORS / "expected" / f"{p.name}.yaml").exists()],
    ids=lambda p: p.name,
)
def test_replay_json_is_exactly_the_expected_pcrs(log: Path) -> None:
    out = attestd("eventlog", "replay", str(log), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"pcrs": expected_pcrs(log)}


def test_replay_of_the_secure_boot_vector_gives_go_attestations_values() -> None:
    out = attestd(
        "eventlog", "replay", str(VECTORS / "go-attestation-sb_cert_eventlog.bin"), "--json"
    )
    sha1 = json.loads(out.stdout)["pcrs"]["sha1"]
    assert sha1["0"] == "51c323de0c0c694f4601cdd02beb58ff13629f74"
    assert sha1["4"] == "b771008d173c022bc16f4b4d1a7f8b99ed88eeb1"
    assert sha1["7"] == "45a8621d34a57df2b2e7f14c92b99ac8de7d5805"


def test_show_lists_events_and_state_reports_secure_boot() -> None:
    log = VECTORS / "go-attestation-sb_cert_eventlog.bin"
    out = attestd("eventlog", "show", str(log))
    assert out.returncode == 0 and "EV_EFI_VARIABLE_DRIVER_CONFIG" in out.stdout
    shown = json.loads(attestd("eventlog", "show", str(log), "--json").stdout)
    assert shown["format"] == "crypto-agile" and len(shown["events"]) == 14
    state = json.loads(attestd("eventlog", "state", str(log), "--json").stdout)
    assert state["secure_boot"] is True
    assert len(state["authorities"]) == 3
    assert state["findings"] == []


def test_malformed_log_exits_1_with_the_offset(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes((VECTORS / "event-arch-linux.bin").read_bytes()[:-5])
    out = attestd("eventlog", "replay", str(bad), "--json")
    assert out.returncode == 1
    assert "event_log" in out.stderr and "at byte" in out.stderr
    assert "Traceback" not in out.stderr
    assert attestd("eventlog", "replay", str(tmp_path / "missing.bin")).returncode == 2
