"""docs/policy-authoring.md, executed: its policy files and its console session.

The doc's conventions, which these tests rely on:

- A ```yaml block whose first line is ``# file: NAME`` is a policy file the
  console examples may use. If its second line is ``# invalid: FIELD``, the
  file must be refused and the error must name FIELD; otherwise it must load.
- In a ```console block, ``$ `` starts a command (a trailing ``\\``
  continues it on the next line). A trailing ``# exit N`` is its expected exit
  status (else 0). The lines up to the next command are expected output:
  each must match a line of the real output (stdout, then stderr), in order,
  with ``…`` matching anything and runs of blanks matching any blanks.

The console blocks run in document order, in one directory holding the
files, through bash, with $SERVER and $DEVICE set to a real server and a
real enrolled swtpm device whose boot is the published policy 'default@1'.
Commands the doc runs on the device get that TPM: ``attestd-agent`` gets
``--tcti`` and ``--state-dir``, and ``tpm2_pcrread`` gets ``TPM2TOOLS_TCTI``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, Device, ServerThread
from tpmsim import SimTpm

from attestd.agent.tpm import DeviceTpm
from attestd.core.ear import decode_unverified
from attestd.core.errors import PolicyError
from attestd.core.policy import load_policy_text
from attestd.v1 import attestation_pb2, common_pb2, policy_pb2

pytestmark = pytest.mark.integration

DOC = REPO / "docs" / "policy-authoring.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
EXIT_MARK = re.compile(r"\s+#\s*exit\s+(\d+)\s*$")
AFFIRMING = common_pb2.VERDICT_STATUS_AFFIRMING
CONTRAINDICATED = common_pb2.VERDICT_STATUS_CONTRAINDICATED


@dataclass
class PolicyFile:
    name: str
    text: str
    invalid_field: str | None


@dataclass
class Step:
    command: str
    exit_code: int
    expected: list[str]


def blocks(kind: str) -> list[str]:
    return [body for lang, body in FENCE.findall(DOC.read_text()) if lang == kind]


def policy_files() -> list[PolicyFile]:
    files = []
    for body in blocks("yaml"):
        lines = body.splitlines()
        first = re.fullmatch(r"# file: (\S+)", lines[0])
        assert first, f"a yaml block without '# file: NAME' first:\n{body}"
        invalid = re.fullmatch(r"# invalid: (\S+)", lines[1]) if len(lines) > 1 else None
        files.append(PolicyFile(first[1], body, invalid[1] if invalid else None))
    names = [f.name for f in files]
    assert len(names) == len(set(names)), f"file names repeat: {names}"
    return files


def console_steps() -> list[Step]:
    steps: list[Step] = []
    for body in blocks("console"):
        lines = body.splitlines()
        assert lines[0].startswith("$ "), f"a console block must start with a command:\n{body}"
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                steps[-1].expected.append(lines[i])
                i += 1
                continue
            command = lines[i][2:]
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + lines[i].strip()
            mark = EXIT_MARK.search(command)
            steps.append(Step(command, int(mark[1]) if mark else 0, []))
            i += 1
    return steps


def normalize(line: str) -> str:
    return " ".join(line.split())


def line_pattern(expected: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in normalize(expected).split("…")))


def assert_output(step: Step, output: str) -> None:
    lines = [normalize(line) for line in output.splitlines()]
    at = 0
    for expected in step.expected:
        if not expected.strip():
            continue
        pattern = line_pattern(expected)
        while at < len(lines) and not pattern.fullmatch(lines[at]):
            at += 1
        assert at < len(lines), (
            f"$ {step.command}\nexpected (in order): {expected!r}\nreal output:\n{output}"
        )
        at += 1


# --- (1) the policy files -----------------------------------------------------


def test_doc_policy_files_load_or_are_refused_at_the_named_field() -> None:
    files = policy_files()
    assert any(f.invalid_field for f in files) and any(not f.invalid_field for f in files)
    for f in files:
        if f.invalid_field is None:
            policy = load_policy_text(f.text)
            assert policy.name, f.name
            continue
        with pytest.raises(PolicyError) as refused:
            load_policy_text(f.text)
        assert refused.value.field == f.invalid_field, f"{f.name}: {refused.value}"


def test_doc_console_examples_parse() -> None:
    steps = console_steps()
    assert steps and all(s.command.strip() for s in steps)
    words = {w for s in steps for w in shlex.split(s.command, comments=True)}
    # The console uses the policy files (legacy.yaml is shown for its SHA-1 bank only).
    unused = {f.name for f in policy_files() if not f.invalid_field} - words
    assert unused == {"legacy.yaml"}, unused


# --- (2) the console session ------------------------------------------------


def _on_device(command: str, tpm: SimTpm, state_dir: Path) -> str:
    agent = (
        f"attestd-agent --tcti {shlex.quote(tpm.tcti)} --state-dir {shlex.quote(str(state_dir))}"
    )
    return re.sub(r"^attestd-agent\b", agent, command)


def test_doc_console_session_runs(device: Device, server: ServerThread, tmp_path: Path) -> None:
    work = tmp_path / "doc"
    work.mkdir()
    for f in policy_files():
        (work / f.name).write_text(f.text)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "SERVER": server.address,
        "DEVICE": device.device_id,
        "TPM2TOOLS_TCTI": device.tpm.tcti,
        "TSS2_LOG": "all+none",
        # As the guide says: set once, the CA and a policy author's token serve every step.
        "ATTESTD_CA_CERT": str(server.ca_cert),
        "ATTESTD_TOKEN": server.tokens["policy-author"],
    }
    for step in console_steps():
        proc = subprocess.run(
            [
                "bash",
                "-o",
                "pipefail",
                "-c",
                _on_device(step.command, device.tpm, device.state_dir),
            ],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == step.exit_code, (
            f"$ {step.command}\nexit {proc.returncode}, the doc says {step.exit_code}\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
        assert_output(step, proc.stdout + proc.stderr)


# --- (3) "What publishing does to devices" ----------------------------------


def test_publishing_pins_in_flight_nonces_and_keeps_issued_credentials(
    device: Device, server: ServerThread
) -> None:
    first = device.agent.attest()
    assert first.verdict.status == AFFIRMING and first.credential
    # A nonce taken before publishing is pinned to default@1.
    grant = server.attestation.GetNonce(attestation_pb2.GetNonceRequest(device_id=device.device_id))
    assert (grant.policy_name, grant.policy_version) == ("default", 1)
    stricter = device.golden_policy()
    stricter["pcrs"]["sha256"][4] = (
        "f44efb0157453559f82838bae5526195317e3d5dfec2e089d0032bd1061ee4a0"
    )
    # Dry-run first: it names the device the stricter version would fail.
    dry = server.policy.DryRunPolicy(policy_pb2.DryRunPolicyRequest(document=json.dumps(stricter)))
    assert [(d.device_id, d.candidate_status) for d in dry.changed] == [
        (device.device_id, "contraindicated")
    ]
    assert server.put_policy(stricter, "kernel 6.1.1 only").version == 2
    # ... so the attestation in flight finishes under default@1.
    with DeviceTpm(device.tpm.tcti) as tpm:
        q = tpm.quote([(s.bank, list(s.indices)) for s in grant.pcr_selection], grant.nonce)
    in_flight = server.attestation.Attest(
        attestation_pb2.AttestRequest(
            device_id=device.device_id,
            nonce=grant.nonce,
            quote=q.attest,
            signature=q.signature,
            pcrs=[common_pb2.PcrBank(bank=b, values=v) for b, v in q.pcrs.items()],
        )
    )
    assert in_flight.verdict.status == AFFIRMING
    assert in_flight.verdict.policy_version == 1 and in_flight.credential
    # The next attestation uses default@2: contraindicated, no new credential.
    after = device.agent.attest()
    assert after.verdict.status == CONTRAINDICATED
    assert (after.verdict.policy_name, after.verdict.policy_version) == ("default", 2)
    assert [f.code for f in after.verdict.failures] == ["PCR_VALUE_NOT_ALLOWED"]
    assert not after.credential
    # The credentials already issued are untouched: they expire after the lifetime.
    claims = decode_unverified(in_flight.credential)
    assert claims["exp"] - claims["iat"] == server.config.credential_lifetime_s == 3600
    assert (device.state_dir / "credential.jwt").read_text() == first.credential
