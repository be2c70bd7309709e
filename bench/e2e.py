"""End-to-end benchmark over gRPC, and the same at fleet scale.

Fleet sizes: quick, 1 thousand devices; full, 1 thousand, 100 thousand and
1 million.

1. bench/fleet.py bulk-loads a fresh data directory per size (real schema,
   enrolled devices with software EKs/AKs, each with the rows of an earlier
   affirming attestation unless --no-history, the policy ``default``), in a
   subprocess with a time bound;
2. one ``attestd serve --data-dir D --listen 127.0.0.1:PORT`` per size starts
   as an operator would run it (with ``--workers N`` when this attestd has
   that flag; the choice is recorded), and is waited for until healthy. It
   serves TLS, as deployed, with a trial CA made for the run (attestd admin
   tls-init's code), its mTLS port on a free port, and a config file raising
   the abuse limits (GetNonce per peer address and per device, outstanding
   nonces): every simulated device calls from this one address.
   Each store's database file is kept mapped by this process (every page faulted
   in, renewed before each round; --no-resident leaves it): the page cache holds it
   as on a machine with memory for it, whatever the machine reclaims from idle page
   cache (see ResidentStore; what reclaim this machine runs is recorded);
3. in rounds, each size's server in turn (order rotated), bench/loadgen.py
   runs in its own process with C concurrent callers over TLS (devices need no
   token): first the bare echo RPC (grpc.health.v1.Health/Check, on the same
   TLS port), then attestations (GetNonce -> quote signed
   over the fresh nonce -> Attest -> affirming verdict and a credential), each
   after a warm-up, for a fixed time. Background load on this shared machine
   thus falls on every size, and on echo and attest, alike;
4. measured beside it: the server's peak memory (sum of VmHWM over the
   server's processes), the store's size (attestd.sqlite + -wal), and the
   server's and client's CPU time per request;
5. the load sweep: on the smallest fleet's server, the same runs with several
   numbers of callers (a closed loop: latency grows with callers once the
   server is saturated), levels in rotated order per round;
6. the servers are stopped (SIGTERM, by pid) and the data directories removed.

Rates are medians over rounds; latency percentiles are over all rounds pooled.
Prints the tables and merges into build/bench.json, keeping other keys:
e2e_attest_per_s, e2e_p50_ms and e2e_p99_ms at the sweep's level with the
most attestations/s among those with p99 <= 50 ms (the target's "at that
load"; the highest rate if none is), echo_rpc_per_s (the highest echo rate
measured on that server at any level), e2e_load_sweep (every level),
e2e_notes, and fleet (keyed by device count, this run's sizes only, at
--concurrency callers).

The load generator and the server share this machine's cores (2 here): the
client's own CPU per request is reported so the figures can be read with that
in mind. Read ratios within a run, not absolutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attestd.connect import Connection, open_channel
from attestd.tlsinit import TlsFiles, init_tls

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from fleet import ak_public_area_tpm2b  # noqa: E402
from loadgen import descendants, percentile  # noqa: E402

TARGETS = {
    "attest_vs_echo": 0.40,  # attestations/s >= 40% of echo RPCs/s
    "p99_ms": 50.0,  # at that load
    "fleet_latency_ratio": 1.2,  # 1M devices vs 1k
    "server_memory_mb_1m": 300.0,
}


# The load generator is one address driving a whole fleet as fast as it can: the
# per-address and per-device abuse limits (GetNonce, Enroll) must not be what is measured.
BENCH_LIMITS = {
    "peer_rate_per_s": 1e9,
    "peer_burst": 1_000_000_000,
    "device_rate_per_s": 1e9,
    "device_burst": 1_000_000_000,
    "max_outstanding_nonces": 1000,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def attestd_exe() -> str:
    exe = Path(sys.executable).parent / "attestd"
    return str(exe) if exe.exists() else shutil.which("attestd") or "attestd"


def supports_workers() -> bool:
    out = subprocess.run(
        [attestd_exe(), "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    return "--workers" in out.stdout


def git_state() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "attestd"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" + uncommitted changes in attestd/" if dirty else "")


def status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_mb(pid: int, field: str) -> tuple[float, list[float]]:
    """Sum and per-process values of ``field`` (VmHWM, VmRSS) over pid and descendants."""
    per = [status_kb(p, field) / 1024 for p in descendants(pid)]
    return sum(per), per


def store_bytes(data_dir: Path) -> dict[str, int]:
    out = {}
    for suffix in ("", "-wal", "-shm"):
        f = data_dir / f"attestd.sqlite{suffix}"
        out[suffix or "db"] = f.stat().st_size if f.exists() else 0
    return out


class Server:
    """``attestd serve`` as a child process of ours (TLS); stopped by its pid only."""

    def __init__(self, data_dir: Path, workers: int | None, tls: TlsFiles) -> None:
        self.port = free_port()
        self.tls = tls
        config = data_dir.parent / f"server-{data_dir.name}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "tls_cert": str(tls.server_cert),
                    "tls_key": str(tls.server_key),
                    # Explicit: several workers share it, and it must not clash.
                    "mtls_listen": f"127.0.0.1:{free_port()}",
                    **BENCH_LIMITS,
                }
            )
        )
        cmd = [
            attestd_exe(),
            "serve",
            "--config",
            str(config),
            "--data-dir",
            str(data_dir),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--ek-root",
            str(data_dir / "bench-ek-ca.pem"),
        ]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        self.log = open(data_dir.parent / f"server-{data_dir.name}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.address = self._wait_line(60)
        self._wait_healthy(60)

    def _wait_line(self, timeout: float) -> str:
        line: list[str] = []
        assert self.proc.stdout is not None
        reader = threading.Thread(
            target=lambda: line.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(timeout)
        if not line or not line[0].startswith("attestd serving on "):
            self.stop()
            raise RuntimeError(f"attestd did not start: {line!r}; see {self.log.name}")
        return line[0].split()[-1]

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with open_channel(Connection(self.address, ca_cert=self.tls.ca_cert)) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("attestd never became healthy")
                time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


DAMON = Path("/sys/kernel/mm/damon/admin/kdamonds")


def page_reclaim() -> str:
    """Proactive reclaim of idle page cache running on this machine, if any (DAMON, sysfs).

    Such a scheme drops the file pages of a store nobody read for a while: a fleet whose
    server sat idle while the others' rounds ran would read its store from disk again.
    """
    found = []
    for ctx in sorted(DAMON.glob("[0-9]*/contexts/[0-9]*")):
        try:
            if (ctx.parents[1] / "state").read_text().strip() != "on":
                continue
            aggr_s = int((ctx / "monitoring_attrs/intervals/aggr_us").read_text()) / 1e6
            for scheme in sorted((ctx / "schemes").glob("[0-9]*")):
                action = (scheme / "action").read_text().strip()
                age = int((scheme / "access_pattern/age/min").read_text())
                found.append(f"DAMON {action} of regions idle >= {age * aggr_s:g} s")
        except (OSError, ValueError):
            continue
    return "; ".join(found) or "none found"


class ResidentStore:
    """A fleet's database file kept mapped by the benchmark (every page faulted in), so
    its page cache stays as on a machine with memory to spare for it.

    Mapped file pages are not what proactive reclaim of idle page cache (above) takes:
    without this, a 1,000,000-device store idle while the other fleets run is partly
    dropped and read from disk again in its next round, and that measures the machine's
    reclaim, not attestd. Renewed before each round (the file grows). The mapping is
    this process's, not the server's: the server's memory figures do not include it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        self.refresh()

    def refresh(self) -> None:
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            new = mmap.mmap(
                f.fileno(),
                size,
                flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                prot=mmap.PROT_READ,
            )
        self.close()
        self._map = new

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def bulk_load(data_dir: Path, n: int, ak_pool: int, history: bool, timeout: float) -> float:
    if data_dir.exists():
        shutil.rmtree(data_dir)
    t0 = time.monotonic()
    cmd = [sys.executable, str(HERE / "fleet.py"), str(data_dir), str(n)]
    if ak_pool:
        cmd += ["--ak-pool", str(ak_pool)]
    if not history:
        cmd += ["--no-history"]
    subprocess.run(cmd, check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def run_loadgen(
    server: Server, data_dir: Path, args: argparse.Namespace, seed: int, concurrency: int
) -> Any:
    # The previous round's writes reach the disk first: rounds alternate between servers,
    # and the kernel writing one server's pages back (or a sync in the next server waiting
    # behind it) must not land in another's timed window.
    os.sync()
    cmd = [
        sys.executable,
        str(HERE / "loadgen.py"),
        "--target",
        server.address,
        "--ca-cert",
        str(server.tls.ca_cert),
        "--fleet",
        str(data_dir / "fleet.json"),
        "--concurrency",
        str(concurrency),
        "--channels",
        str(args.channels),
        "--echo-seconds",
        str(args.echo_seconds),
        "--attest-seconds",
        str(args.attest_seconds),
        "--warmup",
        str(args.warmup),
        "--working-set",
        str(args.working_set),
        "--server-pid",
        str(server.proc.pid),
        "--seed",
        str(seed),
        "--raw",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


def pct(values: list[float], q: float) -> float:
    return round(percentile(sorted(values), q), 2)


def ak_cache_entry_kb() -> tuple[float, int]:
    """Memory of one entry of attestd's parsed-AK cache (a P-256 AK), and the cache size."""
    from attestd.service.state import cached_public

    n = 20_000
    areas = [ak_public_area_tpm2b(b"cache-probe", i, 0) for i in range(n)]
    gc.collect()
    before = status_kb(os.getpid(), "VmRSS")
    parsed = [cached_public.__wrapped__(a) for a in areas]
    gc.collect()
    after = status_kb(os.getpid(), "VmRSS")
    del parsed
    return (after - before) / n, int(cached_public.cache_info().maxsize or 0)


def sweep_level(callers: int, runs: list[Any]) -> dict[str, Any]:
    """One level of the load sweep: rates are medians over rounds, latencies pooled."""
    att = [x for r in runs for x in r["raw_ms"]["attest"]]
    echo = [x for r in runs for x in r["raw_ms"]["echo"]]
    count = sum(r["attest"]["count"] for r in runs)
    srv = sum(r["attest"]["server_cpu_us_per_attestation"] * r["attest"]["count"] for r in runs)
    cli = sum(r["attest"]["client_cpu_us_per_attestation"] * r["attest"]["count"] for r in runs)
    return {
        "callers": callers,
        "e2e_attest_per_s": round(statistics.median(r["attest"]["per_s"] for r in runs), 1),
        "e2e_p50_ms": pct(att, 50),
        "e2e_p99_ms": pct(att, 99),
        "echo_rpc_per_s": round(statistics.median(r["echo"]["per_s"] for r in runs), 1),
        "echo_p99_ms": pct(echo, 99),
        "server_cpu_us_per_attestation": round(srv / count, 1),
        "client_cpu_us_per_attestation": round(cli / count, 1),
        "attestations": count,
        "attestation_failures": sum(r["attest"]["failures"] for r in runs),
        "rounds": len(runs),
    }


def aggregate(n: int, runs: list[Any], workers: int, extra: dict[str, Any]) -> dict[str, Any]:
    att = [x for r in runs for x in r["raw_ms"]["attest"]]
    echo = [x for r in runs for x in r["raw_ms"]["echo"]]
    parts = {
        k: [x for r in runs for x in r["raw_ms"]["attest_parts"][k]]
        for k in runs[0]["raw_ms"]["attest_parts"]
    }
    att_rates = [r["attest"]["per_s"] for r in runs]
    echo_rates = [r["echo"]["per_s"] for r in runs]
    ratios = [a / e for a, e in zip(att_rates, echo_rates, strict=True)]
    att_count = sum(r["attest"]["count"] for r in runs)
    echo_count = sum(r["echo"]["count"] for r in runs)
    srv_att = sum(r["attest"]["server_cpu_us_per_attestation"] * r["attest"]["count"] for r in runs)
    srv_echo = sum(r["echo"]["server_cpu_us_per_rpc"] * r["echo"]["count"] for r in runs)
    cli_att = sum(r["attest"]["client_cpu_us_per_attestation"] * r["attest"]["count"] for r in runs)
    cli_echo = sum(r["echo"]["client_cpu_us_per_rpc"] * r["echo"]["count"] for r in runs)
    return {
        "devices": n,
        "e2e_attest_per_s": round(statistics.median(att_rates), 1),
        "e2e_p50_ms": pct(att, 50),
        "e2e_p90_ms": pct(att, 90),
        "e2e_p99_ms": pct(att, 99),
        "e2e_max_ms": round(max(att), 2),
        "get_nonce_p50_ms": pct(parts["nonce"], 50),
        "get_nonce_p99_ms": pct(parts["nonce"], 99),
        "attest_rpc_p50_ms": pct(parts["attest"], 50),
        "attest_rpc_p99_ms": pct(parts["attest"], 99),
        "client_sign_p50_ms": pct(parts["sign"], 50),
        "echo_rpc_per_s": round(statistics.median(echo_rates), 1),
        "echo_p50_ms": pct(echo, 50),
        "echo_p99_ms": pct(echo, 99),
        "attest_vs_echo": round(statistics.median(ratios), 3),
        "rounds": [
            {
                "attest_per_s": r["attest"]["per_s"],
                "echo_per_s": r["echo"]["per_s"],
                "p50_ms": r["attest"]["p50_ms"],
                "p99_ms": r["attest"]["p99_ms"],
            }
            for r in runs
        ],
        "attestations": att_count,
        "attestation_failures": sum(r["attest"]["failures"] for r in runs),
        "server_cpu_us_per_attestation": round(srv_att / att_count, 1),
        "server_cpu_us_per_echo": round(srv_echo / echo_count, 1),
        "client_cpu_us_per_attestation": round(cli_att / att_count, 1),
        "client_cpu_us_per_echo": round(cli_echo / echo_count, 1),
        "working_set_devices": runs[0]["working_set"],
        "server_workers": workers,
        **extra,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1k devices, short phases")
    p.add_argument("--sizes", help="comma-separated fleet sizes (default by mode)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default by mode)")
    p.add_argument("--out", default=str(REPO / "build" / "bench.json"))
    p.add_argument("--workdir", default=str(REPO / "build" / "e2e"))
    p.add_argument("--concurrency", type=int, default=16, help="callers for the fleet-size rounds")
    p.add_argument(
        "--sweep",
        help="comma-separated caller counts of the load sweep on the smallest fleet"
        " (default by mode)",
    )
    p.add_argument("--sweep-rounds", type=int, help="rounds of the load sweep (default by mode)")
    p.add_argument(
        "--channels",
        type=int,
        default=0,
        help="client connections (0: one per caller, as devices have; spread over the workers)",
    )
    p.add_argument("--workers", type=int, default=0, help="server workers (0: one per CPU)")
    p.add_argument("--ak-pool", type=int, default=0, help="share K AKs (0: one per device)")
    p.add_argument(
        "--no-history",
        action="store_true",
        help="fleets of enrolled devices only (default: each with an earlier attestation's rows)",
    )
    p.add_argument("--max-load-s", type=float, default=900, help="bound on one bulk load")
    p.add_argument(
        "--no-resident",
        action="store_true",
        help="do not keep the stores' files mapped (leave their page cache to the machine)",
    )
    p.add_argument("--keep", action="store_true", help="keep the data directories")
    p.add_argument("--no-write", action="store_true", help="do not touch build/bench.json")
    args = p.parse_args()
    if args.quick:
        sizes, rounds, levels, sweep_rounds = [1000], 1, [4, 8], 1
        args.echo_seconds, args.attest_seconds, args.warmup, args.working_set = 2, 4, 1, 1000
    else:
        sizes, rounds, levels, sweep_rounds = [1000, 100_000, 1_000_000], 3, [4, 8, 16, 32], 2
        args.echo_seconds, args.attest_seconds, args.warmup, args.working_set = 5, 10, 2, 50_000
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    if args.sweep:
        levels = [int(c) for c in args.sweep.split(",")]
    rounds = args.rounds or rounds
    sweep_rounds = args.sweep_rounds if args.sweep_rounds is not None else sweep_rounds
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    t_start = time.monotonic()
    load_avg = [os.getloadavg()[0]]
    workers = 1
    workers_flag = supports_workers()
    if workers_flag:
        workers = args.workers or os.cpu_count() or 1
    dirs = {n: workdir / f"fleet-{n}" for n in sizes}
    extra: dict[int, dict[str, Any]] = {}
    for n in sizes:
        print(f"-- {n:,} devices: bulk load", file=sys.stderr, flush=True)
        load_s = bulk_load(dirs[n], n, args.ak_pool, not args.no_history, args.max_load_s)
        loaded = store_bytes(dirs[n])
        extra[n] = {"bulk_load_s": round(load_s, 1), "store_bytes_after_load": loaded["db"]}
    # A trial CA and server certificate for this run (what `attestd admin tls-init` makes).
    tls = init_tls(workdir / "tls", ["127.0.0.1"])
    servers: dict[int, Server] = {}
    runs: dict[int, list[Any]] = {n: [] for n in sizes}
    base_n = min(sizes)
    sweep: dict[int, list[Any]] = {c: [] for c in levels}
    resident: dict[int, ResidentStore] = {}
    try:
        if not args.no_resident:
            resident = {n: ResidentStore(dirs[n] / "attestd.sqlite") for n in sizes}
        for n in sizes:
            servers[n] = Server(dirs[n], workers if workers_flag else None, tls)
            extra[n]["server_rss_mb_after_start"] = round(
                memory_mb(servers[n].proc.pid, "VmRSS")[0], 1
            )
        # Rounds: every fleet's server in turn (order rotated), so background load on this
        # shared machine falls on all of them alike; echo and attest alternate likewise.
        for r in range(rounds):
            for k in range(len(sizes)):
                n = sizes[(r + k) % len(sizes)]
                print(f"-- round {r + 1}/{rounds}: {n:,} devices", file=sys.stderr, flush=True)
                load_avg.append(os.getloadavg()[0])
                if n in resident:
                    resident[n].refresh()
                runs[n].append(
                    run_loadgen(servers[n], dirs[n], args, seed=r + 1, concurrency=args.concurrency)
                )
        # The load sweep on the smallest fleet: callers in a closed loop at each level,
        # levels in rotated order per round (so background load falls on all alike).
        for r in range(sweep_rounds):
            for k in range(len(levels)):
                c = levels[(r + k) % len(levels)]
                print(
                    f"-- load sweep {r + 1}/{sweep_rounds}: {c} callers, {base_n:,} devices",
                    file=sys.stderr,
                    flush=True,
                )
                load_avg.append(os.getloadavg()[0])
                if base_n in resident:
                    resident[base_n].refresh()
                sweep[c].append(
                    run_loadgen(servers[base_n], dirs[base_n], args, seed=100 + r, concurrency=c)
                )
        for n in sizes:
            pid = servers[n].proc.pid
            peak, per_process = memory_mb(pid, "VmHWM")
            after = store_bytes(dirs[n])
            extra[n].update(
                server_peak_rss_mb=round(peak, 1),
                server_peak_rss_mb_per_process=[round(x, 1) for x in per_process],
                store_bytes=after["db"] + after["-wal"],
                store_wal_bytes=after["-wal"],
            )
    finally:
        for n, server in servers.items():
            extra[n]["server_exit_code"] = server.stop()
        for store in resident.values():
            store.close()
    if not args.keep:
        for d in [*dirs.values(), workdir / "tls"]:
            shutil.rmtree(d, ignore_errors=True)
    results = {n: aggregate(n, runs[n], workers, extra[n]) for n in sizes}

    # The parsed-AK cache fills up (to its size) only after that many distinct devices
    # attested to each worker; a timed run sees far fewer. A lower bound of the steady state.
    entry_kb, cache_size = ak_cache_entry_kb() if max(sizes) > 1000 else (0.0, 0)
    for n, res in results.items():
        if not entry_kb:
            break
        distinct_aks = min(n, args.ak_pool) if args.ak_pool else n
        seen_per_worker = res["attestations"] / workers
        missing = max(0.0, min(cache_size, distinct_aks) - seen_per_worker)
        res["server_rss_mb_steady_state_lower_bound"] = round(
            res["server_peak_rss_mb"] + workers * missing * entry_kb / 1024, 1
        )
    elapsed = time.monotonic() - t_start

    base = results[min(sizes)]
    top = results[max(sizes)]
    # (b) at the load the target names: of the sweep's levels whose p99 is within the
    # bound, the one with the most attestations/s; compared with the highest echo rate
    # seen on that server at any level (echo saturates: the harder comparison).
    swept = {c: sweep_level(c, sweep[c]) for c in levels if sweep[c]}
    echo_max = max([base["echo_rpc_per_s"], *(level["echo_rpc_per_s"] for level in swept.values())])
    within = [c for c, level in swept.items() if level["e2e_p99_ms"] <= TARGETS["p99_ms"]]
    if swept:
        pick = max(within or list(swept), key=lambda c: swept[c]["e2e_attest_per_s"])
        head = swept[pick]
    else:  # no sweep asked for: the fleet rounds' figures
        pick, head = args.concurrency, base
    head_ratio = round(head["e2e_attest_per_s"] / echo_max, 3)
    notes: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "concurrency": args.concurrency,
        "channels": args.channels or args.concurrency,
        "server_workers": workers if workers_flag else "1 (this attestd has no --workers)",
        "rounds": rounds,
        "echo_rpc": "grpc.health.v1.Health/Check on the same server",
        "transport": "TLS (trial CA, ECDSA P-256 server certificate) for echo and attest"
        " alike, one TLS connection per caller, no token (devices need none)",
        "abuse_limits": "raised (config file): "
        + ", ".join(f"{k} {v:g}" for k, v in BENCH_LIMITS.items()),
        "attestation": "GetNonce + quote signed over the nonce (client) + Attest; latency is "
        "the whole round; verdict affirming and credential checked on every one",
        "phases_s_per_round": {
            "warmup": args.warmup,
            "echo": args.echo_seconds,
            "attest": args.attest_seconds,
        },
        "aggregation": "rates: median over rounds; latencies: percentiles of all rounds pooled",
        "between_rounds": "os.sync(): each round starts with the previous round's writes on disk",
        "store_files": "kept mapped by the benchmark (every page faulted in, renewed before each"
        " round): in the page cache as on a machine with memory for them"
        if not args.no_resident
        else "left to the machine (--no-resident)",
        "page_reclaim": page_reclaim(),
        "ak_pool": args.ak_pool or "one AK per device",
        "fleet_rows": "enrolled devices only (--no-history)"
        if args.no_history
        else "each device enrolled, with the rows of an earlier affirming attestation"
        " (history, counters, latest evidence, status)",
        "cpus": os.cpu_count(),
        "load_average_1m": {"min": min(load_avg), "max": max(load_avg)},
        "attestd": git_state(),
        "run_s": round(elapsed, 1),
    }
    if entry_kb:
        notes["ak_cache"] = {"entry_kb": round(entry_kb, 2), "entries_per_worker": cache_size}
    notes["headline"] = {
        "callers": pick,
        "rule": "of the load sweep's levels (callers in a closed loop) whose p99 <= 50 ms, the"
        " one with the most attestations/s (the highest rate if none is within 50 ms);"
        " echo_rpc_per_s is the highest echo rate measured on the same server at any level",
        "attest_vs_echo": head_ratio,
    }
    targets = {
        "attest_vs_echo>=0.40": head_ratio >= TARGETS["attest_vs_echo"],
        "p99<=50ms": head["e2e_p99_ms"] <= TARGETS["p99_ms"],
    }
    if len(sizes) > 1:
        ratio = top["e2e_p50_ms"] / base["e2e_p50_ms"]
        ratio99 = top["e2e_p99_ms"] / base["e2e_p99_ms"]
        notes["p50_ratio_largest_vs_smallest"] = round(ratio, 2)
        notes["p99_ratio_largest_vs_smallest"] = round(ratio99, 2)
        targets["fleet_p50_ratio<=1.2"] = ratio <= TARGETS["fleet_latency_ratio"]
        targets["fleet_p99_ratio<=1.2"] = ratio99 <= TARGETS["fleet_latency_ratio"]
    if 1_000_000 in results:
        r1m = results[1_000_000]
        targets["server_memory_1m<=300MB"] = (
            r1m["server_peak_rss_mb"] <= TARGETS["server_memory_mb_1m"]
        )
        if "server_rss_mb_steady_state_lower_bound" in r1m:
            targets["server_memory_1m_steady_state<=300MB"] = (
                r1m["server_rss_mb_steady_state_lower_bound"] <= TARGETS["server_memory_mb_1m"]
            )
    notes["targets_met"] = targets

    hdr = (
        f"{'devices':>9} {'att/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'echo/s':>7} {'ratio':>6}"
        f" {'srv µs/att':>10} {'srv µs/echo':>11} {'peak MB':>8} {'store MB':>9} {'load s':>7}"
    )
    print(hdr)
    for n, res in results.items():
        print(
            f"{n:9d} {res['e2e_attest_per_s']:7.0f} {res['e2e_p50_ms']:7.1f}"
            f" {res['e2e_p99_ms']:7.1f}"
            f" {res['echo_rpc_per_s']:7.0f} {res['attest_vs_echo']:6.2f}"
            f" {res['server_cpu_us_per_attestation']:10.0f} {res['server_cpu_us_per_echo']:11.0f}"
            f" {res['server_peak_rss_mb']:8.1f} {res['store_bytes'] / 1e6:9.1f}"
            f" {res['bulk_load_s']:7.1f}"
        )
    if swept:
        print(f"load sweep on {base_n:,} devices ({sweep_rounds} round(s) per level):")
        print(
            f"{'callers':>9} {'att/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'echo/s':>7}"
            f" {'srv µs/att':>10}"
        )
        for c, level in swept.items():
            print(
                f"{c:9d} {level['e2e_attest_per_s']:7.0f} {level['e2e_p50_ms']:7.1f}"
                f" {level['e2e_p99_ms']:7.1f} {level['echo_rpc_per_s']:7.0f}"
                f" {level['server_cpu_us_per_attestation']:10.0f}"
            )
        print(
            f"headline: {head['e2e_attest_per_s']:.0f} attestations/s at {pick} callers"
            f" (p50 {head['e2e_p50_ms']:.1f} ms, p99 {head['e2e_p99_ms']:.1f} ms) vs"
            f" {echo_max:.0f} echo/s: {head_ratio:.2f}"
        )
    print(
        f"fleet rounds: {args.concurrency} callers, server workers {notes['server_workers']},"
        f" {rounds} interleaved rounds, load average {min(load_avg):.1f}-{max(load_avg):.1f};"
        " targets:"
    )
    for name, ok in targets.items():
        print(f"  {name}: {'met' if ok else 'MISSED'}")

    if args.no_write:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc["e2e_attest_per_s"] = head["e2e_attest_per_s"]
    doc["e2e_p50_ms"] = head["e2e_p50_ms"]
    doc["e2e_p99_ms"] = head["e2e_p99_ms"]
    doc["echo_rpc_per_s"] = echo_max
    doc["e2e_load_sweep"] = {str(c): level for c, level in swept.items()}
    doc["e2e_notes"] = notes
    # This run's sizes only: figures from different runs are never mixed.
    doc["fleet"] = {str(n): r for n, r in results.items()}
    out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
