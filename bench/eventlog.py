"""Event-log benchmark: attestd's in-process parse + replay + state extraction,
beside `tpm2_eventlog` run as a subprocess on the same file in the same run
(the path a verifier that shells out to tpm2-tools takes).

Prints a table and merges {"eventlog": {...}} into build/bench.json.
Medians over repeated runs; the machine is shared, so read ratios, not absolutes.
Each in-process run parses the bytes afresh (nothing is kept between runs), after
warm-up runs; the garbage collector stays on, as in a verifier.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from attestd.core.bootstate import check_events, extract_state
from attestd.core.eventlog import parse_event_log, replay

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO.parent / "shared" / "vectors" / "eventlogs"


def attestd_once(data: bytes) -> None:
    log = parse_event_log(data)
    replay(log)
    check_events(log)
    extract_state(log).to_json()


def median_us(fn: object, runs: int, warmup: int = 0) -> float:
    for _ in range(warmup):
        fn()  # type: ignore[operator]
    gc.collect()  # start from the same heap for each log
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        fn()  # type: ignore[operator]
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(REPO / "build" / "bench.json"))
    p.add_argument("files", nargs="*")
    args = p.parse_args()
    files = [Path(f) for f in args.files] or sorted(
        VECTORS.glob("*.bin"), key=lambda f: f.stat().st_size, reverse=True
    )[:3]
    runs_inproc, runs_tool = (200, 10) if args.quick else (2000, 50)
    tool = shutil.which("tpm2_eventlog")
    env = {**os.environ, "TSS2_LOG": "all+none"}
    results = {}
    print(f"{'log':38} {'bytes':>7} {'attestd µs':>11} {'tpm2_eventlog µs':>17} {'ratio':>7}")
    for f in files:
        data = f.read_bytes()
        # The warm-up runs load modules and let the interpreter specialize the code.
        ours = median_us(lambda data=data: attestd_once(data), runs_inproc, warmup=20)
        theirs = None
        if tool:
            theirs = median_us(
                lambda f=f: subprocess.run(
                    [tool, str(f)], capture_output=True, env=env, check=True
                ),
                runs_tool,
            )
        ratio = theirs / ours if theirs else None
        results[f.name] = {
            "bytes": len(data),
            "attestd_parse_replay_state_us": round(ours, 1),
            "tpm2_eventlog_subprocess_us": round(theirs, 1) if theirs else None,
            "speedup": round(ratio, 1) if ratio else None,
        }
        nan = float("nan")
        row = f"{f.name:38} {len(data):7d} {ours:11.1f} {theirs or nan:17.1f} {ratio or nan:7.1f}"
        print(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc["eventlog"] = results
    out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
