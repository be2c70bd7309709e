"""`attestd policy …` and `attestd group …`: the Policy service from the command line.

Each command is one RPC (import-pcrread: a local conversion, then PutPolicy),
so the CLI and the API give the same results.
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import socket
import sys
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf.json_format import MessageToDict

from attestd.connect import add_connection_args, channel_from_args
from attestd.v1 import policy_pb2, policy_pb2_grpc

EXIT_OK = 0
RULE_KEYS = {"issuer": "ek_cert_issuer", "manufacturer": "tpm_manufacturer", "model": "tpm_model"}
_RULE_SPLIT = re.compile(r",(?=\s*(?:issuer|manufacturer|model)=)")


class UsageError(Exception):
    """Unusable arguments or files (exit 2)."""


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, policy_pb2_grpc.PolicyStub]:
    channel = channel_from_args(args)
    return channel, policy_pb2_grpc.PolicyStub(channel)


def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    channel, stub = _stub(args)
    with channel:
        return getattr(stub, method)(request, timeout=60)


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {what} {path}: {e}") from None


def _author(args: argparse.Namespace) -> str:
    return str(args.author or f"{getpass.getuser()}@{socket.gethostname()}")


def _print_json(message: Any) -> None:
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))


def _info_line(info: policy_pb2.PolicyInfo) -> str:
    return f"{info.name}@{info.version}"


def _publish(args: argparse.Namespace, text: str) -> policy_pb2.PolicyInfo:
    info: policy_pb2.PolicyInfo = _call(
        args,
        "PutPolicy",
        policy_pb2.PutPolicyRequest(
            document=text, change_note=args.note or "", author=_author(args)
        ),
    )
    return info


# --- versions ---------------------------------------------------------------


def cmd_put(args: argparse.Namespace) -> int:
    info = _publish(args, _read_text(args.file, "policy file"))
    if args.json:
        _print_json(info)
    else:
        print(f"published policy {_info_line(info)} (sha256 {info.digest[:16]}…)")
    return EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    doc = _call(args, "GetPolicy", policy_pb2.GetPolicyRequest(name=args.name))
    if args.json:
        print(json.dumps(json.loads(doc.document), indent=2, sort_keys=True))
    else:
        print(f"# {_info_line(doc.info)} sha256:{doc.info.digest}")
        print(f"# by {doc.info.author}: {doc.info.change_note}")
        print(yaml.safe_dump(json.loads(doc.document), sort_keys=False), end="")
    return EXIT_OK


def _print_infos(args: argparse.Namespace, resp: policy_pb2.ListPoliciesResponse) -> None:
    if args.json:
        _print_json(resp)
        return
    for p in resp.policies:
        print(f"{_info_line(p)}\t{p.digest[:16]}\t{p.author}\t{p.change_note}")


def cmd_list(args: argparse.Namespace) -> int:
    _print_infos(args, _call(args, "ListPolicies", policy_pb2.ListPoliciesRequest()))
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    _print_infos(
        args, _call(args, "PolicyHistory", policy_pb2.PolicyHistoryRequest(name=args.name))
    )
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    request = policy_pb2.DiffPoliciesRequest(to=args.to, **{"from": args.from_})
    diff = _call(args, "DiffPolicies", request)
    if args.json:
        _print_json(diff)
        return EXIT_OK
    print(f"--- {_info_line(getattr(diff, 'from'))}\n+++ {_info_line(diff.to)}")
    for c in diff.pcrs:
        print(f"pcr {c.bank}:{c.index}")
        for d in c.removed:
            print(f"  - {d}")
        for d in c.added:
            print(f"  + {d}")
    for s in diff.settings:
        print(f"{s.field}: {getattr(s, 'from')} -> {s.to}")
    if not diff.pcrs and not diff.settings:
        print("(no differences)")
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    info = _call(
        args,
        "RollbackPolicy",
        policy_pb2.RollbackPolicyRequest(
            name=args.ref, change_note=args.note, author=_author(args)
        ),
    )
    print(f"published {args.ref} again as {_info_line(info)}")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    _call(args, "DeletePolicy", policy_pb2.DeletePolicyRequest(name=args.name))
    print(f"deleted policy {args.name}")
    return EXIT_OK


# --- building policies --------------------------------------------------------


def _emit(args: argparse.Namespace, text: str) -> int:
    """Write a built policy to --output or stdout, and publish it with --publish."""
    if args.output:
        Path(args.output).write_text(text)
        print(f"policy written to {args.output}")
    elif not args.publish:
        print(text, end="")
    if args.publish:
        if not args.note:
            raise UsageError("--publish needs -m/--note: say why this version exists")
        info = _publish(args, text)
        print(f"published policy {_info_line(info)}")
    return EXIT_OK


def cmd_capture(args: argparse.Namespace) -> int:
    resp = _call(
        args,
        "CapturePolicy",
        policy_pb2.CapturePolicyRequest(
            device_id=args.device, name=args.name, allow_non_affirming=args.allow_non_affirming
        ),
    )
    if resp.warning:
        # stderr: stdout may be the policy itself (`capture … > file.yaml`).
        print(f"warning: {resp.warning}", file=sys.stderr)
    return _emit(args, resp.document)


def cmd_import_pcrread(args: argparse.Namespace) -> int:
    from attestd.core.errors import MalformedError
    from attestd.core.toolformats import load_pcrs

    raw = _read_text(args.file, "tpm2_pcrread output").encode()
    try:
        pcrs = load_pcrs(raw, (), args.file)
    except MalformedError as e:
        raise UsageError(str(e)) from None
    doc = {
        "name": args.name,
        "description": f"imported from tpm2_pcrread output {Path(args.file).name}",
        "allow_sha1": "sha1" in pcrs,
        "pcrs": {bank: {i: d.hex() for i, d in sorted(v.items())} for bank, v in pcrs.items()},
    }
    return _emit(args, yaml.safe_dump(doc, sort_keys=False))


def cmd_dry_run(args: argparse.Namespace) -> int:
    path = Path(args.candidate)
    if path.exists():
        request = policy_pb2.DryRunPolicyRequest(
            document=_read_text(args.candidate, "policy file"), group=args.group or ""
        )
    elif "@" in args.candidate:
        request = policy_pb2.DryRunPolicyRequest(ref=args.candidate, group=args.group or "")
    else:
        raise UsageError(f"{args.candidate}: neither a policy file nor NAME@VERSION")
    resp = _call(args, "DryRunPolicy", request)
    if args.json:
        _print_json(resp)
        return EXIT_OK
    print(
        f"{resp.evaluated} device(s) evaluated, {resp.unchanged} unchanged, "
        f"{len(resp.changed)} would change, {len(resp.skipped)} skipped"
    )
    for d in resp.changed:
        print(
            f"{d.device_id} ({d.group or 'no group'}): {d.current_status} -> {d.candidate_status}"
        )
        for f in d.failures:
            print(f"  - {f.code} {f.subject}: {f.detail}")
    for s in resp.skipped:
        print(f"skipped {s}")
    return EXIT_OK


# --- groups -------------------------------------------------------------------


def _rules(specs: list[str] | None) -> list[policy_pb2.GroupRule]:
    rules = []
    for spec in specs or []:
        fields: dict[str, str] = {}
        # Split only before a known key: issuer names themselves hold commas (CN=…,O=…).
        for part in _RULE_SPLIT.split(spec):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in RULE_KEYS or not value.strip():
                raise UsageError(
                    f"--rule {spec!r}: use KEY=VALUE[,KEY=VALUE] with keys {', '.join(RULE_KEYS)}"
                )
            fields[RULE_KEYS[key.strip()]] = value.strip()
        rules.append(policy_pb2.GroupRule(**fields))
    return rules


def _group_fields(args: argparse.Namespace) -> dict[str, Any]:
    name, _, version = args.policy.partition("@")
    if version and not version.isdigit():
        raise UsageError(f"--policy {args.policy!r}: NAME or NAME@VERSION")
    return {
        "name": args.name,
        "description": args.description or "",
        "policy_name": name,
        "policy_version": int(version or 0),
        "rules": _rules(args.rule),
    }


def _print_group(args: argparse.Namespace, g: policy_pb2.Group) -> None:
    if args.json:
        _print_json(g)
        return
    pin = f"@{g.policy_version}" if g.policy_version else " (latest)"
    print(f"group {g.name}{' (default)' if g.is_default else ''}: policy {g.policy_name}{pin}")
    for r in g.rules:
        print(
            "  rule "
            + ", ".join(
                f"{k}={v}" for k, v in MessageToDict(r, preserving_proto_field_name=True).items()
            )
        )
    for d in g.device_ids:
        print(f"  device {d}")


def cmd_group_create(args: argparse.Namespace) -> int:
    _print_group(
        args, _call(args, "CreateGroup", policy_pb2.CreateGroupRequest(**_group_fields(args)))
    )
    return EXIT_OK


def cmd_group_update(args: argparse.Namespace) -> int:
    # Options not given keep their current values (the RPC replaces the whole group).
    current = _call(args, "GetGroup", policy_pb2.GetGroupRequest(name=args.name))
    if args.policy is None:
        pin = f"@{current.policy_version}" if current.policy_version else ""
        args.policy = current.policy_name + pin
    fields = _group_fields(args)
    if args.description is None:
        fields["description"] = current.description
    if args.rule is None:
        fields["rules"] = list(current.rules)
    _print_group(args, _call(args, "UpdateGroup", policy_pb2.UpdateGroupRequest(**fields)))
    return EXIT_OK


def cmd_group_get(args: argparse.Namespace) -> int:
    _print_group(args, _call(args, "GetGroup", policy_pb2.GetGroupRequest(name=args.name)))
    return EXIT_OK


def cmd_group_list(args: argparse.Namespace) -> int:
    resp = _call(args, "ListGroups", policy_pb2.ListGroupsRequest())
    if args.json:
        _print_json(resp)
        return EXIT_OK
    for g in resp.groups:
        _print_group(args, g)
    return EXIT_OK


def cmd_group_delete(args: argparse.Namespace) -> int:
    _call(args, "DeleteGroup", policy_pb2.DeleteGroupRequest(name=args.name))
    print(f"deleted group {args.name}")
    return EXIT_OK


def cmd_group_unassign(args: argparse.Namespace) -> int:
    _call(args, "UnassignDevices", policy_pb2.UnassignDevicesRequest(device_ids=args.device_ids))
    print(f"unassigned {len(args.device_ids)} device(s); rules or the default group apply again")
    return EXIT_OK


def cmd_group_assign(args: argparse.Namespace) -> int:
    resp = _call(
        args,
        "AssignDevices",
        policy_pb2.AssignDevicesRequest(group=args.name, device_ids=args.device_ids),
    )
    _print_group(args, resp.group)
    return EXIT_OK


# --- parsers ------------------------------------------------------------------


# Commands that only read: admins may run them too.
_READS = frozenset({"get", "list", "history", "diff", "dry-run"})


def _common(p: argparse.ArgumentParser, server: str, command: str) -> None:
    add_connection_args(p, server)
    p.add_argument("--json", action="store_true")
    p.set_defaults(role_hint="policy-author or admin" if command in _READS else "policy-author")


def _publishing(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--note", help="change note (required to publish)")
    p.add_argument("--author", help="who publishes (default: USER@HOST)")


def register(sub: Any, server: str) -> None:
    pol = sub.add_parser("policy", help="reference-value policies").add_subparsers(
        dest="policy_command", required=True
    )
    c = pol.add_parser("put", help="publish a policy file (YAML or JSON) as a new version")
    c.add_argument("file")
    _publishing(c)
    c.set_defaults(func=cmd_put)
    c = pol.add_parser("get", help="show a policy (NAME or NAME@VERSION)")
    c.add_argument("name")
    c.set_defaults(func=cmd_get)
    c = pol.add_parser("list", help="the latest version of every policy")
    c.set_defaults(func=cmd_list)
    c = pol.add_parser("history", help="every version of a policy")
    c.add_argument("name")
    c.set_defaults(func=cmd_history)
    c = pol.add_parser("diff", help="what changed between NAME@A and NAME@B")
    c.add_argument("from_", metavar="NAME@A")
    c.add_argument("to", metavar="NAME@B")
    c.set_defaults(func=cmd_diff)
    c = pol.add_parser("rollback", help="publish NAME@N again as the newest version")
    c.add_argument("ref", metavar="NAME@N")
    c.add_argument("-m", "--note", required=True, help="change note")
    c.add_argument("--author")
    c.set_defaults(func=cmd_rollback)
    c = pol.add_parser("delete", help="delete a policy (refused while a group uses it)")
    c.add_argument("name")
    c.set_defaults(func=cmd_delete)
    for name, func, helptext in (
        ("capture", cmd_capture, "build a policy from a device's last attestation"),
        ("import-pcrread", cmd_import_pcrread, "build a policy from tpm2_pcrread output"),
    ):
        c = pol.add_parser(name, help=helptext)
        if name == "capture":
            c.add_argument("--from", dest="device", required=True, metavar="DEVICE")
            c.add_argument(
                "--allow-non-affirming",
                action="store_true",
                help="capture although the last verdict was not affirming",
            )
        else:
            c.add_argument("file")
        c.add_argument("--name", required=True)
        c.add_argument("--output", help="write the policy here (default: stdout)")
        c.add_argument("--publish", action="store_true", help="publish it at once (needs -m)")
        _publishing(c)
        c.set_defaults(func=func)
    c = pol.add_parser("dry-run", help="which devices a candidate would change, before publishing")
    c.add_argument("candidate", metavar="FILE-or-NAME@N")
    c.add_argument("--group", help="only this group's devices")
    c.set_defaults(func=cmd_dry_run)
    for command, parser in pol.choices.items():
        _common(parser, server, command)

    grp = sub.add_parser("group", help="device groups").add_subparsers(
        dest="group_command", required=True
    )
    for name, func in (("create", cmd_group_create), ("update", cmd_group_update)):
        c = grp.add_parser(name, help=f"{name} a device group")
        c.add_argument("name")
        c.add_argument(
            "--policy",
            required=name == "create",
            metavar="NAME[@VERSION]",
            help="its policy, pinned to a version or following the latest",
        )
        c.add_argument("--description")
        c.add_argument(
            "--rule",
            action="append",
            metavar="KEY=VALUE[,KEY=VALUE]",
            help="match enrollment facts: issuer, manufacturer, model; repeatable",
        )
        c.set_defaults(func=func)
    c = grp.add_parser("get", help="show a group")
    c.add_argument("name")
    c.set_defaults(func=cmd_group_get)
    c = grp.add_parser("list", help="list groups")
    c.set_defaults(func=cmd_group_list)
    c = grp.add_parser("delete", help="delete a group (refused while devices are assigned)")
    c.add_argument("name")
    c.set_defaults(func=cmd_group_delete)
    c = grp.add_parser("assign", help="put devices into a group by id")
    c.add_argument("name")
    c.add_argument("device_ids", nargs="+", metavar="DEVICE_ID")
    c.set_defaults(func=cmd_group_assign)
    c = grp.add_parser("unassign", help="remove devices' assignment by id")
    c.add_argument("device_ids", nargs="+", metavar="DEVICE_ID")
    c.set_defaults(func=cmd_group_unassign)
    for command, parser in grp.choices.items():
        _common(parser, server, command)
