"""Load generator: drives a running attestd over gRPC from its own process.

Two phases against the same server, same channels, same concurrency:

1. echo: the standard grpc.health.v1.Health/Check RPC, the bare cost of one
   RPC on the server's stack (interceptor, grpc.aio, HTTP/2);
2. attest: each of C callers loops over its own share of simulated devices:
   GetNonce(device) -> TPMS_ATTEST over that nonce (PCR values, selection and
   digest made beforehand; clock advancing) signed with the device's software
   AK -> Attest -> the verdict must be affirming and carry a credential.
   Latency is that whole round, as a device sees it.

Both phases go over TLS to the same port (``--ca-cert``: the CA that signed
attestd's certificate), each caller on its own TLS connection, without a token:
devices need none. ``--insecure`` is for a server run with ``--insecure``.

Each phase has an untimed warm-up, then runs for a fixed time; the rate is
completions in the timed window over its length. With ``--server-pid``, the
CPU time the server processes (that pid and its descendants) used in each
timed window is reported too, per request.

Devices: a working set sampled uniformly from the whole fleet (so store
look-ups land all over the tables and indexes), their AKs derived before any
timing starts. A device is only ever driven by one caller, one attestation at
a time, as a real device would.

Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet import (
    ALG_ECDSA,
    ALG_SHA256,
    ST_ATTEST_QUOTE,
    TPM_GENERATED_VALUE,
    Fleet,
    ak_key,
    ak_public_area,
    object_name,
    tpm2b,
    u16,
    u32,
)

from attestd.connect import ENV_CA_CERT, Connection, open_aio_channel
from attestd.v1 import attestation_pb2, attestation_pb2_grpc, common_pb2

AFFIRMING = common_pb2.VERDICT_STATUS_AFFIRMING
SHA256 = hashes.SHA256()
TICKS = os.sysconf("SC_CLK_TCK")


# --- evidence -------------------------------------------------------------------------


@dataclass
class SimDevice:
    device_id: str
    key: ec.EllipticCurvePrivateKey
    head: bytes  # TPMS_ATTEST up to extraData: magic, type, qualifiedSigner
    last_clock: int = 0


@dataclass(frozen=True)
class Boot:
    """What every device's quote says beside the nonce and clock (made beforehand)."""

    tail: bytes  # resetCount .. pcrDigest
    pcrs: common_pb2.PcrBank


def make_boot(fleet: Fleet) -> Boot:
    values = {int(i): bytes.fromhex(v) for i, v in fleet.pcrs_sha256.items()}
    bitmap = bytearray(3)
    for i in values:
        bitmap[i // 8] |= 1 << (i % 8)
    selection = u32(1) + u16(ALG_SHA256) + bytes([3]) + bytes(bitmap)
    digest = hashlib.sha256(b"".join(values[i] for i in sorted(values))).digest()
    tail = (
        u32(fleet.reset_count)
        + u32(fleet.restart_count)
        + b"\x01"  # safe
        + struct.pack(">Q", fleet.firmware_version)
        + selection
        + tpm2b(digest)
    )
    return Boot(tail, common_pb2.PcrBank(bank="sha256", values=values))


def make_devices(fleet: Fleet, indices: list[int]) -> list[SimDevice]:
    out = []
    for i in indices:
        key = ak_key(fleet.seed, i, fleet.ak_pool)
        name = object_name(ak_public_area(key))
        head = struct.pack(">IH", TPM_GENERATED_VALUE, ST_ATTEST_QUOTE) + tpm2b(name)
        out.append(SimDevice(fleet.device_ids[i], key, head))
    return out


def quote(dev: SimDevice, boot: Boot, nonce: bytes) -> tuple[bytes, bytes]:
    """(TPMS_ATTEST, TPMT_SIGNATURE) over ``nonce``, as TPM2_Quote would return them."""
    clock = max(dev.last_clock + 1, time.time_ns() // 1_000_000)
    dev.last_clock = clock
    message = dev.head + tpm2b(nonce) + struct.pack(">Q", clock) + boot.tail
    r, s = decode_dss_signature(dev.key.sign(message, ec.ECDSA(SHA256)))
    sig = u16(ALG_ECDSA) + u16(ALG_SHA256) + tpm2b(r.to_bytes(32, "big"))
    return message, sig + tpm2b(s.to_bytes(32, "big"))


# --- measurement -----------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of ``pid`` and its descendants (0 without a pid)."""
    if pid is None:
        return 0.0
    total = 0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def summary(latencies_s: list[float], seconds: float) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies_s)
    return {
        "count": len(ms),
        "seconds": round(seconds, 2),
        "per_s": round(len(ms) / seconds, 1),
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(ms[-1], 2) if ms else float("nan"),
    }


async def run_phase(
    callers: list[Callable[[], Awaitable[None]]],
    warmup_s: float,
    seconds: float,
    server_pid: int | None,
    state: dict[str, bool] | None = None,
) -> tuple[list[float], float, float, float]:
    """Run every caller in a loop: warm-up, then a timed window (``state["timing"]``).
    Returns (latencies in the window, window seconds, server CPU s, client CPU s)."""
    latencies: list[float] = []
    state = state if state is not None else {}
    state.update(timing=False, stop=False)

    async def loop(call: Callable[[], Awaitable[None]]) -> None:
        while not state["stop"]:
            t0 = time.perf_counter()
            await call()
            t1 = time.perf_counter()
            if state["timing"]:
                latencies.append(t1 - t0)

    tasks = [asyncio.create_task(loop(c)) for c in callers]
    await asyncio.sleep(warmup_s)
    cpu0, own0 = cpu_seconds(server_pid), own_cpu()
    state["timing"] = True
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    state["timing"] = False
    elapsed = time.perf_counter() - t0
    cpu1, own1 = cpu_seconds(server_pid), own_cpu()
    state["stop"] = True
    await asyncio.gather(*tasks)
    return latencies, elapsed, cpu1 - cpu0, own1 - own0


# --- phases ----------------------------------------------------------------------------


def make_channels(conn: Connection, n: int) -> list[grpc.aio.Channel]:
    # A local subchannel pool: n real connections (several server workers can share them).
    opts = [("grpc.use_local_subchannel_pool", 1)]
    return [open_aio_channel(conn, opts) for _ in range(n)]


class AttestFailed(Exception):
    pass


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    t0 = time.perf_counter()
    if args.echo_only:
        fleet, working_set, devices = None, 0, []
    else:
        fleet = Fleet.load(Path(args.fleet))
        rng = random.Random(args.seed)
        working_set = min(args.working_set or fleet.n_devices, fleet.n_devices)
        if working_set < args.concurrency:
            raise SystemExit("the working set must have at least one device per caller")
        indices = rng.sample(range(fleet.n_devices), working_set)
        devices = make_devices(fleet, indices)
        boot = make_boot(fleet)
    prep_s = time.perf_counter() - t0

    args.channels = args.channels or args.concurrency
    conn = Connection(
        args.target, ca_cert=Path(args.ca_cert) if args.ca_cert else None, insecure=args.insecure
    )
    channels = make_channels(conn, args.channels)
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), 10)
    c = args.concurrency
    health = [health_pb2_grpc.HealthStub(channels[i % len(channels)]) for i in range(c)]
    attest = [attestation_pb2_grpc.AttestationStub(channels[i % len(channels)]) for i in range(c)]
    result: dict[str, object] = {
        "target": args.target,
        "transport": "plaintext" if args.insecure else "TLS",
        "concurrency": c,
        "channels": args.channels,
        "working_set": working_set,
        "fleet_devices": fleet.n_devices if fleet else 0,
        "ak_pool": fleet.ak_pool if fleet else 0,
        "evidence_prep_s": round(prep_s, 2),
    }

    # 1. echo
    check = health_pb2.HealthCheckRequest(service="")

    def echo_caller(stub: health_pb2_grpc.HealthStub) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            resp = await stub.Check(check, timeout=30)
            if resp.status != health_pb2.HealthCheckResponse.SERVING:
                raise AttestFailed(f"health: {resp.status}")

        return call

    lat, secs, server_cpu, client_cpu = await run_phase(
        [echo_caller(s) for s in health], args.warmup, args.echo_seconds, args.server_pid
    )
    echo_lat = lat
    echo = summary(lat, secs)
    echo["server_cpu_us_per_rpc"] = round(server_cpu / max(len(lat), 1) * 1e6, 1)
    echo["client_cpu_us_per_rpc"] = round(client_cpu / max(len(lat), 1) * 1e6, 1)
    result["echo"] = echo
    if args.echo_only:
        if args.raw:
            result["raw_ms"] = {"echo": [round(x * 1000, 3) for x in echo_lat]}
        for ch in channels:
            await ch.close()
        return result

    # 2. attest
    parts = {"nonce": [], "sign": [], "attest": []}  # type: dict[str, list[float]]
    timing: dict[str, bool] = {}
    failures: list[str] = []

    def attest_caller(
        stub: attestation_pb2_grpc.AttestationStub, mine: list[SimDevice]
    ) -> Callable[[], Awaitable[None]]:
        cursor = {"i": 0}

        async def call() -> None:
            dev = mine[cursor["i"] % len(mine)]
            cursor["i"] += 1
            t0 = time.perf_counter()
            got = await stub.GetNonce(
                attestation_pb2.GetNonceRequest(device_id=dev.device_id), timeout=30
            )
            t1 = time.perf_counter()
            message, signature = quote(dev, boot, got.nonce)
            t2 = time.perf_counter()
            resp = await stub.Attest(
                attestation_pb2.AttestRequest(
                    device_id=dev.device_id,
                    nonce=got.nonce,
                    quote=message,
                    signature=signature,
                    pcrs=[boot.pcrs],
                ),
                timeout=30,
            )
            t3 = time.perf_counter()
            if resp.verdict.status != AFFIRMING or not resp.credential:
                failures.append(
                    f"{dev.device_id}: status {resp.verdict.status}, "
                    f"{[f.code for f in resp.verdict.failures]}, credential {bool(resp.credential)}"
                )
                raise AttestFailed(failures[-1])
            if timing["timing"]:
                parts["nonce"].append(t1 - t0)
                parts["sign"].append(t2 - t1)
                parts["attest"].append(t3 - t2)

        return call

    shares = [devices[i::c] for i in range(c)]
    callers = [attest_caller(attest[i], shares[i]) for i in range(c)]

    lat, secs, server_cpu, client_cpu = await run_phase(
        callers, args.warmup, args.attest_seconds, args.server_pid, timing
    )
    att = summary(lat, secs)
    att["server_cpu_us_per_attestation"] = round(server_cpu / max(len(lat), 1) * 1e6, 1)
    att["client_cpu_us_per_attestation"] = round(client_cpu / max(len(lat), 1) * 1e6, 1)
    for name, values in parts.items():
        s = sorted(x * 1000 for x in values)
        att[f"{name}_p50_ms"] = round(percentile(s, 50), 3)
        att[f"{name}_p99_ms"] = round(percentile(s, 99), 3)
    att["failures"] = len(failures)
    result["attest"] = att
    if args.raw:
        result["raw_ms"] = {
            "echo": [round(x * 1000, 3) for x in echo_lat],
            "attest": [round(x * 1000, 3) for x in lat],
            "attest_parts": {k: [round(x * 1000, 3) for x in v] for k, v in parts.items()},
        }
    for ch in channels:
        await ch.close()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", required=True, help="host:port of attestd")
    p.add_argument("--fleet", help="fleet.json written by bench/fleet.py")
    p.add_argument(
        "--ca-cert",
        default=os.environ.get(ENV_CA_CERT),
        help=f"CA (PEM) that signed attestd's TLS certificate (${ENV_CA_CERT};"
        " default: the system's roots)",
    )
    p.add_argument("--insecure", action="store_true", help="plaintext (a server run --insecure)")
    p.add_argument(
        "--echo-only", action="store_true", help="only the echo phase (any gRPC server with Health)"
    )
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--channels", type=int, default=0, help="HTTP/2 connections (0: one per caller)")
    p.add_argument("--echo-seconds", type=float, default=10)
    p.add_argument("--attest-seconds", type=float, default=20)
    p.add_argument("--warmup", type=float, default=3)
    p.add_argument("--working-set", type=int, default=50_000, help="devices driven (0: all)")
    p.add_argument("--server-pid", type=int, help="report the server's CPU time per request")
    p.add_argument("--seed", type=int, default=1, help="which devices form the working set")
    p.add_argument("--raw", action="store_true", help="include every latency (ms) in the output")
    args = p.parse_args()
    if not args.echo_only and not args.fleet:
        p.error("--fleet is required (or --echo-only)")
    if args.insecure and args.ca_cert:
        p.error("--insecure uses no certificate")
    result = asyncio.run(main_async(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
