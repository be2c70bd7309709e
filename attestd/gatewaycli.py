"""Commands for gateways and admins: verdicts, credentials, revocation, keys.

`attestd device revoke|readmit`, `attestd verdict get|watch`, `attestd credential
verify`, `attestd trust-bundle`, `attestd keys rotate|list`: each one RPC.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from attestd.connect import add_connection_args, channel_from_args
from attestd.v1 import (
    enrollment_pb2,
    enrollment_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    verdicts_pb2,
    verdicts_pb2_grpc,
)

EXIT_OK, EXIT_INVALID = 0, 1
_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
STATES = {1: "valid", 2: "invalid", 3: "expired", 4: "revoked"}
KINDS = {1: "affirmed", 2: "failed", 3: "revoked", 4: "readmitted", 5: "expired"}


def _dump(message: Any) -> None:
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))


def cmd_revoke(args: argparse.Namespace) -> int:
    with channel_from_args(args) as ch:
        stub = enrollment_pb2_grpc.DevicesStub(ch)
        if args.command_name == "revoke":
            stub.RevokeDevice(
                enrollment_pb2.RevokeDeviceRequest(device_id=args.device_id, reason=args.reason)
            )
        else:
            stub.ReadmitDevice(
                enrollment_pb2.ReadmitDeviceRequest(device_id=args.device_id, reason=args.reason)
            )
    done = (
        "revoked: its live credentials ended now"
        if args.command_name == "revoke"
        else ("readmitted: its next affirming attestation earns a credential")
    )
    print(f"{args.device_id} {done}")
    return EXIT_OK


def cmd_verdict_get(args: argparse.Namespace) -> int:
    with channel_from_args(args) as ch:
        v = verdicts_pb2_grpc.VerdictsStub(ch).GetVerdict(
            verdicts_pb2.GetVerdictRequest(device_id=args.device_id)
        )
    if args.json:
        _dump(v)
        return EXIT_OK
    status = v.verdict.status if v.HasField("verdict") else 0
    names = {0: "NONE (never attested)", 2: "AFFIRMING", 3: "WARNING", 4: "CONTRAINDICATED"}
    print(f"{v.device_id}: {names.get(status, str(status))}")
    if v.revoked:
        print(f"  revoked: {v.revocation_reason}")
    print(f"  live credential until {v.credential_expires_at_ms or '-'} (ms)")
    return EXIT_OK


def cmd_verdict_watch(args: argparse.Namespace) -> int:
    request = verdicts_pb2.WatchVerdictsRequest(
        after_cursor=args.after, device_ids=args.device or []
    )
    seen = 0
    with channel_from_args(args) as ch:
        for event in verdicts_pb2_grpc.VerdictsStub(ch).WatchVerdicts(request):
            if args.json:
                print(
                    json.dumps(MessageToDict(event, preserving_proto_field_name=True)), flush=True
                )
            else:
                print(
                    f"{event.cursor}\t{KINDS.get(event.kind, '?')}\t{event.device_id}\t"
                    f"{event.status}\t{event.reason}",
                    flush=True,
                )
            seen += 1
            if args.max_events and seen >= args.max_events:
                break
    return EXIT_OK


def cmd_credential_verify(args: argparse.Namespace) -> int:
    if args.certificate:
        try:
            data = Path(args.certificate).read_bytes()
        except OSError as e:
            print(f"attestd: cannot read {args.certificate}: {e.strerror}", file=sys.stderr)
            return 2
        request = verdicts_pb2.VerifyCredentialRequest(
            certificate=data, device_id=args.device or ""
        )
    else:
        token = args.token
        if token in (None, "-"):  # read it from stdin: tokens stay out of shell history
            token = sys.stdin.read().strip()
        elif not _JWT.fullmatch(token):  # not a token itself: a file holding one
            try:
                token = Path(token).read_text().strip()
            except OSError as e:
                print(f"attestd: cannot read token file {token}: {e.strerror}", file=sys.stderr)
                return 2
        request = verdicts_pb2.VerifyCredentialRequest(token=token, device_id=args.device or "")
    with channel_from_args(args) as ch:
        resp = verdicts_pb2_grpc.VerdictsStub(ch).VerifyCredential(request)
    if args.json:
        _dump(resp)
    else:
        state = STATES.get(resp.state, "unknown")
        print(
            f"{state}{': ' + resp.reason if resp.reason else ''} (device {resp.device_id or '-'})"
        )
    return EXIT_OK if resp.state == verdicts_pb2.CREDENTIAL_STATE_VALID else EXIT_INVALID


def cmd_trust_bundle(args: argparse.Namespace) -> int:
    with channel_from_args(args) as ch:
        bundle = verdicts_pb2_grpc.VerdictsStub(ch).GetTrustBundle(
            verdicts_pb2.GetTrustBundleRequest()
        )
    if args.jwks:
        Path(args.jwks).write_text(bundle.jwks)
    if args.ca:
        Path(args.ca).write_text(bundle.ca_certificates_pem)
    if not args.jwks and not args.ca:
        print(json.dumps(json.loads(bundle.jwks), indent=2))
        print(bundle.ca_certificates_pem, end="")
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    with channel_from_args(args) as ch:
        stub = keys_pb2_grpc.KeysStub(ch)
        if args.keys_command == "rotate":
            keys = stub.RotateSigningKey(keys_pb2.RotateSigningKeyRequest())
        else:
            keys = stub.ListSigningKeys(keys_pb2.ListSigningKeysRequest())
    if args.json:
        _dump(keys)
        return EXIT_OK
    for k in keys.keys:
        state = "current" if k.current else f"retired, published until {k.publish_until_ms} (ms)"
        print(f"{k.kid}\t{state}")
    return EXIT_OK


def register(sub: Any, device_sub: Any, server: str) -> None:
    for name in ("revoke", "readmit"):
        c = device_sub.add_parser(
            name,
            help="end a device's live credentials now; no new ones until readmitted"
            if name == "revoke"
            else "let a revoked device earn credentials again",
        )
        c.add_argument("device_id")
        c.add_argument("--reason", required=True)
        add_connection_args(c, server)
        c.set_defaults(func=cmd_revoke, command_name=name, role_hint="admin")

    ver = sub.add_parser("verdict", help="device verdicts, as gateways see them").add_subparsers(
        dest="verdict_command", required=True
    )
    c = ver.add_parser("get", help="a device's current verdict")
    c.add_argument("device_id")
    c.set_defaults(func=cmd_verdict_get)
    c = ver.add_parser("watch", help="stream verdict changes (resume with --after CURSOR)")
    c.add_argument("--after", type=int, default=0, help="events after this cursor")
    c.add_argument("--device", action="append", help="only this device; repeatable")
    c.add_argument("--max-events", type=int, default=0, help="stop after N events")
    c.set_defaults(func=cmd_verdict_watch)
    for p in ver.choices.values():
        add_connection_args(p, server)
        p.add_argument("--json", action="store_true")
        p.set_defaults(role_hint="gateway or admin")

    cred = sub.add_parser("credential", help="session credentials").add_subparsers(
        dest="credential_command", required=True
    )
    c = cred.add_parser(
        "verify", help="check a credential (JWT, file, - for stdin) or --certificate"
    )
    c.add_argument("token", nargs="?")
    c.add_argument("--certificate", help="a client certificate attestd issued (PEM or DER)")
    c.add_argument("--device", help="the device the credential must belong to")
    add_connection_args(c, server)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_credential_verify, role_hint="gateway or admin")

    c = sub.add_parser("trust-bundle", help="the JWKS and CA chain to verify credentials offline")
    c.add_argument("--jwks", help="write the JWKS here")
    c.add_argument("--ca", help="write the CA chain (PEM) here")
    add_connection_args(c, server)
    c.set_defaults(func=cmd_trust_bundle)

    keys = sub.add_parser("keys", help="attestd's credential signing keys").add_subparsers(
        dest="keys_command", required=True
    )
    for name, helptext in (
        ("rotate", "new signing key; the old one stays published until its credentials expire"),
        ("list", "signing keys and how long each stays published"),
    ):
        c = keys.add_parser(name, help=helptext)
        add_connection_args(c, server)
        c.add_argument("--json", action="store_true")
        c.set_defaults(func=cmd_keys, role_hint="admin")
