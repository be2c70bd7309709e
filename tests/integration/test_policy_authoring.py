"""Policy authoring through the real server and the real `attestd policy` / `attestd group`
commands: versions (publish, get, list, history, diff, rollback, delete), device groups
(pinned or following, by id, by rule on enrollment facts, the default group), golden capture,
tpm2_pcrread import, dry-run, and the refusals, each naming its field and code.

Where the issue names a command, each operation is driven through the gRPC API and the CLI,
and both must give the same result. The CLI runs in-process through the console script's own
main() (see ``cli``); the story and a few publishes run the installed commands. Devices are
swtpm machines; each test reuses its few.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import yaml
from google.protobuf.json_format import MessageToDict
from testclients import cli_environment, run_cli

from attestd.agent.tpm import DEFAULT_AK_HANDLE, DeviceTpm, Quote
from attestd.cli import main as attestd_main
from attestd.core.policy import Policy, load_policy_text
from attestd.core.tpm import Bank
from attestd.v1 import attestation_pb2, common_pb2, enrollment_pb2, policy_pb2

if TYPE_CHECKING:
    from conftest import Device, ServerThread

# This module uses the integration fixtures but imports nothing from tests/integration/conftest.py
# by name: collected in one run with tests/unit (`pytest this-file tests/unit/...`), the module
# `conftest` is tests/unit/conftest.py. So the three small helpers below are its own.

pytestmark = pytest.mark.integration

AFFIRMING = common_pb2.VERDICT_STATUS_AFFIRMING
CONTRAINDICATED = common_pb2.VERDICT_STATUS_CONTRAINDICATED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXISTS = grpc.StatusCode.ALREADY_EXISTS

A, B, C, E = ("aa" * 32, "bb" * 32, "cc" * 32, "ee" * 32)
S1 = "11" * 20


# --- helpers ------------------------------------------------------------------


def rpc_code(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """(status, attestd-code) of a failed call."""
    assert isinstance(exc, grpc.Call)
    return exc.code(), dict(exc.trailing_metadata() or ()).get("attestd-code", "")


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def doc(name: str = "lab", pcrs: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "pcrs": pcrs if pcrs is not None else {"sha256": {0: A}}, **extra}


def by(declared: str) -> str:
    """How a policy's author reads: as declared, and the authenticated caller."""
    return f"{declared} (test-policy-author)"


def put(
    server: ServerThread, document: dict[str, Any], note: str = "test", author: str = "tests"
) -> policy_pb2.PolicyInfo:
    info: policy_pb2.PolicyInfo = server.policy.PutPolicy(
        policy_pb2.PutPolicyRequest(document=json.dumps(document), change_note=note, author=author)
    )
    return info


def refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, str]:
    """(status, attestd-code, message) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    status, code = rpc_code(info.value)
    assert isinstance(info.value, grpc.Call)
    return status, code, info.value.details() or ""


def cli(server: ServerThread, *args: str) -> subprocess.CompletedProcess[str]:
    """``attestd ARGS --server ADDR``, in-process: the console script calls this same main().

    A subprocess costs ~0.4 s of interpreter start per command, and this file runs about a
    hundred; the real command (``run_cli``) is run in the story and for publishing.
    """
    argv = [*args, "--server", server.address]
    out, err = io.StringIO(), io.StringIO()
    with (
        cli_environment(argv),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code = attestd_main(argv)
        except SystemExit as e:  # argparse refusing the arguments
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(["attestd", *argv], code, out.getvalue(), err.getvalue())


def ok(server: ServerThread, *args: str) -> str:
    proc = cli(server, *args)
    assert proc.returncode == 0, f"{args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def cli_refused(server: ServerThread, code: str, *args: str) -> str:
    """The command exits 1 (refused by the server) and names the reason code."""
    proc = cli(server, *args)
    assert proc.returncode == 1, f"{args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert code in proc.stderr, proc.stderr
    return proc.stderr


def as_dict(message: Any) -> dict[str, Any]:
    """What the CLI's --json prints for a response."""
    out: dict[str, Any] = MessageToDict(message, preserving_proto_field_name=True)
    return out


def versions(server: ServerThread, name: str) -> list[int]:
    history = server.policy.PolicyHistory(policy_pb2.PolicyHistoryRequest(name=name))
    return [p.version for p in history.policies]


def placement(server: ServerThread, device_id: str) -> tuple[str, str, str, int]:
    """(group, group_source, effective policy name, effective version) as GetDevice says."""
    info = server.devices.GetDevice(enrollment_pb2.GetDeviceRequest(device_id=device_id))
    return (
        info.group,
        info.group_source,
        info.effective_policy_name,
        info.effective_policy_version,
    )


def create_group(
    server: ServerThread, name: str, policy: str, version: int = 0, **kw: Any
) -> policy_pb2.Group:
    group: policy_pb2.Group = server.policy.CreateGroup(
        policy_pb2.CreateGroupRequest(name=name, policy_name=policy, policy_version=version, **kw)
    )
    return group


def assign(server: ServerThread, group: str, *device_ids: str) -> policy_pb2.Group:
    resp = server.policy.AssignDevices(
        policy_pb2.AssignDevicesRequest(group=group, device_ids=list(device_ids))
    )
    out: policy_pb2.Group = resp.group
    return out


def dry_run(server: ServerThread, **kw: Any) -> policy_pb2.DryRunPolicyResponse:
    resp: policy_pb2.DryRunPolicyResponse = server.policy.DryRunPolicy(
        policy_pb2.DryRunPolicyRequest(**kw)
    )
    return resp


def changes(resp: policy_pb2.DryRunPolicyResponse) -> list[tuple[str, str, str, str]]:
    return [(d.device_id, d.group, d.current_status, d.candidate_status) for d in resp.changed]


def sha256_pcrs(policy: Policy) -> dict[int, frozenset[bytes]]:
    return dict(policy.pcrs[Bank.SHA256])


def tpm_values(dev: Device) -> dict[int, frozenset[bytes]]:
    return {i: frozenset({d}) for i, d in dev.tpm.pcrs()["sha256"].items()}


def allowing_also(golden: dict[str, Any], index: int, digest: str) -> dict[str, Any]:
    """``golden`` with one more allowed value for sha256 PCR ``index``."""
    out = copy.deepcopy(golden)
    out["pcrs"]["sha256"][index] = [golden["pcrs"]["sha256"][index], digest]
    return out


def send_quote(
    server: ServerThread,
    device_id: str,
    nonce: bytes,
    quote: Quote,
    pcrs: dict[str, dict[int, bytes]],
) -> attestation_pb2.AttestResponse:
    """Attest with a quote made by hand (the agent would never send a bad one)."""
    resp: attestation_pb2.AttestResponse = server.attestation.Attest(
        attestation_pb2.AttestRequest(
            device_id=device_id,
            nonce=nonce,
            quote=quote.attest,
            signature=quote.signature,
            pcrs=[common_pb2.PcrBank(bank=b, values=v) for b, v in pcrs.items()],
        )
    )
    return resp


def tamper(dev: Device) -> str:
    """Reboot with one extra event in PCR 4; returns PCR 4's new sha256 value (hex)."""
    dev.tpm.powercycle()
    dev.tpm.boot(tamper=True)
    return dev.tpm.pcrs()["sha256"][4].hex()


# --- versions -----------------------------------------------------------------


def test_publish_numbers_versions_records_author_and_note_and_reads_them_back(
    server: ServerThread, tmp_path: Path
) -> None:
    v1_doc = doc(pcrs={"sha256": {0: A}})
    v1 = put(server, v1_doc, note="first cut", author="alice")
    # The author is the authenticated caller, with the name it declared.
    assert (v1.name, v1.version, v1.author, v1.change_note) == ("lab", 1, by("alice"), "first cut")
    assert v1.created_at_ms > 0
    assert v1.digest == load_policy_text(json.dumps(v1_doc)).digest()

    # Version 2 through the installed command, with its own author and note.
    f2 = write_yaml(tmp_path / "v2.yaml", doc(pcrs={"sha256": {0: [A, B]}}))
    args = ("policy", "put", str(f2), "-m", "second cut", "--author", "bob")
    out = run_cli(*args, "--server", server.address, check=True).stdout
    assert "published policy lab@2" in out
    # Version 3 through the CLI, default author USER@HOST.
    v3_doc = doc(pcrs={"sha256": {0: [A, B], 1: C}})
    f3 = write_yaml(tmp_path / "v3.yaml", v3_doc)
    v3 = json.loads(ok(server, "policy", "put", str(f3), "-m", "third cut", "--json"))
    assert (v3["name"], v3["version"], v3["change_note"]) == ("lab", 3, "third cut")
    assert "@" in v3["author"]

    # The same content again is no new version: the latest comes back unchanged.
    again = put(server, v3_doc, note="again", author="eve")
    assert (again.version, again.digest, again.change_note) == (3, v3["digest"], "third cut")
    assert "lab@3" in ok(server, "policy", "put", str(f3), "-m", "again")
    assert versions(server, "lab") == [1, 2, 3]

    # A change note is required: refused, naming change_note, nothing written.
    f4 = write_yaml(tmp_path / "v4.yaml", doc(pcrs={"sha256": {0: E}}))
    for note in ("", "   "):
        status, code, msg = refused(lambda n=note: put(server, doc(pcrs={"sha256": {0: E}}), n))
        assert (status, code) == (INVALID, "MALFORMED")
        assert msg.startswith("change_note")
    err = cli_refused(server, "MALFORMED", "policy", "put", str(f4))
    assert "change_note" in err
    status, code, msg = refused(lambda: put(server, doc(pcrs={"sha256": {0: E}}), "x" * 1025))
    assert (status, code) == (INVALID, "MALFORMED") and msg.startswith("change_note")
    assert versions(server, "lab") == [1, 2, 3]
    # Without a declared author, the authenticated caller's name stands alone.
    anonymous = put(server, doc("anon"), note="who?", author="")
    assert (
        anonymous.author
        == "test-policy-author"
        == server.policy.GetPolicy(policy_pb2.GetPolicyRequest(name="anon@1")).info.author
    )
    # An empty document is refused, naming the document.
    status, code, msg = refused(
        lambda: server.policy.PutPolicy(
            policy_pb2.PutPolicyRequest(document="", change_note="empty")
        )
    )
    assert (status, code) == (INVALID, "POLICY_INVALID") and msg.startswith("document")

    # Get: the latest, or NAME@N; the document's SHA-256 is the digest.
    latest = server.policy.GetPolicy(policy_pb2.GetPolicyRequest(name="lab"))
    assert latest.info.version == 3
    assert hashlib.sha256(latest.document.encode()).hexdigest() == latest.info.digest
    first = server.policy.GetPolicy(policy_pb2.GetPolicyRequest(name="lab@1"))
    assert (first.info.version, first.info.author, first.info.change_note) == (
        1,
        by("alice"),
        "first cut",
    )
    assert json.loads(first.document)["pcrs"] == {"sha256": {"0": [A]}}
    shown = json.loads(ok(server, "policy", "get", "lab@2", "--json"))
    assert shown["pcrs"] == {"sha256": {"0": [A, B]}}
    text = ok(server, "policy", "get", "lab")
    assert text.startswith(f"# lab@3 sha256:{v3['digest']}\n")
    assert "third cut" in text.splitlines()[1]
    assert load_policy_text(text).digest() == v3["digest"]
    assert refused(lambda: server.policy.GetPolicy(policy_pb2.GetPolicyRequest(name="lab@9")))[
        :2
    ] == (NOT_FOUND, "POLICY_UNKNOWN")
    for bad in ("lab@0", "lab@x", "@1"):
        assert refused(lambda b=bad: server.policy.GetPolicy(policy_pb2.GetPolicyRequest(name=b)))[
            :2
        ] == (INVALID, "MALFORMED")
    cli_refused(server, "POLICY_UNKNOWN", "policy", "get", "lab@9")

    # List: the latest version of every policy, by name.
    put(server, doc("other"), note="another")
    listed = server.policy.ListPolicies(policy_pb2.ListPoliciesRequest())
    assert [(p.name, p.version) for p in listed.policies] == [
        ("anon", 1),
        ("lab", 3),
        ("other", 1),
    ]
    lines = ok(server, "policy", "list").splitlines()
    assert [line.split("\t")[0] for line in lines] == ["anon@1", "lab@3", "other@1"]
    assert json.loads(ok(server, "policy", "list", "--json")) == as_dict(listed)

    # History: every version, oldest first, with who and why.
    history = server.policy.PolicyHistory(policy_pb2.PolicyHistoryRequest(name="lab"))
    assert [(p.version, p.author, p.change_note) for p in history.policies] == [
        (1, by("alice"), "first cut"),
        (2, by("bob"), "second cut"),
        (3, v3["author"], "third cut"),
    ]
    assert json.loads(ok(server, "policy", "history", "lab", "--json")) == as_dict(history)
    lines = ok(server, "policy", "history", "lab").splitlines()
    assert [line.split("\t")[0] for line in lines] == ["lab@1", "lab@2", "lab@3"]
    assert lines[1].endswith(f"\t{by('bob')}\tsecond cut")
    assert refused(
        lambda: server.policy.PolicyHistory(policy_pb2.PolicyHistoryRequest(name="nope"))
    )[:2] == (NOT_FOUND, "POLICY_UNKNOWN")
    cli_refused(server, "POLICY_UNKNOWN", "policy", "history", "nope")


def test_diff_lists_digests_per_bank_and_pcr_and_changed_settings(
    server: ServerThread,
) -> None:
    put(server, doc(pcrs={"sha256": {0: A, 1: B}}), note="v1")
    put(
        server,
        doc(
            allow_sha1=True,
            pcrs={"sha1": {0: S1}, "sha256": {0: [A, C], 2: E}},
            eventlog={"require_secure_boot": True, "kernel_cmdline": {"regex": ["ro .*"]}},
        ),
        note="v2",
    )
    put(
        server,
        doc(
            allow_sha1=True,
            pcrs={"sha1": {0: S1}, "sha256": {0: [A, C], 2: E}},
            eventlog={"kernel_cmdline": {"regex": ["ro quiet .*"]}, "boot_applications": [B]},
        ),
        note="v3",
    )

    def diff(old: str, new: str) -> policy_pb2.PolicyDiff:
        out: policy_pb2.PolicyDiff = server.policy.DiffPolicies(
            policy_pb2.DiffPoliciesRequest(to=new, **{"from": old})
        )
        return out

    def settings(d: policy_pb2.PolicyDiff) -> dict[str, tuple[Any, Any]]:
        return {s.field: (json.loads(getattr(s, "from")), json.loads(s.to)) for s in d.settings}

    d12 = diff("lab@1", "lab@2")
    assert (getattr(d12, "from").version, d12.to.version) == (1, 2)
    assert [(c.bank, c.index, list(c.added), list(c.removed)) for c in d12.pcrs] == [
        ("sha1", 0, [S1], []),  # a bank only in v2
        ("sha256", 0, [C], []),
        ("sha256", 1, [], [B]),  # a PCR only in v1
        ("sha256", 2, [E], []),  # a PCR only in v2
    ]
    assert settings(d12) == {
        "allow_sha1": (False, True),
        "eventlog.require_secure_boot": (None, True),
        "eventlog.kernel_cmdline.regex": (None, ["ro .*"]),
    }
    # The other way round, everything swaps.
    d21 = diff("lab@2", "lab@1")
    assert [(c.bank, c.index, list(c.added), list(c.removed)) for c in d21.pcrs] == [
        ("sha1", 0, [], [S1]),
        ("sha256", 0, [], [C]),
        ("sha256", 1, [B], []),
        ("sha256", 2, [], [E]),
    ]
    assert settings(d21)["allow_sha1"] == (True, False)
    # Changed event-log rules only: no PCR changes.
    d23 = diff("lab@2", "lab@3")
    assert list(d23.pcrs) == []
    assert settings(d23) == {
        "eventlog.require_secure_boot": (True, None),
        "eventlog.kernel_cmdline.regex": (["ro .*"], ["ro quiet .*"]),
        "eventlog.boot_applications": (None, [B]),
    }

    # The CLI says the same, as text and as JSON.
    out = ok(server, "policy", "diff", "lab@1", "lab@2")
    assert out.splitlines() == [
        "--- lab@1",
        "+++ lab@2",
        "pcr sha1:0",
        f"  + {S1}",
        "pcr sha256:0",
        f"  + {C}",
        "pcr sha256:1",
        f"  - {B}",
        "pcr sha256:2",
        f"  + {E}",
        "allow_sha1: false -> true",
        'eventlog.kernel_cmdline.regex: null -> ["ro .*"]',
        "eventlog.require_secure_boot: null -> true",
    ]
    assert json.loads(ok(server, "policy", "diff", "lab@2", "lab@3", "--json")) == as_dict(d23)
    assert ok(server, "policy", "diff", "lab@3", "lab@3").splitlines()[-1] == "(no differences)"

    # Across two policies' versions, too.
    put(server, doc("other", pcrs={"sha256": {0: A, 1: B}}, description="same values"))
    d = diff("lab@1", "other@1")
    assert list(d.pcrs) == []
    assert settings(d) == {"description": ("", "same values")}

    # Refusals: both sides need NAME@VERSION, and it must exist.
    status, code, msg = refused(lambda: diff("lab", "lab@2"))
    assert (status, code) == (INVALID, "MALFORMED") and msg.startswith("from")
    status, code, msg = refused(lambda: diff("lab@1", "lab"))
    assert (status, code) == (INVALID, "MALFORMED") and msg.startswith("to")
    assert refused(lambda: diff("lab@1", "lab@9"))[:2] == (NOT_FOUND, "POLICY_UNKNOWN")
    cli_refused(server, "MALFORMED", "policy", "diff", "lab", "lab@2")
    cli_refused(server, "POLICY_UNKNOWN", "policy", "diff", "lab@1", "nope@1")


def test_rollback_publishes_an_old_version_as_the_newest(server: ServerThread) -> None:
    v1 = put(server, doc(pcrs={"sha256": {0: A}}), note="good")
    v2 = put(server, doc(pcrs={"sha256": {0: B}}), note="broken")

    rb = server.policy.RollbackPolicy(
        policy_pb2.RollbackPolicyRequest(
            name="lab@1", change_note="v2 bricks the lab", author="carol"
        )
    )
    assert (rb.name, rb.version, rb.author) == ("lab", 3, by("carol"))
    assert rb.digest == v1.digest != v2.digest
    assert "rollback" in rb.change_note
    assert "lab@1" in rb.change_note and "v2 bricks the lab" in rb.change_note
    latest = server.policy.GetPolicy(policy_pb2.GetPolicyRequest(name="lab"))
    old = server.policy.GetPolicy(policy_pb2.GetPolicyRequest(name="lab@1"))
    assert latest.document == old.document and latest.info.version == 3

    out = ok(server, "policy", "rollback", "lab@2", "-m", "retry v2", "--author", "dan")
    assert "lab@4" in out
    latest = server.policy.GetPolicy(policy_pb2.GetPolicyRequest(name="lab"))
    assert (latest.info.version, latest.info.digest, latest.info.author) == (
        4,
        v2.digest,
        by("dan"),
    )
    assert "rollback" in latest.info.change_note and "lab@2" in latest.info.change_note
    assert versions(server, "lab") == [1, 2, 3, 4]

    def rollback(name: str, note: str = "why") -> object:
        return server.policy.RollbackPolicy(
            policy_pb2.RollbackPolicyRequest(name=name, change_note=note)
        )

    status, code, msg = refused(lambda: rollback("lab"))
    assert (status, code) == (INVALID, "MALFORMED") and msg.startswith("name")
    status, code, msg = refused(lambda: rollback("lab@1", " "))
    assert (status, code) == (INVALID, "MALFORMED") and msg.startswith("change_note")
    assert refused(lambda: rollback("lab@9"))[:2] == (NOT_FOUND, "POLICY_UNKNOWN")
    assert cli(server, "policy", "rollback", "lab@1").returncode == 2  # -m is required
    cli_refused(server, "POLICY_UNKNOWN", "policy", "rollback", "lab@9", "-m", "why")
    assert versions(server, "lab") == [1, 2, 3, 4]


def test_delete_refused_while_in_use_then_gone_and_numbers_never_reused(
    server: ServerThread,
) -> None:
    def delete(name: str) -> object:
        return server.policy.DeletePolicy(policy_pb2.DeletePolicyRequest(name=name))

    def get(ref: str) -> object:
        return server.policy.GetPolicy(policy_pb2.GetPolicyRequest(name=ref))

    # The server's default policy (for devices in no group) cannot go.
    put(server, doc("default"), note="fleet default")
    assert refused(lambda: delete("default"))[:2] == (PRECONDITION, "POLICY_IN_USE")
    cli_refused(server, "POLICY_IN_USE", "policy", "delete", "default")

    put(server, doc(pcrs={"sha256": {0: A}}), note="v1")
    put(server, doc(pcrs={"sha256": {0: B}}), note="v2")
    create_group(server, "lab-boxes", "lab", 1)
    status, code, msg = refused(lambda: delete("lab"))
    assert (status, code) == (PRECONDITION, "POLICY_IN_USE") and "lab-boxes" in msg
    cli_refused(server, "POLICY_IN_USE", "policy", "delete", "lab")
    assert versions(server, "lab") == [1, 2]

    server.policy.DeleteGroup(policy_pb2.DeleteGroupRequest(name="lab-boxes"))
    assert ok(server, "policy", "delete", "lab").strip() == "deleted policy lab"
    for ref in ("lab", "lab@1", "lab@2"):
        assert refused(lambda r=ref: get(r))[:2] == (NOT_FOUND, "POLICY_UNKNOWN")
    cli_refused(server, "POLICY_UNKNOWN", "policy", "get", "lab@1")
    assert refused(
        lambda: server.policy.PolicyHistory(policy_pb2.PolicyHistoryRequest(name="lab"))
    )[:2] == (NOT_FOUND, "POLICY_UNKNOWN")
    listed = server.policy.ListPolicies(policy_pb2.ListPoliciesRequest())
    assert [p.name for p in listed.policies] == ["default"]
    assert refused(lambda: create_group(server, "again", "lab"))[:2] == (
        NOT_FOUND,
        "POLICY_UNKNOWN",
    )
    assert refused(lambda: delete("lab"))[:2] == (NOT_FOUND, "POLICY_UNKNOWN")

    # Publishing the name again starts after the highest number ever used.
    again = put(server, doc(pcrs={"sha256": {0: A}}), note="back")
    assert again.version == 3
    assert versions(server, "lab") == [3]
    assert refused(lambda: get("lab@1"))[:2] == (NOT_FOUND, "POLICY_UNKNOWN")


# --- device groups ------------------------------------------------------------


def test_groups_pinned_or_following_assignment_device_show_and_nonce(
    device: Device, device_factory: Callable[..., Device], server: ServerThread
) -> None:
    dev1, dev2 = device, device_factory()
    id1, id2 = dev1.device_id, dev2.device_id
    golden = dev1.golden_policy("lab")
    put(server, golden, note="golden v1")

    pinned = create_group(server, "pinned", "lab", 1, description="frozen")
    assert (pinned.name, pinned.policy_name, pinned.policy_version) == ("pinned", "lab", 1)
    assert not pinned.is_default and pinned.created_at_ms > 0 and list(pinned.device_ids) == []
    out = ok(server, "group", "create", "following", "--policy", "lab", "--description", "latest")
    assert out.splitlines()[0] == "group following: policy lab (latest)"

    # Refusals: duplicate name, unknown policy or version; nothing created.
    status, code, msg = refused(lambda: create_group(server, "pinned", "lab"))
    assert (status, code) == (EXISTS, "GROUP_EXISTS") and msg.startswith("name")
    cli_refused(server, "GROUP_EXISTS", "group", "create", "pinned", "--policy", "lab")
    status, code, msg = refused(lambda: create_group(server, "x", "nope"))
    assert (status, code) == (NOT_FOUND, "POLICY_UNKNOWN") and msg.startswith("policy_name")
    assert refused(lambda: create_group(server, "x", "lab", 7))[:2] == (
        NOT_FOUND,
        "POLICY_UNKNOWN",
    )
    cli_refused(server, "POLICY_UNKNOWN", "group", "create", "x", "--policy", "lab@7")
    groups = server.policy.ListGroups(policy_pb2.ListGroupsRequest())
    assert [g.name for g in groups.groups] == ["following", "pinned"]

    # In no group yet: the server's default policy applies.
    assert placement(server, id1) == ("", "none", "default", 1)

    # Assign by id, through the API and the CLI.
    assert list(assign(server, "pinned", id1).device_ids) == [id1]
    out = ok(server, "group", "assign", "following", id2)
    assert f"device {id2}" in out
    # All or nothing: one unknown id and no device moves.
    status, code, msg = refused(lambda: assign(server, "pinned", id2, "dev-nope"))
    assert (status, code) == (NOT_FOUND, "DEVICE_UNKNOWN")
    assert msg.startswith("device_ids") and "dev-nope" in msg
    cli_refused(server, "DEVICE_UNKNOWN", "group", "assign", "pinned", id2, "dev-nope")
    assert placement(server, id2)[:2] == ("following", "assigned")
    get_pinned = server.policy.GetGroup(policy_pb2.GetGroupRequest(name="pinned"))
    assert list(get_pinned.device_ids) == [id1]
    status, code, msg = refused(lambda: assign(server, "nope", id1))
    assert (status, code) == (NOT_FOUND, "GROUP_UNKNOWN") and msg.startswith("group")

    # Version 2 moves the following group only; GetNonce and Attest follow suit.
    v2 = put(server, allowing_also(golden, 0, A), note="also allow a firmware update")
    assert v2.version == 2
    assert placement(server, id1) == ("pinned", "assigned", "lab", 1)
    assert placement(server, id2) == ("following", "assigned", "lab", 2)
    for dev, version in ((dev1, 1), (dev2, 2)):
        nonce = server.attestation.GetNonce(
            attestation_pb2.GetNonceRequest(device_id=dev.device_id)
        )
        assert (nonce.policy_name, nonce.policy_version) == ("lab", version)
        assert [(s.bank, list(s.indices)) for s in nonce.pcr_selection] == [
            ("sha256", list(range(10)))
        ]
        verdict = dev.agent.attest().verdict
        assert verdict.status == AFFIRMING
        assert (verdict.policy_name, verdict.policy_version) == ("lab", version)

    # device show: group, why, and the effective version (API above, CLI here).
    lines = ok(server, "device", "show", id2).splitlines()
    assert "group       following (assigned)" in lines
    assert "policy      lab@2" in lines
    shown = json.loads(ok(server, "device", "show", id1, "--json"))
    assert (shown["group"], shown["group_source"]) == ("pinned", "assigned")
    assert (shown["effective_policy_name"], shown["effective_policy_version"]) == ("lab", 1)

    # Pinning the group to a narrower policy changes the selection GetNonce asks for.
    narrow = {
        "name": "narrow",
        "pcrs": {"sha256": {i: golden["pcrs"]["sha256"][i] for i in (0, 1, 2, 3)}},
    }
    put(server, narrow, note="only the firmware PCRs")
    out = ok(server, "group", "update", "pinned", "--policy", "narrow@1")
    assert out.splitlines() == ["group pinned: policy narrow@1", f"  device {id1}"]
    nonce = server.attestation.GetNonce(attestation_pb2.GetNonceRequest(device_id=id1))
    assert (nonce.policy_name, nonce.policy_version) == ("narrow", 1)
    assert [(s.bank, list(s.indices)) for s in nonce.pcr_selection] == [("sha256", [0, 1, 2, 3])]
    verdict = dev1.agent.attest().verdict
    assert (verdict.status, verdict.policy_name) == (AFFIRMING, "narrow")
    listed = json.loads(ok(server, "group", "list", "--json"))
    assert listed == as_dict(server.policy.ListGroups(policy_pb2.ListGroupsRequest()))
    assert [(g["name"], g["device_ids"]) for g in listed["groups"]] == [
        ("following", [id2]),
        ("pinned", [id1]),
    ]

    # A group with devices assigned by id cannot be deleted.
    delete = server.policy.DeleteGroup
    status, code, msg = refused(lambda: delete(policy_pb2.DeleteGroupRequest(name="pinned")))
    assert (status, code) == (PRECONDITION, "GROUP_IN_USE") and "1 assigned" in msg
    cli_refused(server, "GROUP_IN_USE", "group", "delete", "following")
    # Moving its device out empties it; then it can go.
    assert sorted(assign(server, "following", id1).device_ids) == sorted([id1, id2])
    assert ok(server, "group", "delete", "pinned").strip() == "deleted group pinned"
    assert refused(lambda: server.policy.GetGroup(policy_pb2.GetGroupRequest(name="pinned")))[
        :2
    ] == (NOT_FOUND, "GROUP_UNKNOWN")
    assert placement(server, id1) == ("following", "assigned", "lab", 2)


def test_groups_by_rule_on_enrollment_facts_and_the_default_group(
    server_factory: Callable[..., ServerThread], device_factory: Callable[..., Device]
) -> None:
    srv = server_factory(default_group="lab")
    dev = device_factory(target=srv)
    put(srv, dev.golden_policy("default"), note="server default")
    put(srv, dev.golden_policy("lab-policy"), note="lab")
    put(srv, dev.golden_policy("by-issuer"), note="by issuer")
    facts = srv.devices.GetDevice(enrollment_pb2.GetDeviceRequest(device_id=dev.device_id))
    issuer, manufacturer, model = facts.ek_cert_issuer, facts.tpm_manufacturer, facts.tpm_model
    assert issuer and manufacturer and model

    # No group named "lab" yet: no group, the server's default policy.
    assert placement(srv, dev.device_id) == ("", "none", "default", 1)
    lab = create_group(srv, "lab", "lab-policy")
    assert lab.is_default
    assert placement(srv, dev.device_id) == ("lab", "default", "lab-policy", 1)
    assert ok(srv, "group", "get", "lab").splitlines()[0] == (
        "group lab (default): policy lab-policy (latest)"
    )
    # A device enrolled now lands in the default group at once.
    new = device_factory(target=srv)
    assert placement(srv, new.device_id) == ("lab", "default", "lab-policy", 1)
    assert "group       lab (default)" in ok(srv, "device", "show", new.device_id).splitlines()
    # The default group cannot be deleted.
    status, code, _ = refused(
        lambda: srv.policy.DeleteGroup(policy_pb2.DeleteGroupRequest(name="lab"))
    )
    assert (status, code) == (PRECONDITION, "GROUP_IS_DEFAULT")
    cli_refused(srv, "GROUP_IS_DEFAULT", "group", "delete", "lab")

    # Every non-empty field of a rule must match: these do not.
    rule = policy_pb2.GroupRule
    create_group(
        srv,
        "a-mismatch",
        "lab-policy",
        rules=[rule(tpm_model=model + "-x"), rule(ek_cert_issuer=issuer, tpm_model="other")],
    )
    assert placement(srv, dev.device_id)[:2] == ("lab", "default")
    # Manufacturer and model both matching: claimed by rule, over the default group.
    create_group(
        srv, "m-model", "lab-policy", rules=[rule(tpm_manufacturer=manufacturer, tpm_model=model)]
    )
    assert placement(srv, dev.device_id)[:2] == ("m-model", "rule")
    assert placement(srv, new.device_id)[:2] == ("m-model", "rule")
    # A rule on the EK certificate issuer, through the CLI; b-issuer sorts before m-model,
    # so it is the first matching group by name.
    out = ok(
        srv, "group", "create", "b-issuer", "--policy", "by-issuer", "--rule", f"issuer={issuer}"
    )
    assert f"  rule ek_cert_issuer={issuer}" in out.splitlines()
    got = srv.policy.GetGroup(policy_pb2.GetGroupRequest(name="b-issuer"))
    assert list(got.rules) == [rule(ek_cert_issuer=issuer)]
    assert placement(srv, dev.device_id) == ("b-issuer", "rule", "by-issuer", 1)
    # Assignment by id beats any rule.
    create_group(srv, "z-assigned", "lab-policy")
    assign(srv, "z-assigned", new.device_id)
    assert placement(srv, new.device_id)[:2] == ("z-assigned", "assigned")
    assert placement(srv, dev.device_id)[:2] == ("b-issuer", "rule")
    # The device attests against the policy of the group its rule put it in.
    verdict = dev.agent.attest().verdict
    assert (verdict.status, verdict.policy_name) == (AFFIRMING, "by-issuer")

    # A rule must name at least one fact.
    status, code, msg = refused(lambda: create_group(srv, "empty", "lab-policy", rules=[rule()]))
    assert (status, code) == (INVALID, "MALFORMED") and msg.startswith("rules[0]")
    for spec in ("model=", "colour=red", "model"):
        proc = cli(srv, "group", "create", "bad", "--policy", "lab-policy", "--rule", spec)
        assert proc.returncode == 2, (spec, proc.stderr)
    names = [g.name for g in srv.policy.ListGroups(policy_pb2.ListGroupsRequest()).groups]
    assert names == ["a-mismatch", "b-issuer", "lab", "m-model", "z-assigned"]

    # Unassigning (all or nothing) hands a device back to the rules.
    status, code, msg = refused(
        lambda: srv.policy.UnassignDevices(
            policy_pb2.UnassignDevicesRequest(device_ids=[new.device_id, dev.device_id])
        )
    )
    assert (status, code) == (NOT_FOUND, "NOT_ASSIGNED") and msg.startswith("device_ids")
    assert dev.device_id in msg
    assert placement(srv, new.device_id)[:2] == ("z-assigned", "assigned")
    assert refused(lambda: srv.policy.UnassignDevices(policy_pb2.UnassignDevicesRequest()))[:2] == (
        INVALID,
        "MALFORMED",
    )
    ok(srv, "group", "unassign", new.device_id)
    assert placement(srv, new.device_id)[:2] == ("b-issuer", "rule")
    cli_refused(srv, "NOT_ASSIGNED", "group", "unassign", new.device_id)
    assert list(srv.policy.GetGroup(policy_pb2.GetGroupRequest(name="z-assigned")).device_ids) == []

    # A group that claims only by rule can be deleted; its devices fall back.
    srv.policy.DeleteGroup(policy_pb2.DeleteGroupRequest(name="b-issuer"))
    assert placement(srv, dev.device_id)[:2] == ("m-model", "rule")
    # group update changes only what is given: the rules stay with a new description ...
    out = ok(srv, "group", "update", "m-model", "--description", "simulated TPMs")
    assert f"  rule tpm_manufacturer={manufacturer}, tpm_model={model}" in out.splitlines()
    got = srv.policy.GetGroup(policy_pb2.GetGroupRequest(name="m-model"))
    assert (got.description, got.policy_name, got.policy_version) == (
        "simulated TPMs",
        "lab-policy",
        0,
    )
    assert placement(srv, dev.device_id)[:2] == ("m-model", "rule")
    # ... and --rule replaces them all, which moves devices too.
    ok(srv, "group", "update", "m-model", "--rule", "model=other")
    got = srv.policy.GetGroup(policy_pb2.GetGroupRequest(name="m-model"))
    assert list(got.rules) == [rule(tpm_model="other")]
    assert got.description == "simulated TPMs"
    assert placement(srv, dev.device_id)[:2] == ("lab", "default")
    # The API's UpdateGroup replaces the whole group.
    srv.policy.UpdateGroup(
        policy_pb2.UpdateGroupRequest(
            name="m-model", policy_name="lab-policy", rules=[rule(tpm_model=model)]
        )
    )
    got = srv.policy.GetGroup(policy_pb2.GetGroupRequest(name="m-model"))
    assert got.description == ""
    assert placement(srv, dev.device_id)[:2] == ("m-model", "rule")


def test_cli_rules_on_issuers_with_commas(server: ServerThread) -> None:
    put(server, doc("lab"))
    rule = policy_pb2.GroupRule
    issuer = "CN=Infineon OPTIGA(TM) RSA Manufacturing CA 003,O=Infineon Technologies AG,C=DE"
    # The API takes the RFC 4514 string as given; so does the CLI, splitting only before a key.
    api = create_group(server, "api", "lab", rules=[rule(ek_cert_issuer=issuer)])
    ok(
        server,
        "group",
        "create",
        "cli",
        "--policy",
        "lab",
        "--rule",
        f"issuer={issuer}",
        "--rule",
        f"manufacturer=id:0000,issuer={issuer},model=SLB9670",
    )
    got = server.policy.GetGroup(policy_pb2.GetGroupRequest(name="cli"))
    assert list(got.rules) == [
        *api.rules,
        rule(ek_cert_issuer=issuer, tpm_manufacturer="id:0000", tpm_model="SLB9670"),
    ]


# --- golden capture and import ------------------------------------------------


def test_capture_from_the_last_attestation(
    device: Device, server: ServerThread, tmp_path: Path
) -> None:
    dev_id = device.device_id

    def capture(name: str = "golden", allow: bool = False) -> policy_pb2.CapturePolicyResponse:
        resp: policy_pb2.CapturePolicyResponse = server.policy.CapturePolicy(
            policy_pb2.CapturePolicyRequest(device_id=dev_id, name=name, allow_non_affirming=allow)
        )
        return resp

    # Nothing to capture before the device attests.
    assert refused(capture)[:2] == (PRECONDITION, "NO_EVIDENCE")
    cli_refused(server, "NO_EVIDENCE", "policy", "capture", "--from", dev_id, "--name", "golden")
    assert refused(
        lambda: server.policy.CapturePolicy(
            policy_pb2.CapturePolicyRequest(device_id="dev-nope", name="golden")
        )
    )[:2] == (NOT_FOUND, "DEVICE_UNKNOWN")
    status, code, msg = refused(lambda: capture("bad name"))
    assert (status, code) == (INVALID, "MALFORMED") and msg.startswith("name")

    assert device.agent.attest().verdict.status == AFFIRMING
    cap = capture()
    assert (cap.source_status, cap.warning) == ("affirming", "")
    assert cap.source_appraised_at_ms > 0
    golden = load_policy_text(cap.document)
    # The accepted selection (sha256 0-9, the default policy's) with this boot's values.
    assert golden.name == "golden" and not golden.allow_sha1
    assert list(golden.pcrs) == [Bank.SHA256]
    assert sha256_pcrs(golden) == tpm_values(device)

    # The CLI: to a file (the same policy), and --publish, which needs -m.
    out_file = tmp_path / "golden.yaml"
    out = ok(
        server, "policy", "capture", "--from", dev_id, "--name", "golden", "--output", str(out_file)
    )
    assert f"policy written to {out_file}" in out
    assert load_policy_text(out_file.read_text()).digest() == golden.digest()
    proc = cli(server, "policy", "capture", "--from", dev_id, "--name", "golden", "--publish")
    assert proc.returncode == 2 and "-m" in proc.stderr
    assert refused(lambda: server.policy.GetPolicy(policy_pb2.GetPolicyRequest(name="golden")))[
        :2
    ] == (NOT_FOUND, "POLICY_UNKNOWN")
    out = ok(
        server,
        "policy",
        "capture",
        "--from",
        dev_id,
        "--name",
        "golden",
        "--publish",
        "-m",
        "golden from the lab box",
        "--author",
        "dave",
    )
    assert "published policy golden@1" in out
    info = server.policy.GetPolicy(policy_pb2.GetPolicyRequest(name="golden")).info
    assert (info.digest, info.author, info.change_note) == (
        golden.digest(),
        by("dave"),
        "golden from the lab box",
    )
    # Published and applied, it makes the device affirm.
    create_group(server, "golden-boxes", "golden")
    assign(server, "golden-boxes", dev_id)
    verdict = device.agent.attest().verdict
    assert (verdict.status, verdict.policy_name, verdict.policy_version) == (
        AFFIRMING,
        "golden",
        1,
    )

    # A tampered boot: the last verdict is contraindicated; capture needs the flag.
    tampered4 = tamper(device)
    assert device.agent.attest().verdict.status == CONTRAINDICATED
    status, code, msg = refused(capture)
    assert (status, code) == (PRECONDITION, "CAPTURE_NOT_AFFIRMING")
    assert "contraindicated" in msg and "allow_non_affirming" in msg
    cli_refused(
        server, "CAPTURE_NOT_AFFIRMING", "policy", "capture", "--from", dev_id, "--name", "golden"
    )
    cap = capture(allow=True)
    assert cap.source_status == "contraindicated"
    assert "contraindicated" in cap.warning
    bad = load_policy_text(cap.document)
    assert sha256_pcrs(bad)[4] == {bytes.fromhex(tampered4)} != sha256_pcrs(golden)[4]
    assert {i: v for i, v in sha256_pcrs(bad).items() if i != 4} == {
        i: v for i, v in sha256_pcrs(golden).items() if i != 4
    }
    out_file = tmp_path / "tampered.yaml"
    proc = cli(
        server,
        "policy",
        "capture",
        "--from",
        dev_id,
        "--name",
        "golden",
        "--allow-non-affirming",
        "--output",
        str(out_file),
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning" in proc.stdout + proc.stderr
    assert "contraindicated" in proc.stdout + proc.stderr
    assert load_policy_text(out_file.read_text()).digest() == bad.digest()
    # Capturing publishes nothing by itself.
    assert versions(server, "golden") == [1]


def test_capture_to_stdout_with_a_warning_is_still_a_policy(
    device: Device, server: ServerThread
) -> None:
    tamper(device)
    assert device.agent.attest().verdict.status == CONTRAINDICATED
    proc = cli(
        server,
        "policy",
        "capture",
        "--from",
        device.device_id,
        "--name",
        "g",
        "--allow-non-affirming",
    )
    assert proc.returncode == 0
    assert "contraindicated" in proc.stdout + proc.stderr  # it says so ...
    # ... but stdout is where the policy goes (no --output), so `> golden.yaml` must work.
    assert load_policy_text(proc.stdout).name == "g"


def test_capture_and_dry_run_never_use_values_the_quote_did_not_vouch_for(
    device: Device, server: ServerThread
) -> None:
    grant = server.attestation.GetNonce(attestation_pb2.GetNonceRequest(device_id=device.device_id))
    with DeviceTpm(device.tpm.tcti) as tpm:
        quote = tpm.quote([("sha256", list(range(10)))], grant.nonce, DEFAULT_AK_HANDLE)
    pcrs = {bank: dict(values) for bank, values in quote.pcrs.items()}
    pcrs["sha256"][4] = bytes.fromhex(E)  # not what the TPM signed
    resp = send_quote(server, device.device_id, grant.nonce, quote, pcrs)
    assert [f.code for f in resp.verdict.failures] == ["PCR_DIGEST_MISMATCH"]

    # Not even with allow_non_affirming: these values are whatever was sent.
    status, code, _ = refused(
        lambda: server.policy.CapturePolicy(
            policy_pb2.CapturePolicyRequest(
                device_id=device.device_id, name="x", allow_non_affirming=True
            )
        )
    )
    assert (status, code) == (PRECONDITION, "EVIDENCE_UNVERIFIED")
    cli_refused(
        server,
        "EVIDENCE_UNVERIFIED",
        "policy",
        "capture",
        "--from",
        device.device_id,
        "--name",
        "x",
        "--allow-non-affirming",
    )
    # A candidate admitting the doctored value does not make the device "pass".
    candidate = allowing_also(device.golden_policy(), 4, E)
    resp2 = dry_run(server, document=json.dumps(candidate))
    assert (resp2.evaluated, list(resp2.changed)) == (0, [])
    assert list(resp2.skipped) == [f"{device.device_id}: last quote did not verify"]


def test_dry_run_predicts_no_pass_for_a_failure_no_policy_can_fix(
    device: Device, server: ServerThread
) -> None:
    grant = server.attestation.GetNonce(attestation_pb2.GetNonceRequest(device_id=device.device_id))
    with DeviceTpm(device.tpm.tcti) as tpm:
        # A quote over another nonce (a replay): signed values, but not fresh.
        quote = tpm.quote([("sha256", list(range(10)))], bytes(32), DEFAULT_AK_HANDLE)
    resp = send_quote(server, device.device_id, grant.nonce, quote, quote.pcrs)
    assert resp.verdict.status == CONTRAINDICATED
    assert [f.code for f in resp.verdict.failures] == ["NONCE_MISMATCH"]
    # The policy in force, unchanged, cannot change anybody's verdict.
    in_force = dry_run(server, ref="default@1")
    assert changes(in_force) == []


def test_import_pcrread_output(device: Device, server: ServerThread, tmp_path: Path) -> None:
    pcrread = subprocess.run(
        ["tpm2_pcrread", "-T", device.tpm.tcti, "sha256:0,1,2,3,4,5,6,7,8,9"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TSS2_LOG": "all+none"},
    )
    source = tmp_path / "pcrs.yaml"
    source.write_text(pcrread.stdout)

    # Without --publish: the policy on stdout.
    imported = load_policy_text(
        ok(server, "policy", "import-pcrread", str(source), "--name", "imported")
    )
    assert imported.name == "imported" and not imported.allow_sha1
    assert sha256_pcrs(imported) == tpm_values(device)
    out = ok(
        server,
        "policy",
        "import-pcrread",
        str(source),
        "--name",
        "imported",
        "--publish",
        "-m",
        "from tpm2_pcrread on the lab box",
    )
    assert "published policy imported@1" in out
    info = server.policy.GetPolicy(policy_pb2.GetPolicyRequest(name="imported")).info
    assert info.digest == imported.digest()
    assert info.change_note == "from tpm2_pcrread on the lab box"
    create_group(server, "imported-boxes", "imported")
    assign(server, "imported-boxes", device.device_id)
    verdict = device.agent.attest().verdict
    assert (verdict.status, verdict.policy_name) == (AFFIRMING, "imported")

    # Unusable files: exit 2, nothing published.
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("hello, this is not tpm2_pcrread output\n")
    short = tmp_path / "short.yaml"
    short.write_text("sha256:\n  0 : 0xABCD\n")
    for path in (garbage, short, tmp_path / "missing.yaml"):
        proc = cli(
            server, "policy", "import-pcrread", str(path), "--name", "x", "--publish", "-m", "x"
        )
        assert proc.returncode == 2, (path, proc.stdout, proc.stderr)
        assert path.name in proc.stderr
    listed = server.policy.ListPolicies(policy_pb2.ListPoliciesRequest())
    assert [p.name for p in listed.policies] == ["default", "imported"]


# --- dry-run ------------------------------------------------------------------


def test_dry_run_lists_the_devices_whose_verdict_would_change(
    device_factory: Callable[..., Device], server: ServerThread, tmp_path: Path
) -> None:
    a, b = device_factory(), device_factory()
    never = device_factory(boot=False)
    golden = a.golden_policy("fleet")
    put(server, golden, note="golden")
    create_group(server, "fleet", "fleet")
    assign(server, "fleet", a.device_id, b.device_id, never.device_id)
    assert a.agent.attest().verdict.status == AFFIRMING
    assert b.agent.attest().verdict.status == AFFIRMING
    tampered4 = tamper(a)
    assert a.agent.attest().verdict.status == CONTRAINDICATED

    # fail -> pass: a candidate that also admits the tampered PCR 4.
    candidate = allowing_also(golden, 4, tampered4)
    resp = dry_run(server, document=json.dumps(candidate))
    assert changes(resp) == [(a.device_id, "fleet", "contraindicated", "affirming")]
    assert list(resp.changed[0].failures) == []
    assert (resp.evaluated, resp.unchanged) == (2, 1)
    assert list(resp.skipped) == [f"{never.device_id}: never attested"]
    # The CLI, same candidate as a file: the same answer.
    cand_file = write_yaml(tmp_path / "candidate.yaml", candidate)
    lines = ok(server, "policy", "dry-run", str(cand_file)).splitlines()
    assert lines == [
        "2 device(s) evaluated, 1 unchanged, 1 would change, 1 skipped",
        f"{a.device_id} (fleet): contraindicated -> affirming",
        f"skipped {never.device_id}: never attested",
    ]
    assert json.loads(ok(server, "policy", "dry-run", str(cand_file), "--json")) == as_dict(resp)
    # Nothing was published by the dry-runs.
    assert versions(server, "fleet") == [1]

    # Published, it does what the dry-run said.
    put(server, candidate, note="admit the new kernel")
    assert a.agent.attest().verdict.status == AFFIRMING
    # pass -> fail, with the reasons: going back to fleet@1.
    resp = dry_run(server, ref="fleet@1")
    assert changes(resp) == [(a.device_id, "fleet", "affirming", "contraindicated")]
    assert [(f.code, f.subject, f.got) for f in resp.changed[0].failures] == [
        ("PCR_VALUE_NOT_ALLOWED", "pcr[sha256:4]", tampered4)
    ]
    assert (resp.evaluated, resp.unchanged) == (2, 1)
    out = ok(server, "policy", "dry-run", "fleet@1")
    assert f"{a.device_id} (fleet): affirming -> contraindicated" in out
    assert "  - PCR_VALUE_NOT_ALLOWED pcr[sha256:4]: " in out
    shown = json.loads(ok(server, "policy", "dry-run", "fleet@1", "--json"))
    assert shown == as_dict(resp)
    assert shown["changed"][0]["failures"][0]["got"] == tampered4
    assert set(shown) == {"changed", "evaluated", "unchanged", "skipped"}
    assert set(shown["changed"][0]) == {
        "device_id",
        "group",
        "current_status",
        "candidate_status",
        "failures",
    }

    # --group: only that group's devices. Without it: every device whose policy is "fleet".
    create_group(server, "canary", "fleet")
    assign(server, "canary", a.device_id)
    resp = dry_run(server, ref="fleet@1", group="canary")
    assert changes(resp) == [(a.device_id, "canary", "affirming", "contraindicated")]
    assert (resp.evaluated, resp.unchanged, list(resp.skipped)) == (1, 0, [])
    shown = json.loads(ok(server, "policy", "dry-run", "fleet@1", "--group", "fleet", "--json"))
    assert "changed" not in shown
    assert (shown["evaluated"], shown["unchanged"]) == (1, 1)
    assert shown["skipped"] == [f"{never.device_id}: never attested"]
    resp = dry_run(server, ref="fleet@1")
    assert changes(resp) == [(a.device_id, "canary", "affirming", "contraindicated")]
    assert resp.evaluated == 2
    assert refused(lambda: dry_run(server, ref="fleet@1", group="nope"))[:2] == (
        NOT_FOUND,
        "GROUP_UNKNOWN",
    )
    cli_refused(server, "GROUP_UNKNOWN", "policy", "dry-run", "fleet@1", "--group", "nope")

    # A candidate over fewer PCRs judges only those, as the next attestation would.
    firmware_only = {
        "name": "fleet",
        "pcrs": {"sha256": {i: golden["pcrs"]["sha256"][i] for i in range(4)}},
    }
    resp = dry_run(server, document=json.dumps(firmware_only))
    assert changes(resp) == []
    firmware_only["pcrs"]["sha256"][0] = A
    resp = dry_run(server, document=json.dumps(firmware_only))
    assert sorted(changes(resp)) == sorted(
        [
            (a.device_id, "canary", "affirming", "contraindicated"),
            (b.device_id, "fleet", "affirming", "contraindicated"),
        ]
    )
    assert {f.subject for d in resp.changed for f in d.failures} == {"pcr[sha256:0]"}

    # A candidate over PCRs the last quotes did not cover: skipped, with why.
    wider = copy.deepcopy(golden)
    wider["pcrs"]["sha256"][16] = A
    resp = dry_run(server, document=json.dumps(wider))
    assert resp.evaluated == 0 and list(resp.changed) == []
    assert sorted(s.split(":")[0] for s in resp.skipped) == sorted(
        [a.device_id, b.device_id, never.device_id]
    )
    assert any("does not cover" in s and "16" in s for s in resp.skipped)
    # A name no device uses: nothing evaluated, and nothing published.
    resp = dry_run(server, document=json.dumps({**golden, "name": "brand-new"}))
    assert (resp.evaluated, list(resp.changed), list(resp.skipped)) == (0, [], [])
    assert refused(lambda: server.policy.GetPolicy(policy_pb2.GetPolicyRequest(name="brand-new")))[
        :2
    ] == (NOT_FOUND, "POLICY_UNKNOWN")
    assert versions(server, "fleet") == [1, 2]
    # Refusals: an invalid candidate, no candidate, an unknown version.
    status, code, msg = refused(
        lambda: dry_run(server, document=json.dumps(doc("fleet", {"sha256": {0: "ab"}})))
    )
    assert (status, code) == (INVALID, "POLICY_INVALID") and msg.startswith("pcrs.sha256.0")
    assert refused(lambda: dry_run(server))[:2] == (INVALID, "MALFORMED")
    assert refused(lambda: dry_run(server, ref="fleet@9"))[:2] == (NOT_FOUND, "POLICY_UNKNOWN")
    assert cli(server, "policy", "dry-run", str(tmp_path / "no-such-file")).returncode == 2


# --- validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("pcrs", "field"),
    [
        ({"sha3_256": {0: A}}, "pcrs.sha3_256"),
        ({"sha256": {0: "ab" * 20}}, "pcrs.sha256.0"),
        ({"sha256": {0: [A, "ab" * 33]}}, "pcrs.sha256.0[1]"),
        ({"sha256": {24: A}}, "pcrs.sha256.24"),
        ({"sha256": {-1: A}}, "pcrs.sha256.-1"),
        ({}, "pcrs"),
        ({"sha256": {}}, "pcrs.sha256"),
        ({"sha1": {0: S1}}, "pcrs.sha1"),
        ({"sha256": {"0": A, "00": B}}, "pcrs.sha256.0"),
        ({"sha256": {0: A}, "SHA256": {1: B}}, "pcrs.SHA256"),
    ],
    ids=[
        "unknown-bank",
        "digest-length",
        "second-digest-length",
        "pcr-24",
        "pcr-negative",
        "empty-pcrs",
        "empty-bank",
        "sha1-not-allowed",
        "duplicate-pcr",
        "duplicate-bank",
    ],
)
def test_invalid_policy_refused_naming_the_field_and_nothing_written(
    server: ServerThread, tmp_path: Path, pcrs: dict[str, Any], field: str
) -> None:
    v1 = put(server, doc(), note="good")
    status, code, msg = refused(lambda: put(server, doc(pcrs=pcrs), note="bad"))
    assert (status, code) == (INVALID, "POLICY_INVALID")
    assert msg.startswith(f"{field}: "), msg
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(doc(pcrs=pcrs)))
    err = cli_refused(server, "POLICY_INVALID", "policy", "put", str(path), "-m", "bad")
    assert f"{field}: " in err
    # Nothing half-written; the dry-run refuses it the same way.
    assert versions(server, "lab") == [1]
    assert server.policy.GetPolicy(policy_pb2.GetPolicyRequest(name="lab")).info == v1
    assert refused(lambda: dry_run(server, document=json.dumps(doc(pcrs=pcrs))))[:2] == (
        INVALID,
        "POLICY_INVALID",
    )


def test_unknown_group_or_device_and_malformed_requests_refused(server: ServerThread) -> None:
    put(server, doc())
    create_group(server, "g", "lab")
    p = server.policy
    for call in (
        lambda: p.GetGroup(policy_pb2.GetGroupRequest(name="nope")),
        lambda: p.DeleteGroup(policy_pb2.DeleteGroupRequest(name="nope")),
        lambda: p.UpdateGroup(policy_pb2.UpdateGroupRequest(name="nope", policy_name="lab")),
        lambda: assign(server, "nope", "dev-x"),
        lambda: dry_run(server, ref="lab@1", group="nope"),
    ):
        assert refused(call)[:2] == (NOT_FOUND, "GROUP_UNKNOWN")
    cli_refused(server, "GROUP_UNKNOWN", "group", "get", "nope")
    cli_refused(server, "GROUP_UNKNOWN", "group", "delete", "nope")
    cli_refused(server, "GROUP_UNKNOWN", "group", "update", "nope", "--policy", "lab")

    for call in (
        lambda: assign(server, "g", "dev-nope"),
        lambda: p.CapturePolicy(policy_pb2.CapturePolicyRequest(device_id="dev-nope", name="x")),
        lambda: server.devices.GetDevice(enrollment_pb2.GetDeviceRequest(device_id="dev-nope")),
    ):
        status, code, msg = refused(call)
        assert (status, code) == (NOT_FOUND, "DEVICE_UNKNOWN") and "dev-nope" in msg
    cli_refused(server, "DEVICE_UNKNOWN", "group", "assign", "g", "dev-nope")
    cli_refused(server, "DEVICE_UNKNOWN", "device", "show", "dev-nope")
    cli_refused(server, "DEVICE_UNKNOWN", "policy", "capture", "--from", "dev-nope", "--name", "x")
    assert list(p.GetGroup(policy_pb2.GetGroupRequest(name="g")).device_ids) == []

    # Malformed: each names its field.
    for call, field in (
        (lambda: create_group(server, "bad name", "lab"), "name"),
        (lambda: create_group(server, "ok", ""), "policy_name"),
        (lambda: assign(server, "g"), "device_ids"),
        (lambda: assign(server, "", "dev-x"), "group"),
        (lambda: p.PolicyHistory(policy_pb2.PolicyHistoryRequest(name="")), "name"),
        (lambda: p.DeletePolicy(policy_pb2.DeletePolicyRequest(name="")), "name"),
    ):
        status, code, msg = refused(call)
        assert (status, code) == (INVALID, "MALFORMED"), msg
        assert msg.startswith(field), msg
    assert [g.name for g in p.ListGroups(policy_pb2.ListGroupsRequest()).groups] == ["g"]
    assert cli(server, "group", "create", "x", "--policy", "lab@v2").returncode == 2


@pytest.mark.parametrize(
    ("call", "field", "code"),
    [
        (lambda s: assign(s, "nope", "dev-x"), "group", "GROUP_UNKNOWN"),
        (lambda s: assign(s, "g", "dev-nope"), "device_ids", "DEVICE_UNKNOWN"),
        (
            lambda s: s.policy.UpdateGroup(
                policy_pb2.UpdateGroupRequest(name="nope", policy_name="lab")
            ),
            "name",
            "GROUP_UNKNOWN",
        ),
        (lambda s: create_group(s, "x", "nope"), "policy_name", "POLICY_UNKNOWN"),
        pytest.param(
            lambda s: dry_run(s, ref="lab@1", group="nope"),
            "group",
            "GROUP_UNKNOWN",
        ),
        pytest.param(
            lambda s: s.policy.CapturePolicy(
                policy_pb2.CapturePolicyRequest(device_id="dev-nope", name="x")
            ),
            "device_id",
            "DEVICE_UNKNOWN",
        ),
        pytest.param(
            lambda s: s.policy.GetGroup(policy_pb2.GetGroupRequest(name="nope")),
            "name",
            "GROUP_UNKNOWN",
        ),
        pytest.param(
            lambda s: s.policy.DeleteGroup(policy_pb2.DeleteGroupRequest(name="nope")),
            "name",
            "GROUP_UNKNOWN",
        ),
    ],
    ids=[
        "assign-group",
        "assign-device",
        "update-group",
        "create-group-policy",
        "dry-run-group",
        "capture-device",
        "get-group",
        "delete-group",
    ],
)
def test_an_unknown_group_or_device_refusal_names_the_field(
    server: ServerThread, call: Callable[[ServerThread], object], field: str, code: str
) -> None:
    put(server, doc())
    create_group(server, "g", "lab")
    status, got_code, msg = refused(lambda: call(server))
    assert (status, got_code) == (NOT_FOUND, code)
    assert msg.startswith(f"{field}: "), msg


# --- the story ----------------------------------------------------------------


def test_story_capture_publish_attest_tamper_dry_run(
    device: Device, device_factory: Callable[..., Device], server: ServerThread, tmp_path: Path
) -> None:
    box, peer = device, device_factory()
    agent_args = [
        "--tcti",
        box.tpm.tcti,
        "--state-dir",
        str(box.state_dir),
        "--server",
        server.address,
    ]
    # A first attestation against the bootstrap default policy; capture from it.
    assert box.agent.attest().verdict.status == AFFIRMING
    out = run_cli(
        "policy",
        "capture",
        "--from",
        box.device_id,
        "--name",
        "fleet",
        "--publish",
        "-m",
        "golden from the lab box",
        "--server",
        server.address,
        check=True,
    ).stdout
    assert "published policy fleet@1" in out
    ok(server, "group", "create", "fleet", "--policy", "fleet")
    ok(server, "group", "assign", "fleet", box.device_id, peer.device_id)

    # Attest: both affirm against fleet@1 (the box through the agent CLI).
    proc = run_cli(*agent_args, "attest", tool="attestd-agent")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    verdict = peer.agent.attest().verdict
    assert (verdict.status, verdict.policy_name, verdict.policy_version) == (AFFIRMING, "fleet", 1)

    # Tamper: the box's new kernel lands in PCR 4; it is contraindicated.
    tampered4 = tamper(box)
    proc = run_cli(*agent_args, "attest", tool="attestd-agent")
    assert proc.returncode == 1 and "PCR_VALUE_NOT_ALLOWED pcr[sha256:4]" in proc.stdout

    # Dry-run of the policy in force: nobody would change (the box fails either way).
    assert ok(server, "policy", "dry-run", "fleet@1").splitlines() == [
        "2 device(s) evaluated, 2 unchanged, 0 would change, 0 skipped"
    ]
    # A candidate that also admits the new kernel: the box would go fail -> pass.
    golden = yaml.safe_load(ok(server, "policy", "get", "fleet@1", "--json"))
    candidate = {
        "name": "fleet",
        "description": "admit vmlinuz-6.1.0-evil",
        "pcrs": {"sha256": {int(i): v for i, v in golden["pcrs"]["sha256"].items()}},
    }
    candidate["pcrs"]["sha256"][4] = [*candidate["pcrs"]["sha256"][4], tampered4]
    cand_file = write_yaml(tmp_path / "candidate.yaml", candidate)
    assert ok(server, "policy", "dry-run", str(cand_file)).splitlines() == [
        "2 device(s) evaluated, 1 unchanged, 1 would change, 0 skipped",
        f"{box.device_id} (fleet): contraindicated -> affirming",
    ]
    # Published, the box affirms; the diff shows the one added digest.
    assert "fleet@2" in ok(server, "policy", "put", str(cand_file), "-m", "new kernel approved")
    out = ok(server, "policy", "diff", "fleet@1", "fleet@2")
    assert f"pcr sha256:4\n  + {tampered4}\n" in out
    assert run_cli(*agent_args, "attest", tool="attestd-agent").returncode == 0
    # Now the original policy, dry-run, names the box that would change, and why.
    lines = ok(server, "policy", "dry-run", "fleet@1").splitlines()
    assert lines[:2] == [
        "2 device(s) evaluated, 1 unchanged, 1 would change, 0 skipped",
        f"{box.device_id} (fleet): affirming -> contraindicated",
    ]
    assert lines[2].startswith("  - PCR_VALUE_NOT_ALLOWED pcr[sha256:4]: ")
    # Rolling back does exactly that, and the peer is untouched.
    assert "fleet@3" in ok(server, "policy", "rollback", "fleet@1", "-m", "kernel recalled")
    assert box.agent.attest().verdict.status == CONTRAINDICATED
    verdict = peer.agent.attest().verdict
    assert (verdict.status, verdict.policy_version) == (AFFIRMING, 3)
    shown = json.loads(ok(server, "device", "show", box.device_id, "--json"))
    assert (shown["group"], shown["effective_policy_version"]) == ("fleet", 3)
