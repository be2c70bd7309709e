"""The ``attestd`` and ``attestd-agent`` commands.

Exit codes: 0 success (for attestations: affirming), 1 refused or invalid
evidence (reasons printed), 2 unusable arguments, unreadable files or an
unreachable server, 3 no credential, or one the server refused or whose role
may not make the call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography.utils import CryptographyDeprecationWarning

from attestd import admincli, gatewaycli, policycli
from attestd.connect import (
    ENV_CA_CERT,
    ConnectError,
    add_connection_args,
    channel_from_args,
    connection_from_args,
)
from attestd.core.ear import decode_unverified
from attestd.core.errors import EvidenceError
from attestd.core.quote import appraise_quote, parse_evidence
from attestd.core.toolformats import load_ak, load_pcrs, load_quote_message
from attestd.core.tpm import Bank, parse_attest
from attestd.core.verdict import Verdict
from attestd.service.errors import CODE_KEY

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_AUTH = 0, 1, 2, 3
DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_EVENT_LOG = "/sys/kernel/security/tpm0/binary_bios_measurements"
STATUS_NAMES = {0: "unspecified", 1: "none", 2: "affirming", 3: "warning", 4: "contraindicated"}


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {what} {path}: {e.strerror}") from None


# PERMISSION_DENIED codes that are about the caller's role (others, like
# EK_CHAIN_UNTRUSTED, refuse a device's evidence and stay exit 1).
_ACCESS_CODES = frozenset({"", "ROLE_NOT_ALLOWED", "NOT_YOUR_DEVICE", "METHOD_NOT_ALLOWED"})
_TLS_WORDS = ("ssl", "tls", "handshake", "certificate")


def _rpc_error(e: grpc.RpcError, role_hint: str = "", local_hint: str = "") -> CliError:
    code = e.code() if isinstance(e, grpc.Call) else None
    reason = ""
    if isinstance(e, grpc.Call):
        reason = dict(e.trailing_metadata() or ()).get(CODE_KEY, "")
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        message = f"server unreachable: {details}"
        if any(word in (details or "").lower() for word in _TLS_WORDS):
            message += (
                f"\nhint: TLS failed; give the CA that signed the server's certificate"
                f" (--ca-cert / ${ENV_CA_CERT}), or --insecure for a server run with --insecure"
            )
        return CliError(message)
    role = f"the {role_hint} role" if role_hint else "the role this command needs"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        what = "no credential" if reason == "CREDENTIAL_REQUIRED" else "credential refused"
        return CliError(
            f"{what}: {reason or code.name}: {details}\nhint: give an API token"
            f" (ATTESTD_TOKEN / --token-file) or a client certificate (--client-cert /"
            f" --client-key, on the server's mTLS port) with {role}{local_hint}",
            EXIT_AUTH,
        )
    if code == grpc.StatusCode.PERMISSION_DENIED and reason in _ACCESS_CODES:
        return CliError(
            f"not allowed: {reason or code.name}: {details}\nhint: this command needs a"
            f" credential with {role}{local_hint}",
            EXIT_AUTH,
        )
    name = code.name if code else "ERROR"
    return CliError(f"refused: {name} {reason}: {details}", EXIT_INVALID)


# --- attestd serve --------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from attestd.service.config import ConfigError, load_config
    from attestd.service.server import WorkerFailed, serve, serve_workers
    from attestd.store.base import StoreError

    if args.log_level:  # attestd's own loggers (debug: every call, by which worker)
        logging.getLogger("attestd").setLevel(args.log_level.upper())
    try:
        config = load_config(
            Path(args.config) if args.config else None,
            {
                "listen": args.listen,
                "data_dir": args.data_dir,
                "ek_roots": tuple(args.ek_root or ()),
                "ek_intermediates": tuple(args.ek_intermediate or ()),
                "nonce_ttl_s": args.nonce_ttl,
                "credential_lifetime_s": args.credential_lifetime,
                "default_policy": args.default_policy,
                "workers": args.workers,
                "history_per_device": args.history_per_device,
                "event_retention": args.event_retention,
                "tls_cert": args.tls_cert,
                "tls_key": args.tls_key,
                # None, not False: the config file may set it too.
                "insecure": True if args.insecure else None,
                "mtls_listen": args.mtls_listen,
                "client_ca_cert": args.client_ca_cert,
                "client_ca_key": args.client_ca_key,
                "admission": args.admission,
            },
        )
        workers = config.worker_count()
        if workers == 1:
            asyncio.run(serve(config))
        else:
            serve_workers(
                config,
                workers,
                logging.getLogger().getEffectiveLevel(),
                logging.getLogger("attestd").level,
            )
    except ConfigError as e:
        raise CliError(f"configuration: {e}") from None
    except WorkerFailed as e:
        raise CliError(str(e), e.exit_code) from None
    except (OSError, StoreError) as e:
        raise CliError(str(e)) from None
    return EXIT_OK


# --- attestd policy / device (over gRPC) ---------------------------------


def _channel(args: argparse.Namespace) -> grpc.Channel:
    return channel_from_args(args)


def cmd_device_show(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from attestd.v1 import enrollment_pb2, enrollment_pb2_grpc

    with _channel(args) as ch:
        info = enrollment_pb2_grpc.DevicesStub(ch).GetDevice(
            enrollment_pb2.GetDeviceRequest(device_id=args.device_id)
        )
    if args.json:
        print(json.dumps(MessageToDict(info, preserving_proto_field_name=True), indent=2))
        return EXIT_OK
    print(f"device      {info.device_id}")
    print(f"TPM         {info.tpm_manufacturer} {info.tpm_model} {info.tpm_version}")
    print(f"EK issuer   {info.ek_cert_issuer} serial {info.ek_cert_serial}")
    print(f"AK name     {info.ak_name}")
    print(f"group       {info.group or '(none)'} ({info.group_source})")
    effective = (
        f"{info.effective_policy_name}@{info.effective_policy_version}"
        if info.effective_policy_name
        else "(none: attestation is refused until one exists)"
    )
    print(f"policy      {effective}")
    if info.HasField("latest_verdict"):
        v = info.latest_verdict
        print(
            f"verdict     {STATUS_NAMES[v.status].upper()} with {v.policy_name}@{v.policy_version}"
        )
        for f in v.failures:
            print(f"  - {f.code} {f.subject}: {f.detail}")
    else:
        print("verdict     (no attestation yet)")
    return EXIT_OK


# --- attestd check-quote (offline, the pure core) -------------------------


def cmd_check_quote(args: argparse.Namespace) -> int:
    ak_bytes = _read(args.ak, "AK")
    message = load_quote_message(_read(args.quote, "quote message"))
    sig = _read(args.sig, "signature")
    pcrs_bytes = _read(args.pcrs, "PCR file")
    nonce = None
    if args.nonce is not None:
        try:
            nonce = bytes.fromhex(args.nonce.removeprefix("0x"))
        except ValueError:
            raise CliError("--nonce must be hex") from None
    required = None
    if args.hash:
        try:
            required = Bank.parse(args.hash).alg
        except ValueError as e:
            raise CliError(f"--hash: {e}") from None
    try:
        ak = load_ak(ak_bytes, "ak")
        attest = parse_attest(message, "quote")
        pcrs = load_pcrs(pcrs_bytes, attest.pcr_select, "pcrs")
        evidence = parse_evidence(message, sig, pcrs)
    except EvidenceError as e:
        return _report_invalid(args, str(e), getattr(e, "code", "MALFORMED"))
    appraisal = appraise_quote(
        evidence,
        ak,
        nonce=nonce,
        policy=None,
        previous=None,
        now_ms=0,
        allow_sha1=args.allow_sha1,
        required_hash=required,
    )
    verdict = appraisal.verdict
    ok = not verdict.failures
    if args.json:
        print(
            json.dumps(
                _verdict_json(verdict)
                | {
                    "valid": ok,
                    "clock": {
                        "clock": attest.clock_info.clock,
                        "reset_count": attest.clock_info.reset_count,
                        "restart_count": attest.clock_info.restart_count,
                        "safe": attest.clock_info.safe,
                        "firmware_version": attest.firmware_version,
                    },
                },
                indent=2,
            )
        )
    else:
        print("quote valid" if ok else "quote INVALID")
        _print_findings(verdict)
    return EXIT_OK if ok else EXIT_INVALID


def _report_invalid(args: argparse.Namespace, message: str, code: str) -> int:
    if args.json:
        print(
            json.dumps({"valid": False, "failures": [{"code": code, "detail": message}]}, indent=2)
        )
    else:
        print(f"quote INVALID\n  - {code}: {message}")
    return EXIT_INVALID


def _verdict_json(v: Verdict) -> dict[str, Any]:
    return {
        "status": v.status.value,
        "trustworthiness_vector": v.trust_vector.as_ear(),
        "failures": [f.as_dict() for f in v.failures],
        "warnings": [f.as_dict() for f in v.warnings],
    }


def _print_findings(v: Verdict) -> None:
    for f in v.failures:
        line = f"  - {f.code.value} {f.subject}: {f.detail}"
        if f.expected or f.got:
            line += f"\n      expected {f.expected}\n      got      {f.got}"
        print(line)
    for w in v.warnings:
        print(f"  ! {w.code.value} {w.subject}: {w.detail}")


# --- attestd eventlog (offline, the pure core) ----------------------------


def _load_log(path: str) -> Any:
    from attestd.core.eventlog import parse_event_log

    return parse_event_log(_read(path, "event log"))


def cmd_eventlog_replay(args: argparse.Namespace) -> int:
    from attestd.core.eventlog import replay

    pcrs = replay(_load_log(args.file))
    doc = {
        "pcrs": {
            bank.value: {str(i): d.hex() for i, d in sorted(values.items())}
            for bank, values in pcrs.items()
        }
    }
    if args.json:
        print(json.dumps(doc))
    else:
        for bank, values in doc["pcrs"].items():
            print(f"{bank}:")
            for i, d in values.items():
                print(f"  {int(i):2d} : 0x{d}")
    return EXIT_OK


def cmd_eventlog_show(args: argparse.Namespace) -> int:
    log = _load_log(args.file)
    events = [
        {
            "number": e.number,
            "offset": e.offset,
            "pcr": e.pcr,
            "type": e.type_name,
            "digests": {_alg_label(a): d.hex() for a, d in e.digests.items()},
            "size": len(e.data),
        }
        for e in log.events
    ]
    if args.json:
        print(json.dumps({"format": log.format, "events": events}, indent=2))
        return EXIT_OK
    print(f"{log.format} event log, {len(events)} events, {log.size} bytes")
    for ev in events:
        digest = ev["digests"].get("sha256") or next(iter(ev["digests"].values()), "")
        where = f"{ev['number']:4d}  PCR {ev['pcr']:2d}"
        print(f"{where}  {ev['type']:<34} {digest[:16]}…  {ev['size']} B")
    return EXIT_OK


def _alg_label(alg: int) -> str:
    try:
        return Bank.from_alg(alg).value
    except ValueError:
        return f"0x{alg:04x}"


def cmd_eventlog_state(args: argparse.Namespace) -> int:
    from attestd.core.bootstate import check_events, extract_state

    log = _load_log(args.file)
    state = extract_state(log).to_json()
    findings = [f.as_dict() for f in check_events(log)]
    if args.json:
        print(json.dumps(state | {"findings": findings}, indent=2))
    else:
        import yaml

        print(yaml.safe_dump(state | {"findings": findings}, sort_keys=False), end="")
    return EXIT_OK


# --- attestd-agent --------------------------------------------------------


def _agent(args: argparse.Namespace) -> Any:
    from attestd.agent.client import Agent, AgentConfig

    conn = connection_from_args(args)
    return Agent(
        AgentConfig(
            server=conn.server,
            tcti=args.tcti,
            state_dir=Path(args.state_dir),
            ak_handle=int(args.ak_handle, 0),
            ek_type=args.ek_type,
            ca_cert=conn.ca_cert,
            insecure=conn.insecure,
        )
    )


def cmd_agent_enroll(args: argparse.Namespace) -> int:
    inters = [_read(p, "intermediate certificate") for p in args.ek_intermediate or ()]
    agent = _agent(args)
    try:
        done = agent.enroll(new_ak=args.new_ak, ak_alg=args.ak_alg, intermediates=inters)
    finally:
        agent.close()
    if args.json:
        print(json.dumps({"device_id": done.device_id, "ak_name": done.ak_name}))
    else:
        print(f"enrolled {done.device_id} (AK name {done.ak_name[:20]}…)")
    return EXIT_OK


def cmd_agent_attest(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    event_log = b""
    if not args.no_event_log:
        path = Path(args.event_log or DEFAULT_EVENT_LOG)
        if args.event_log or path.exists():
            event_log = _read(str(path), "event log")
    bind_key = not args.no_key_binding
    agent = _agent(args)
    try:
        resp = agent.attest(event_log, bind_key=bind_key)
    finally:
        agent.close()
    v = resp.verdict
    if args.credential_out and resp.credential:
        from attestd.privatefile import write_private

        write_private(Path(args.credential_out), resp.credential.encode())
    if args.json:
        out = MessageToDict(resp, preserving_proto_field_name=True)
        if resp.credential:
            out["credential_claims"] = decode_unverified(resp.credential)
            out["credential_path"] = str(agent.credential_path)
        if bind_key:
            out["tls_key_path"] = str(agent.tls_key_path)
        if resp.client_certificate:
            out["client_certificate_path"] = str(agent.client_cert_path)
        print(json.dumps(out, indent=2))
    else:
        print(
            f"verdict: {STATUS_NAMES[v.status].upper()} (policy {v.policy_name}@{v.policy_version})"
        )
        for f in v.failures:
            print(f"  - {f.code} {f.subject}: {f.detail}")
            if f.expected or f.got:
                print(f"      expected {f.expected}\n      got      {f.got}")
        for w in v.warnings:
            print(f"  ! {w.code} {w.subject}: {w.detail}")
        if resp.credential:
            where = args.credential_out or str(agent.credential_path)
            print(f"credential saved to {where}")
            if resp.client_certificate:
                print(f"client certificate saved to {agent.client_cert_path}")
                print(f"its TPM key (TSS2, for the tpm2 OpenSSL provider) is {agent.tls_key_path}")
            elif bind_key:
                print(f"no client certificate issued for the TPM key {agent.tls_key_path}")
        else:
            print("no credential issued")
    return EXIT_OK if v.status == 2 else EXIT_INVALID


def cmd_agent_run(args: argparse.Namespace) -> int:
    """Attest now and again before each credential expires, until stopped (SIGTERM/SIGINT)."""
    import signal
    import threading
    import time

    from attestd.agent.client import NotAffirmingError

    log_path: Path | None = None
    if not args.no_event_log:
        candidate = Path(args.event_log or DEFAULT_EVENT_LOG)
        if args.event_log or candidate.exists():
            log_path = candidate

    def read_event_log() -> bytes:  # read anew for every attestation
        return _read(str(log_path), "event log") if log_path else b""

    if args.max_renewals is not None and args.max_renewals < 0:
        raise CliError("--max-renewals must be 0 or more")
    bind_key = not args.no_key_binding
    max_renewals = 0 if args.once else args.max_renewals
    stop = threading.Event()
    agent = _agent(args)

    def attested(resp: Any, next_s: float | None) -> None:
        v = resp.verdict
        until = time.strftime(
            "%Y-%m-%dT%H:%M:%S%z", time.localtime(resp.credential_expires_at_ms / 1000)
        )
        parts = [
            f"attested: {STATUS_NAMES[v.status].upper()} "
            f"(policy {v.policy_name}@{v.policy_version})",
            f"credential {agent.credential_path} valid until {until}",
        ]
        if resp.client_certificate:
            parts.append(f"client certificate {agent.client_cert_path}")
            parts.append(f"key {agent.tls_key_path}")
        elif bind_key:
            parts.append("no client certificate issued")
        parts.append("done" if next_s is None else f"next renewal in {next_s:.0f} s")
        print("; ".join(parts), flush=True)

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        agent.run(
            read_event_log,
            bind_key=bind_key,
            stop=stop,
            max_renewals=max_renewals,
            on_attested=attested,
        )
    except NotAffirmingError as e:
        v = e.response.verdict
        print(
            f"verdict: {STATUS_NAMES[v.status].upper()} (policy {v.policy_name}@{v.policy_version})"
            "; giving up"
        )
        for f in v.failures:
            print(f"  - {f.code} {f.subject}: {f.detail}")
        return EXIT_INVALID
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        agent.close()
    if stop.is_set():
        print("stopped", flush=True)
    return EXIT_OK


def parse_selection(text: str) -> list[tuple[str, list[int]]]:
    """``sha256:0,1,2,7+sha1:0-7`` -> [(bank, indices)]."""
    out: list[tuple[str, list[int]]] = []
    for part in text.split("+"):
        bank, _, idx = part.partition(":")
        try:
            Bank.parse(bank)
            indices: list[int] = []
            for item in idx.split(","):
                lo, _, hi = item.partition("-")
                indices.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError as e:
            raise CliError(f"--pcrs {text!r}: {e}") from None
        if not indices or any(not 0 <= i < 24 for i in indices):
            raise CliError(f"--pcrs {text!r}: indices must be 0-23")
        out.append((bank.lower(), sorted(set(indices))))
    return out


def cmd_agent_capture(args: argparse.Namespace) -> int:
    import yaml

    from attestd.agent.client import capture_policy

    doc = capture_policy(args.tcti, args.name, parse_selection(args.pcrs))
    text = yaml.safe_dump(doc, sort_keys=False)
    if args.output:
        Path(args.output).write_text(text)
        print(f"policy {args.name} written to {args.output}")
    else:
        print(text, end="")
    return EXIT_OK


# --- argument parsing -----------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attestd", description="TPM 2.0 attestation verifier")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC server")
    s.add_argument("--config", help="YAML configuration file")
    s.add_argument("--listen", help=f"address to listen on (default {DEFAULT_SERVER})")
    s.add_argument("--data-dir", help="directory for the store and keys (default ./attestd-data)")
    s.add_argument("--ek-root", action="append", help="trusted EK root CA (PEM); repeatable")
    s.add_argument(
        "--ek-intermediate", action="append", help="EK intermediate CA (PEM); repeatable"
    )
    s.add_argument("--nonce-ttl", type=int, help="nonce lifetime in seconds (default 60)")
    s.add_argument("--credential-lifetime", type=int, help="credential lifetime in seconds (3600)")
    s.add_argument("--default-policy", help="policy for devices with none assigned ('default')")
    s.add_argument(
        "--workers",
        type=int,
        help="processes serving the port (default: one per CPU; one with port 0)",
    )
    s.add_argument(
        "--history-per-device", type=int, help="attestations kept per device (default 100)"
    )
    s.add_argument("--event-retention", type=int, help="verdict events kept (default 100000)")
    s.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="server log level (debug logs every call); overrides -v",
    )
    t = s.add_argument_group("security")
    t.add_argument(
        "--tls-cert",
        help="the server's TLS certificate chain (PEM; `attestd admin tls-init` makes a trial one)",
    )
    t.add_argument("--tls-key", help="its private key (PEM, readable by this user only)")
    t.add_argument(
        "--insecure",
        action="store_true",
        help="serve plaintext without TLS, on a trusted loopback only (no mTLS port)",
    )
    t.add_argument(
        "--mtls-listen",
        help="address of the port for role client certificates (default 127.0.0.1:50052;"
        " '' disables it)",
    )
    t.add_argument(
        "--client-ca-cert",
        help="CA (PEM) issuing role client certificates (default: one made in the data dir)",
    )
    t.add_argument("--client-ca-key", help="its private key (PEM)")
    t.add_argument(
        "--admission",
        choices=("any", "preregistered"),
        help="which devices may enroll: any with a trusted EK certificate (default), or only"
        " those listed by `attestd device preregister`",
    )
    s.set_defaults(func=cmd_serve)

    policycli.register(sub, DEFAULT_SERVER)

    dev = sub.add_parser("device", help="enrolled devices").add_subparsers(
        dest="device_command", required=True
    )
    c = dev.add_parser("show", help="a device and its latest verdict")
    c.add_argument("device_id")
    add_connection_args(c, DEFAULT_SERVER)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_device_show, role_hint="policy-author, gateway or admin")
    gatewaycli.register(sub, dev, DEFAULT_SERVER)
    admincli.register(sub, dev, DEFAULT_SERVER)

    c = sub.add_parser("check-quote", help="verify a TPM2 quote offline")
    c.add_argument("--ak", required=True, help="AK: PEM, TPM2B_PUBLIC or TPMT_PUBLIC")
    c.add_argument("--quote", required=True, help="quote message (tpm2_quote -m)")
    c.add_argument("--sig", required=True, help="signature (tpm2_quote -s)")
    c.add_argument("--pcrs", required=True, help="PCR values (tpm2_quote -o, or tpm2_pcrread YAML)")
    c.add_argument("--nonce", help="expected qualifying data, hex")
    c.add_argument("--hash", help="required signature hash algorithm (sha256, …)")
    c.add_argument("--allow-sha1", action="store_true", help="accept SHA-1 signatures")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_check_quote)

    ev = sub.add_parser("eventlog", help="TCG PC Client boot event logs, offline").add_subparsers(
        dest="eventlog_command", required=True
    )
    for name, func, helptext in (
        ("replay", cmd_eventlog_replay, "the PCR values the log replays to, per bank"),
        ("show", cmd_eventlog_show, "list the events"),
        ("state", cmd_eventlog_state, "the boot state the log shows (Secure Boot, keys, loaders…)"),
    ):
        c = ev.add_parser(name, help=helptext)
        c.add_argument("file")
        c.add_argument("--json", action="store_true")
        c.set_defaults(func=func)
    return p


def build_agent_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attestd-agent", description="attestd device agent")
    # Devices never send API tokens: the TPM proves them. Only the server is checked.
    add_connection_args(p, DEFAULT_SERVER, credentials=False)
    p.add_argument(
        "--tcti",
        default="device:/dev/tpmrm0",
        help="TPM TCTI, e.g. swtpm:host=127.0.0.1,port=2321 (default device:/dev/tpmrm0)",
    )
    p.add_argument(
        "--state-dir", default="/var/lib/attestd-agent", help="where the agent keeps state"
    )
    p.add_argument("--ak-handle", default=hex(0x81010002), help="persistent handle of the AK")
    p.add_argument("--ek-type", default="rsa", choices=("rsa", "ecc"), help="which EK to use")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("enroll", help="enroll this TPM with attestd")
    c.add_argument("--new-ak", action="store_true", help="create a new AK even if one exists")
    c.add_argument("--ak-alg", default="rsa", choices=("rsa", "ecc"))
    c.add_argument("--ek-intermediate", action="append", help="EK intermediate CA (DER) to send")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_agent_enroll)
    c = sub.add_parser("attest", help="attest this boot and save the credential")
    c.add_argument(
        "--event-log", help=f"boot event log to send (default {DEFAULT_EVENT_LOG}, if present)"
    )
    c.add_argument("--no-event-log", action="store_true", help="send no event log")
    c.add_argument("--credential-out", help="also write the credential here")
    c.add_argument(
        "--no-key-binding",
        action="store_true",
        help="do not certify the TPM's TLS key (no cnf, no client certificate)",
    )
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_agent_attest)
    c = sub.add_parser(
        "run", help="attest, then renew the credential before it expires, until stopped"
    )
    c.add_argument(
        "--event-log", help=f"boot event log to send (default {DEFAULT_EVENT_LOG}, if present)"
    )
    c.add_argument("--no-event-log", action="store_true", help="send no event log")
    c.add_argument(
        "--no-key-binding",
        action="store_true",
        help="do not certify the TPM's TLS key (no cnf, no client certificate)",
    )
    once = c.add_mutually_exclusive_group()
    once.add_argument("--once", action="store_true", help="attest once and exit")
    once.add_argument(
        "--max-renewals",
        type=int,
        metavar="N",
        help="exit after N renewals (default: run until SIGTERM/SIGINT)",
    )
    c.set_defaults(func=cmd_agent_run)
    c = sub.add_parser("capture", help="write a policy from this device's current PCRs")
    c.add_argument("--name", required=True)
    c.add_argument("--pcrs", default="sha256:0-9", help="selection, e.g. sha256:0-7,9+sha1:0")
    c.add_argument("--output", help="file to write (default: stdout)")
    c.set_defaults(func=cmd_agent_capture)
    return p


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], int] = args.func
    # Real firmware certificates (negative serials, odd names) make cryptography warn on
    # every parse; the state output already shows what was read.
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
    try:
        return func(args)
    except CliError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return e.exit_code
    except admincli.AdminCliError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return e.exit_code
    except (policycli.UsageError, ConnectError) as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader (say, `| head`) went away: not an error of ours.
        sys.stderr.close()
        return EXIT_OK
    except grpc.RpcError as e:
        err = _rpc_error(e, getattr(args, "role_hint", ""), getattr(args, "local_hint", ""))
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return err.exit_code
    except EvidenceError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as e:  # the agent's TPM errors and the like: a message, not a traceback
        from attestd.agent.tpm import AgentError

        if isinstance(e, AgentError):
            print(f"{parser.prog}: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise


def main(argv: Sequence[str] | None = None) -> int:
    return _run(build_parser(), argv)


def agent_main(argv: Sequence[str] | None = None) -> int:
    return _run(build_agent_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
