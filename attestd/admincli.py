"""`attestd admin …`, `attestd device preregister` and `attestd audit …`.

Every command but ``tls-init`` works in one of two modes:

- remote (the default): one call of the Admin service, with the connection
  options of every client command; it needs a credential with the admin role;
- local (``--data-dir DIR`` or ``--config FILE``): on the server host, the same
  operations (attestd/service/admin.py) run directly on the server's store in
  DIR, and the command appends the audit record the server would have. This is
  how the first admin token is made.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from attestd.connect import add_connection_args, channel_from_args
from attestd.core.audit import (
    GENESIS,
    AuditRecord,
    Checkpoint,
    Finding,
    checkpoint_to_json,
    parse_export_line,
    record_to_json,
    verify_log,
)
from attestd.service.access import MATRIX
from attestd.v1 import admin_pb2, admin_pb2_grpc

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec
    from google.protobuf.message import Message

    from attestd.service.config import ServerConfig
    from attestd.store.sqlite import SqliteStore

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
GRANTABLE = ("policy-author", "gateway", "admin")
ROLE_NAMES: dict[admin_pb2.Role.ValueType, str] = {
    admin_pb2.ROLE_DEVICE: "device",
    admin_pb2.ROLE_POLICY_AUTHOR: "policy-author",
    admin_pb2.ROLE_GATEWAY: "gateway",
    admin_pb2.ROLE_ADMIN: "admin",
}
ROLES_PB: dict[str, admin_pb2.Role.ValueType] = {v: k for k, v in ROLE_NAMES.items()}
LOCAL_HELP = (
    "work on the server's data directory DIR directly instead of calling the Admin service:"
    " run on the server host; needs access to the data directory (this is how the first"
    " admin token is made)"
)
LOCAL_HINT = "; or, on the server host, run it with --data-dir DIR (local mode)"
MAX_JWKS = 1024 * 1024


class AdminCliError(Exception):
    """A message for stderr and the exit code (2: usage, 1: refused)."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --- helpers ------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def _time(ms: int) -> str:
    if not ms:
        return "-"
    return (
        datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def parse_time_ms(text: str) -> int:
    """ISO-8601 (``2026-11-22T10:00:00Z``, ``2026-11-22``; UTC if no zone) or unix ms."""
    t = text.strip()
    if t.isdigit():
        return int(t)
    try:
        when = datetime.fromisoformat(t)
    except ValueError:
        raise AdminCliError(
            f"--since {text!r}: an ISO-8601 time (2026-11-22T10:00:00Z, 2026-11-22) or unix ms"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _is_local(args: argparse.Namespace) -> bool:
    return bool(args.data_dir or args.config)


def _actor() -> str:
    return f"local-admin uid={os.getuid()}"


@contextmanager
def _local(args: argparse.Namespace) -> Iterator[tuple[ServerConfig, SqliteStore]]:
    """The server's configuration and its store, opened in place (never created)."""
    from attestd.service.config import ConfigError, load_config, prepare_data_dir
    from attestd.store.base import StoreError
    from attestd.store.sqlite import SqliteStore

    try:
        # insecure: a local command needs no TLS settings (it opens no port).
        config = load_config(
            Path(args.config) if args.config else None,
            {"data_dir": args.data_dir, "insecure": True},
        )
    except ConfigError as e:
        raise AdminCliError(f"configuration: {e}") from None
    if not config.data_dir.is_dir():
        raise AdminCliError(
            f"the data directory {config.data_dir} does not exist: give the directory of an"
            " attestd server (its data_dir), on the server host"
        )
    try:
        prepare_data_dir(config.data_dir)  # refuses a directory every user can read
        store = SqliteStore(config.store_path, history_per_device=config.history_per_device)
    except (ConfigError, StoreError, OSError) as e:
        raise AdminCliError(str(e)) from None
    try:
        yield config, store
    finally:
        store.close()


def _local_call(
    args: argparse.Namespace,
    kind: str,
    request: Message,
    call: Callable[[SqliteStore, ServerConfig, int], Any],
) -> Any:
    """Run one admin operation on the local store and audit it as the server would."""
    from attestd.service.auditing import audit_event
    from attestd.service.config import ConfigError
    from attestd.service.errors import ServiceError
    from attestd.store.base import StoreError

    with _local(args) as (config, store):
        now = _now_ms()
        try:
            response = call(store, config, now)
        except (ServiceError, StoreError) as e:
            if kind:
                store.append_audit(audit_event(now, kind, _actor(), request, None, e.code))
            raise AdminCliError(f"refused: {e.code}: {e}", EXIT_INVALID) from None
        except (ConfigError, OSError, ValueError) as e:
            raise AdminCliError(str(e)) from None
        if kind:
            store.append_audit(audit_event(now, kind, _actor(), request, response, "ok"))
        return response


def _admin_call(
    args: argparse.Namespace,
    method: str,
    request: Message,
    local: Callable[[SqliteStore, ServerConfig, int], Any],
) -> Any:
    """One Admin operation: through the RPC, or (--data-dir) ``local`` on the server's own
    files, audited under the kind the server's access matrix gives the RPC."""
    if not _is_local(args):
        return _remote(args, method, request)
    return _local_call(args, MATRIX[f"/attestd.v1.Admin/{method}"].audit, request, local)


def _remote(args: argparse.Namespace, method: str, request: Message) -> Any:
    with channel_from_args(args) as channel:
        return getattr(admin_pb2_grpc.AdminStub(channel), method)(request, timeout=60)


def _role(name: str) -> admin_pb2.Role.ValueType:
    return ROLES_PB[name]


# --- admin tls-init -----------------------------------------------------------------


def cmd_tls_init(args: argparse.Namespace) -> int:
    from attestd.tlsinit import init_tls

    out = Path(args.out)
    if args.days <= 0:
        raise AdminCliError("--days must be a positive number")
    existing = [
        out / n for n in ("ca-cert.pem", "server-cert.pem", "server-key.pem") if (out / n).exists()
    ]
    if existing and not args.force:
        raise AdminCliError(
            f"{existing[0]} exists: give another --out, or --force to replace the files"
        )
    try:
        files = init_tls(out, args.host, args.days)
    except (OSError, ValueError) as e:
        raise AdminCliError(f"tls-init: {e}") from None
    ca, cert, key = (p.resolve() for p in (files.ca_cert, files.server_cert, files.server_key))
    print(f"CA certificate      {ca}")
    print(f"server certificate  {cert} (for {', '.join(args.host)}, {args.days} days)")
    print(f"server key          {key} (mode 0600)")
    print("\nIn the server's configuration file:")
    print(f"  tls_cert: {cert}\n  tls_key: {key}")
    print(f"(or: attestd serve --tls-cert {cert} --tls-key {key})")
    print("\nClients trust the server with the CA certificate:")
    print(f"  --ca-cert {ca}   (or ATTESTD_CA_CERT={ca}; the agent takes --ca-cert too)")
    print("The CA's key was not kept: nothing else can be issued from it.")
    return EXIT_OK


# --- admin token create|list|revoke -------------------------------------------------


def _credential_line(c: admin_pb2.CallerCredential) -> str:
    expires = _time(c.expires_at_ms) if c.expires_at_ms else "never"
    return f"{c.id} ({c.kind}) name {c.name}, role {ROLE_NAMES.get(c.role, '?')}, expires {expires}"


def cmd_token_create(args: argparse.Namespace) -> int:
    from attestd.service.admin import create_token

    request = admin_pb2.CreateTokenRequest(
        role=_role(args.role), name=args.name, lifetime_s=args.lifetime
    )
    resp: admin_pb2.CreateTokenResponse = _admin_call(
        args,
        "CreateToken",
        request,
        lambda store, _c, now: create_token(store, request, now, _actor()),
    )
    cred = resp.credential
    if args.out:
        try:
            from attestd.privatefile import write_private

            write_private(Path(args.out), (resp.token + "\n").encode())
        except OSError as e:
            raise AdminCliError(
                f"token {cred.id} was created but cannot be written to {args.out}:"
                f" {e.strerror}; revoke it (attestd admin token revoke {cred.id})"
            ) from None
        print(f"created {_credential_line(cred)}")
        print(f"token written to {args.out} (mode 0600); pass it with --token-file")
        return EXIT_OK
    print(f"created {_credential_line(cred)}")
    print("the token (shown this once; attestd keeps only its hash):", flush=True)
    print(resp.token)
    return EXIT_OK


def _credential_json(c: admin_pb2.CallerCredential) -> dict[str, Any]:
    return {
        "id": c.id,
        "kind": c.kind,
        "role": ROLE_NAMES.get(c.role, ""),
        "name": c.name,
        "created_at_ms": c.created_at_ms,
        "expires_at_ms": c.expires_at_ms,
        "revoked_at_ms": c.revoked_at_ms,
        "created_by": c.created_by,
        "certificate_serial": c.certificate_serial,
        "certificate_sha256": c.certificate_sha256,
    }


def cmd_token_list(args: argparse.Namespace) -> int:
    from attestd.service.admin import list_credentials

    request = admin_pb2.ListCredentialsRequest(include_revoked=args.all)
    resp: admin_pb2.ListCredentialsResponse = _admin_call(
        args, "ListCredentials", request, lambda store, _c, _now: list_credentials(store, request)
    )
    if args.json:
        print(json.dumps([_credential_json(c) for c in resp.credentials], indent=2))
        return EXIT_OK
    if not resp.credentials:
        print("(no credentials)" if args.all else "(no live credentials; --all shows revoked)")
        return EXIT_OK
    now = _now_ms()
    print("ID\tKIND\tROLE\tNAME\tCREATED\tEXPIRES\tSTATE\tCREATED BY")
    for c in resp.credentials:
        if c.revoked_at_ms:
            state = f"revoked {_time(c.revoked_at_ms)}"
        elif c.expires_at_ms and c.expires_at_ms <= now:
            state = "expired"
        else:
            state = "live"
        expires = _time(c.expires_at_ms) if c.expires_at_ms else "never"
        print(
            f"{c.id}\t{c.kind}\t{ROLE_NAMES.get(c.role, '?')}\t{c.name}\t"
            f"{_time(c.created_at_ms)}\t{expires}\t{state}\t{c.created_by}"
        )
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from attestd.service.admin import revoke_credential

    request = admin_pb2.RevokeCredentialRequest(id=args.id, reason=args.reason or "")
    cred: admin_pb2.CallerCredential = _admin_call(
        args,
        "RevokeCredential",
        request,
        lambda store, _c, now: revoke_credential(store, request, now),
    )
    print(
        f"revoked {cred.id} ({cred.kind}, name {cred.name}, role"
        f" {ROLE_NAMES.get(cred.role, '?')}) at {_time(cred.revoked_at_ms)}"
    )
    return EXIT_OK


# --- admin issue-client-cert --------------------------------------------------------


def cmd_issue_client_cert(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from attestd.privatefile import write_private
    from attestd.service.admin import NAME, issue_client_certificate

    if not NAME.fullmatch(args.name):
        raise AdminCliError(
            "--name: 1-64 characters, letters, digits and . _ @ + - (starting with a letter"
            " or digit)"
        )
    out = Path(args.out_dir)
    key_path, cert_path, ca_path = (
        out / f"{args.name}-key.pem",
        out / f"{args.name}-cert.pem",
        out / "client-ca.pem",
    )
    for path in (key_path, cert_path):
        if path.exists():
            raise AdminCliError(f"{path} exists: give another --name or --out-dir")
    # The private key is made here and never leaves this host: only its public half is sent.
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(key_path, key_pem)  # first: fail before a certificate is issued
    except OSError as e:
        raise AdminCliError(f"cannot write {key_path}: {e.strerror}") from None
    request = admin_pb2.IssueClientCertificateRequest(
        role=_role(args.role), name=args.name, public_key=public_pem, lifetime_s=args.lifetime
    )
    try:
        from attestd.service.server import client_ca_of

        resp: admin_pb2.IssueClientCertificateResponse = _admin_call(
            args,
            "IssueClientCertificate",
            request,
            lambda store, config, now: issue_client_certificate(
                store, client_ca_of(config), request, now, _actor()
            ),
        )
    except BaseException:
        key_path.unlink(missing_ok=True)
        raise
    cred = resp.credential
    try:
        cert_path.write_text(resp.certificate_pem)
        ca_path.write_text(resp.ca_certificate_pem)
    except OSError as e:
        raise AdminCliError(
            f"certificate {cred.id} was issued but cannot be written: {e}; revoke it"
            f" (attestd admin token revoke {cred.id})"
        ) from None
    print(f"issued {_credential_line(cred)}")
    print(f"private key         {key_path} (mode 0600, made here, never sent)")
    print(f"certificate         {cert_path}")
    print(f"client CA           {ca_path} (the CA the server's mTLS port trusts)")
    print(
        f"use it on the mTLS port: --client-cert {cert_path} --client-key {key_path}"
        " --ca-cert SERVER-CA.pem --server HOST:50052"
    )
    return EXIT_OK


# --- device preregister -------------------------------------------------------------


def cmd_preregister(args: argparse.Namespace) -> int:
    from attestd.service.admin import preregister

    try:
        manifest = Path(args.file).read_bytes()
    except OSError as e:
        raise AdminCliError(f"cannot read {args.file}: {e.strerror}") from None
    request = admin_pb2.PreregisterDevicesRequest(manifest=manifest, source=Path(args.file).name)
    resp: admin_pb2.PreregisterDevicesResponse = _admin_call(
        args, "PreregisterDevices", request, lambda store, _c, now: preregister(store, request, now)
    )
    print(f"{args.file}: {resp.added} added, {resp.updated} updated, {resp.unchanged} unchanged")
    return EXIT_OK


# --- audit export|verify ------------------------------------------------------------


def _record_of(pb: admin_pb2.AuditRecord) -> AuditRecord:
    try:
        detail = json.loads(pb.detail_json)
    except ValueError:
        raise AdminCliError(
            f"audit record {pb.seq}: its detail is not JSON", EXIT_INVALID
        ) from None
    if not isinstance(detail, dict):
        raise AdminCliError(f"audit record {pb.seq}: its detail is not an object", EXIT_INVALID)
    return AuditRecord(
        seq=pb.seq,
        at_ms=pb.at_ms,
        kind=pb.kind,
        actor=pb.actor,
        subject=pb.subject,
        detail=detail,
        prev_hash=pb.prev_hash,
        hash=pb.hash,
    )


def _checkpoint_of(pb: admin_pb2.AuditCheckpoint) -> Checkpoint:
    return Checkpoint(seq=pb.seq, hash=pb.hash, at_ms=pb.at_ms, kid=pb.kid, signature=pb.signature)


def _fetch_remote(
    args: argparse.Namespace, since_ms: int, after_seq: int
) -> tuple[str, list[AuditRecord], list[Checkpoint]]:
    """(verification JWKS, records, checkpoints) from the Admin service's ExportAudit."""
    jwks = ""
    records: list[AuditRecord] = []
    checkpoints: list[Checkpoint] = []
    request = admin_pb2.ExportAuditRequest(since_ms=since_ms, after_seq=after_seq)
    with channel_from_args(args) as channel:
        for item in admin_pb2_grpc.AdminStub(channel).ExportAudit(request, timeout=600):
            which = item.WhichOneof("item")
            if which == "verification_keys_jwks":
                jwks = item.verification_keys_jwks
            elif which == "record":
                records.append(_record_of(item.record))
            elif which == "checkpoint":
                checkpoints.append(_checkpoint_of(item.checkpoint))
    return jwks, records, checkpoints


def _local_keyring_jwks(config: ServerConfig) -> str:
    """The server's signing keys as a JWKS; none are made if the server never made them."""
    from attestd.service.admin import verification_jwks
    from attestd.service.keys import SigningKeyring

    if (
        not (config.data_dir / "keys" / "keys.json").exists()
        and not (config.data_dir / "signing-key.pem").exists()
    ):
        return json.dumps({"keys": []})
    try:
        return verification_jwks(SigningKeyring(config.data_dir, 3600, _now_ms()))
    except Exception as e:  # unreadable or unsafe key files: ConfigError, OSError, ValueError
        raise AdminCliError(f"cannot read the signing keys in {config.data_dir}: {e}") from None


def _fetch_local(
    args: argparse.Namespace, since_ms: int, after_seq: int
) -> tuple[str, list[AuditRecord], list[Checkpoint]]:
    from attestd.service.admin import EXPORT_BATCH
    from attestd.store.base import StoreError

    with _local(args) as (config, store):
        jwks = _local_keyring_jwks(config)
        records: list[AuditRecord] = []
        cursor = after_seq
        try:
            while True:
                batch = store.audit_records(cursor, since_ms, EXPORT_BATCH)
                records.extend(batch)
                if len(batch) < EXPORT_BATCH:
                    break
                cursor = batch[-1].seq
            if records:  # the checkpoints over these records (as the server exports them)
                checkpoints = store.audit_checkpoints(records[0].seq - 1)
            else:  # none: the checkpoints in the range asked for (all of them, unfiltered)
                checkpoints = [c for c in store.audit_checkpoints(after_seq) if c.at_ms >= since_ms]
        except (StoreError, ValueError) as e:
            raise AdminCliError(f"cannot read the audit log: {e}") from None
    return jwks, records, checkpoints


def _fetch(
    args: argparse.Namespace, since_ms: int = 0, after_seq: int = 0
) -> tuple[str, list[AuditRecord], list[Checkpoint]]:
    if _is_local(args):
        return _fetch_local(args, since_ms, after_seq)
    return _fetch_remote(args, since_ms, after_seq)


def _write_lines(f: IO[str], records: list[AuditRecord], checkpoints: list[Checkpoint]) -> None:
    for r in records:
        f.write(json.dumps(record_to_json(r), sort_keys=True) + "\n")
    for c in checkpoints:
        f.write(json.dumps(checkpoint_to_json(c), sort_keys=True) + "\n")


def cmd_audit_export(args: argparse.Namespace) -> int:
    since_ms = parse_time_ms(args.since) if args.since else 0
    if args.after_seq < 0:
        raise AdminCliError("--after-seq must be 0 or more")
    jwks, records, checkpoints = _fetch(args, since_ms, args.after_seq)
    try:
        if args.jwks_out:
            Path(args.jwks_out).write_text(jwks + "\n")
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                _write_lines(f, records, checkpoints)
        else:
            _write_lines(sys.stdout, records, checkpoints)
            sys.stdout.flush()
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            raise
        raise AdminCliError(f"cannot write {e.filename or 'the export'}: {e.strerror}") from None
    if args.out:
        print(f"exported {len(records)} records and {len(checkpoints)} checkpoints to {args.out}")
    if args.jwks_out:
        print(f"verification keys written to {args.jwks_out} (audit verify --jwks)")
    return EXIT_OK


def keys_from_jwks(text: str, where: str) -> dict[str, ec.EllipticCurvePublicKey]:
    """EC P-256 public keys by kid from a JWKS (``{"keys": [...]}``)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from attestd.core.ear import b64url_decode

    try:
        doc = json.loads(text)
        entries = doc["keys"]
        if not isinstance(entries, list):
            raise TypeError("keys is not a list")
    except (ValueError, KeyError, TypeError) as e:
        raise AdminCliError(f"{where}: not a JWKS ({e})") from None
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for i, jwk in enumerate(entries):
        try:
            if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
                raise ValueError("not an EC P-256 key")
            kid, x, y = jwk["kid"], b64url_decode(jwk["x"]), b64url_decode(jwk["y"])
            if not isinstance(kid, str) or not kid or len(x) != 32 or len(y) != 32:
                raise ValueError("kid, x or y is malformed")
            numbers = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            )
            keys[kid] = numbers.public_key()
        except (ValueError, KeyError, TypeError) as e:
            raise AdminCliError(f"{where}: key {i + 1}: {e}") from None
    return keys


def _read_export(path: str) -> tuple[list[AuditRecord], list[Checkpoint]]:
    records: list[AuditRecord] = []
    checkpoints: list[Checkpoint] = []
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = parse_export_line(line.rstrip(b"\r\n"))
                except ValueError as e:
                    raise AdminCliError(f"{path} line {number}: {e}") from None
                if isinstance(item, AuditRecord):
                    records.append(item)
                else:
                    checkpoints.append(item)
    except OSError as e:
        raise AdminCliError(f"cannot read {path}: {e.strerror}") from None
    return records, checkpoints


def _finding_json(f: Finding) -> dict[str, Any]:
    return {"seq": f.seq, "code": f.code, "message": f.message}


def cmd_audit_verify(args: argparse.Namespace) -> int:
    if args.file:
        if not args.jwks:
            raise AdminCliError(
                "--file needs --jwks FILE: the verification keys (audit export --jwks-out)"
            )
        records, checkpoints = _read_export(args.file)
        jwks = ""
    else:
        jwks, records, checkpoints = _fetch(args)
    if args.jwks:  # keys the auditor holds, rather than the ones the source hands out
        try:
            with open(args.jwks, encoding="utf-8") as jf:
                jwks = jf.read(MAX_JWKS)
        except (OSError, UnicodeDecodeError) as e:
            raise AdminCliError(f"cannot read {args.jwks}: {e}") from None
        keys = keys_from_jwks(jwks, args.jwks)
    else:
        keys = keys_from_jwks(jwks or '{"keys": []}', "the server's verification keys")
    first = min((r.seq for r in records), default=1)
    # A whole log starts from the genesis hash; a partial export is checked as a suffix.
    whole = not args.file or first == 1
    findings = verify_log(records, checkpoints, keys, first_prev_hash=GENESIS if whole else None)
    last_cp = max((c.seq for c in checkpoints), default=0)
    after = sum(1 for r in records if r.seq > last_cp)
    if args.json:
        doc = {
            "intact": not findings,
            "records": len(records),
            "checkpoints": len(checkpoints),
            "first_seq": first if records else 0,
            "last_checkpoint_seq": last_cp,
            "records_after_last_checkpoint": after,
            "whole_log": whole,
            "findings": [_finding_json(f) for f in findings],
        }
        print(json.dumps(doc, indent=2))
        return EXIT_INVALID if findings else EXIT_OK
    if not whole:
        print(f"the export starts at record {first}: checked as the tail of a longer log")
    if findings:
        for f in findings:
            print(f"seq {f.seq}: {f.code}: {f.message}")
        print(f"audit log NOT intact: {len(findings)} finding(s)")
        return EXIT_INVALID
    if checkpoints:
        print(
            f"audit log intact: {len(records)} records, {len(checkpoints)} checkpoints, last"
            f" checkpoint at seq {last_cp}; {after} records after it are protected by the"
            " chain only"
        )
    else:
        print(
            f"audit log intact: {len(records)} records, 0 checkpoints; all {after} records are"
            " protected by the chain only"
        )
    return EXIT_OK


# --- parsers ------------------------------------------------------------------------


def _admin_options(p: argparse.ArgumentParser, server: str) -> None:
    add_connection_args(p, server)
    local = p.add_argument_group("local mode (on the server host)")
    local.add_argument("--data-dir", metavar="DIR", help=LOCAL_HELP)
    local.add_argument(
        "--config",
        metavar="FILE",
        help="the server's configuration file (its data_dir and client CA settings);"
        " implies local mode",
    )
    p.set_defaults(role_hint="admin", local_hint=LOCAL_HINT)


def _role_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", required=True, choices=GRANTABLE, help="what the caller may do")
    p.add_argument("--name", required=True, help="who or what it is for (letters, digits, ._@+-)")


def register(sub: Any, device_sub: Any, server: str) -> None:
    description = (
        "Remote by default (the Admin service; needs an admin credential). With --data-dir DIR"
        " (or --config FILE) the command runs on the server's files directly: run on the"
        " server host; needs access to the data directory. That is how the first admin token"
        " is made: attestd admin token create --role admin --name NAME --data-dir DIR"
    )
    adm = sub.add_parser(
        "admin", help="callers' credentials and TLS set-up", description=description
    ).add_subparsers(dest="admin_command", required=True)

    c = adm.add_parser(
        "tls-init",
        help="a throwaway CA and server certificate, for a trial",
        description="Make a CA and a server certificate (and key) for a trial; production"
        " uses a certificate from its own PKI. The CA's key is not kept.",
    )
    c.add_argument("--out", required=True, metavar="DIR", help="directory for the three files")
    c.add_argument(
        "--host",
        required=True,
        action="append",
        metavar="H",
        help="a DNS name or IP address clients use for the server; repeatable",
    )
    c.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    c.add_argument("--force", action="store_true", help="replace files already in DIR")
    c.set_defaults(func=cmd_tls_init)

    tok = adm.add_parser(
        "token",
        help="API tokens (list and revoke: client certificates too)",
        description=description,
    ).add_subparsers(dest="token_command", required=True)
    c = tok.add_parser(
        "create",
        help="a new API token with a role",
        description="A new API token, shown once (attestd keeps only its hash). " + description,
    )
    _role_options(c)
    c.add_argument(
        "--lifetime",
        type=int,
        default=0,
        metavar="SECONDS",
        help="expire after this long (default 0: until revoked)",
    )
    c.add_argument("--out", metavar="FILE", help="write the token here (mode 0600), not stdout")
    _admin_options(c, server)
    c.set_defaults(func=cmd_token_create)
    c = tok.add_parser("list", help="API tokens and client certificates", description=description)
    c.add_argument("--all", action="store_true", help="include revoked ones")
    c.add_argument("--json", action="store_true")
    _admin_options(c, server)
    c.set_defaults(func=cmd_token_list)
    c = tok.add_parser(
        "revoke",
        help="end a token (tok-…) or client certificate (crt-…) now",
        description=description,
    )
    c.add_argument("id", metavar="ID", help="tok-… or crt-…")
    c.add_argument("--reason", help="why (kept with the credential)")
    _admin_options(c, server)
    c.set_defaults(func=cmd_token_revoke)

    c = adm.add_parser(
        "issue-client-cert",
        help="a role client certificate for the mTLS port (the key is made here)",
        description="Make an EC P-256 key here, have attestd's client CA certify its public"
        " key, and write DIR/NAME-key.pem (0600), DIR/NAME-cert.pem and DIR/client-ca.pem. "
        + description,
    )
    _role_options(c)
    c.add_argument(
        "--out-dir", default=".", metavar="DIR", help="where to write the files (default: here)"
    )
    c.add_argument(
        "--lifetime",
        type=int,
        default=0,
        metavar="SECONDS",
        help="validity (default 0: the server's default, one year)",
    )
    _admin_options(c, server)
    c.set_defaults(func=cmd_issue_client_cert)

    c = device_sub.add_parser(
        "preregister",
        help="allow the devices of a manufacturer's manifest (CSV) to enroll",
        description="Add the devices of a shipping manifest (CSV: ek_cert_serial,"
        " ek_cert_issuer, ek_public_sha256, name, group) to those allowed to enroll when"
        " admission is 'preregistered'. All rows or none. " + description,
    )
    c.add_argument("file", metavar="FILE.csv")
    _admin_options(c, server)
    c.set_defaults(func=cmd_preregister)

    aud = sub.add_parser(
        "audit", help="the tamper-evident audit log", description=description
    ).add_subparsers(dest="audit_command", required=True)
    c = aud.add_parser(
        "export",
        help="records and signed checkpoints as JSON lines",
        description="Write the audit log as JSON lines (records, then checkpoints). " + description,
    )
    c.add_argument(
        "--since",
        metavar="T",
        help="records at or after T: ISO-8601 (2026-11-22T10:00:00Z, 2026-11-22; UTC unless"
        " a zone is given) or unix milliseconds",
    )
    c.add_argument(
        "--after-seq", type=int, default=0, metavar="N", help="records after sequence number N"
    )
    c.add_argument("--out", metavar="FILE", help="write here (default: stdout)")
    c.add_argument(
        "--jwks-out", metavar="FILE", help="also write the checkpoint verification keys (JWKS)"
    )
    _admin_options(c, server)
    c.set_defaults(func=cmd_audit_export)
    c = aud.add_parser(
        "verify",
        help="check the chain and checkpoints; exit 1 if anything was changed",
        description="Check the audit log (from the server, the data directory, or an export"
        " with --file and --jwks) and name every record edited, deleted, inserted or"
        " reordered. " + description,
    )
    c.add_argument("--file", metavar="EXPORT.jsonl", help="a file `audit export` wrote")
    c.add_argument(
        "--jwks",
        metavar="FILE",
        help="verification keys (audit export --jwks-out); required with --file, and"
        " otherwise used instead of the keys the server hands out",
    )
    c.add_argument("--json", action="store_true")
    _admin_options(c, server)
    c.set_defaults(func=cmd_audit_verify)
