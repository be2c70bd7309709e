"""Quote-check benchmark: attestd's pure core beside the crypto floor and Keylime.

One software TPM (swtpm, through tpm-sim/) runs the simulated measured boot, gets
an RSA-2048 and an ECC P-256 attestation key, and quotes sha256 selections of 8,
16 and 24 PCRs over a nonce with tpm2-tools (`tpm2_quote`); then it is stopped.
On each of those six quotes, in the same run, this times:

* attestd: ``parse_evidence`` + ``appraise_quote`` on the bytes, against the
  enrolled AK (parsed once, as at enrollment) and a policy whose reference
  values match (structure, signature, nonce, selection, PCR digest, values);
* the crypto floor: one bare ``cryptography`` ``verify()`` of the same signature
  over the same message (RSASSA-PKCS1-v1_5 / ECDSA, SHA-256), key loaded once;
* Keylime's ``keylime.tpm.tpm_util.checkquote``, from PyPI, in its own
  environment (bench/peers.sh makes build/peers-venv), timed in-process in a
  worker subprocess (this file, run with ``--keylime-worker`` by that
  environment's python; it never imports attestd). Its inputs are the files
  tpm2-tools wrote: the AK as PEM (``tpm2_readpublic -f pem``), the quote's
  TPMS_ATTEST (``-m``), TPMT_SIGNATURE (``-s``) and PCR blob (``-o``), the
  nonce as the string it was, and ``exp_hash_alg="sha256"``.

Every figure is the median of single-call timings, taken in interleaved rounds
(attestd, floor, Keylime, case by case) after warm-up, with the garbage
collector on. The machine is shared: read ratios, not absolutes.

Usage: python bench/quote.py [--quick] [--out build/bench.json] [--keylime-python PATH]
(without --keylime-python, bench/peers.sh provides the Keylime environment).

Prints a table and merges quote_check_us, crypto_floor_us, keylime_checkquote_us
(each keyed by case, e.g. rsa2048-8pcr) and quote_check_notes into build/bench.json.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import json
import os
import platform
import secrets
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PEERS_SH = REPO / "bench" / "peers.sh"
PCR_COUNTS = (8, 16, 24)
KEYS = (("rsa2048", "rsa"), ("p256", "ecc"))  # case prefix, DeviceTpm algorithm
AK_HANDLES = {"rsa": 0x81010002, "ecc": 0x81010003}
# Extra measurements beyond boot.sh's PCRs 0-9, so larger selections are not all resets.
EXTRA_EXTENDS = (10, 11, 12, 13, 14, 15, 23)
NONCE_ALPHABET = string.ascii_letters + string.digits  # as Keylime's own nonces


@dataclass(frozen=True)
class Evidence:
    case: str
    alg: str
    ak_public: bytes  # TPM2B_PUBLIC (ESAPI)
    ak_pem: bytes  # tpm2_readpublic -f pem
    nonce: str  # Keylime-style: 20 letters and digits; the quote's extraData is its bytes
    quote: bytes  # tpm2_quote -m: TPMS_ATTEST
    signature: bytes  # tpm2_quote -s: TPMT_SIGNATURE
    pcrblob: bytes  # tpm2_quote -o: tpm2-tools' PCR blob
    pcrs: dict[str, dict[int, bytes]]  # read back with TPM2_PCR_Read (ESAPI)


def median_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1000


def sample(fn: Callable[[], object], n: int) -> list[int]:
    """n single-call timings in ns (GC on, collected before the batch)."""
    gc.collect()
    clock = time.perf_counter_ns
    out = []
    for _ in range(n):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


# --- evidence -----------------------------------------------------------------


def make_evidence(workdir: Path) -> list[Evidence]:
    sys.path.insert(0, str(REPO / "tests"))
    from tpmsim import Manufacturer  # tests/tpmsim.py drives the tpm-sim/ scripts

    from attestd.agent.tpm import DeviceTpm

    env = {**os.environ, "TSS2_LOG": "all+none"}

    def tool(*argv: str) -> None:
        proc = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, timeout=120)
        # No resource manager in front of swtpm: flush what the tool left behind.
        for flush in ("-t", "-l", "-s"):
            subprocess.run(
                ["tpm2_flushcontext", "-T", tcti, flush], env=env, capture_output=True, check=False
            )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.decode(errors='replace')}")

    tpm = Manufacturer(workdir / "ca").make_tpm(workdir / "tpm")
    tcti = tpm.start()
    try:
        tpm.boot()
        for pcr in EXTRA_EXTENDS:
            digest = secrets.token_bytes(32).hex()
            tool("tpm2_pcrextend", "-T", tcti, f"{pcr}:sha256={digest}")
        with DeviceTpm(tcti) as dev:
            publics = {alg: dev.create_ak(alg, AK_HANDLES[alg]) for _, alg in KEYS}
            values = dev.read_pcrs([("sha256", range(24))])["sha256"]
        out = []
        for prefix, alg in KEYS:
            handle = f"0x{AK_HANDLES[alg]:08x}"
            tool("tpm2_readpublic", "-T", tcti, "-c", handle, "-f", "pem", "-o", f"{alg}.pem")
            for n in PCR_COUNTS:
                case = f"{prefix}-{n}pcr"
                nonce = "".join(secrets.choice(NONCE_ALPHABET) for _ in range(20))
                sel = "sha256:" + ",".join(str(i) for i in range(n))
                tool(
                    "tpm2_quote",
                    *("-T", tcti, "-c", handle, "-l", sel, "-g", "sha256"),
                    *("-q", nonce.encode().hex()),
                    *("-m", f"{case}.msg", "-s", f"{case}.sig", "-o", f"{case}.pcrs"),
                )
                out.append(
                    Evidence(
                        case=case,
                        alg=alg,
                        ak_public=publics[alg],
                        ak_pem=(workdir / f"{alg}.pem").read_bytes(),
                        nonce=nonce,
                        quote=(workdir / f"{case}.msg").read_bytes(),
                        signature=(workdir / f"{case}.sig").read_bytes(),
                        pcrblob=(workdir / f"{case}.pcrs").read_bytes(),
                        pcrs={"sha256": {i: values[i] for i in range(n)}},
                    )
                )
        return out
    finally:
        tpm.stop()


# --- attestd and the crypto floor ---------------------------------------------


def attestd_and_floor(ev: Evidence) -> tuple[Callable[[], object], Callable[[], object]]:
    """(attestd's full check, the bare signature verification) for one quote."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from attestd.core import verdict
    from attestd.core.policy import Policy
    from attestd.core.quote import appraise_quote, parse_evidence
    from attestd.core.tpm import Bank, parse_public, parse_signature

    ak = parse_public(ev.ak_public)  # once, as at enrollment
    values = ev.pcrs["sha256"]
    refs = {i: frozenset({d}) for i, d in values.items()}
    policy = Policy(name="bench", pcrs={Bank.SHA256: refs})
    nonce = ev.nonce.encode()
    quote, signature, pcrs = ev.quote, ev.signature, ev.pcrs

    def check() -> object:
        evidence = parse_evidence(quote, signature, pcrs)
        return appraise_quote(evidence, ak, nonce=nonce, policy=policy, previous=None, now_ms=0)

    result = check()
    status = result.verdict.status  # type: ignore[attr-defined]
    if status is not verdict.Status.AFFIRMING:
        raise RuntimeError(f"{ev.case}: attestd says {status}: {result.verdict.failures}")  # type: ignore[attr-defined]

    sig = parse_signature(signature)
    key = ak.public_key
    h = hashes.SHA256()
    if isinstance(key, rsa.RSAPublicKey):
        rsa_key, raw, pkcs1 = key, sig.sig, padding.PKCS1v15()

        def floor() -> object:
            rsa_key.verify(raw, quote, pkcs1, h)
            return None
    else:
        ec_key, der, ecdsa = key, encode_dss_signature(sig.r, sig.s), ec.ECDSA(h)

        def floor() -> object:
            ec_key.verify(der, quote, ecdsa)
            return None

    floor()
    return check, floor


# --- Keylime, in its own environment ------------------------------------------


class KeylimePeer:
    """The worker subprocess: setup once, then batches of timings on request."""

    def __init__(self, python: str, evidence: list[Evidence]) -> None:
        # Its stderr (Keylime logs a missing config file on import) goes to a file, so
        # that a full pipe can never block it. Closed in close().
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--keylime-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        b64 = base64.b64encode
        setup = {
            "cases": [
                {
                    "case": ev.case,
                    "pem": ev.ak_pem.decode(),
                    "nonce": ev.nonce,
                    "sig": b64(ev.signature).decode(),
                    "quote": b64(ev.quote).decode(),
                    "pcrblob": b64(ev.pcrblob).decode(),
                    "expected": {str(i): d.hex() for i, d in ev.pcrs["sha256"].items()},
                }
                for ev in evidence
            ]
        }
        try:
            reply = self._ask(setup)
        except (RuntimeError, OSError):
            self.close()
            raise
        self.version: str = reply.get("version", "?")
        self.cryptography: str = reply.get("cryptography", "?")
        self.python: str = reply.get("python", "?")
        self.errors: dict[str, str] = reply.get("errors", {})

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            self.stderr.seek(0)
            err = self.stderr.read().decode(errors="replace")
            raise RuntimeError(f"the Keylime worker exited: {err.strip()[-2000:]}")
        reply: dict[str, Any] = json.loads(line)
        if "fatal" in reply:
            raise RuntimeError(reply["fatal"])
        return reply

    def time(self, case: str, what: str, n: int, warmup: int = 0) -> list[int]:
        samples: list[int] = self._ask({"case": case, "what": what, "n": n, "warmup": warmup})[
            "samples"
        ]
        return samples

    def close(self) -> None:
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def keylime_worker() -> None:
    """Runs under the peer environment's python: only the standard library, cryptography
    and Keylime are imported here, never attestd."""
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the pipe

    def reply(doc: dict[str, Any]) -> None:
        out.write(json.dumps(doc) + "\n")
        out.flush()

    setup = json.loads(sys.stdin.readline())
    try:
        import importlib.metadata
        import struct

        import cryptography
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
        from keylime.tpm import tpm_util
    except Exception as e:
        reply({"fatal": f"cannot import keylime.tpm.tpm_util: {type(e).__name__}: {e}"})
        return

    def bare_verify(key: Any, sig: bytes, message: bytes, *how: Any) -> Callable[[], object]:
        def call() -> object:
            key.verify(sig, message, *how)
            return None

        return call

    SHA256 = hashes.SHA256()
    calls: dict[tuple[str, str], Callable[[], object]] = {}
    errors: dict[str, str] = {}
    for c in setup["cases"]:
        b = base64.b64decode
        args = (c["pem"].encode(), c["nonce"], b(c["sig"]), b(c["quote"]), b(c["pcrblob"]))
        pem, sigblob, quoteblob = args[0], args[2], args[3]

        def checkquote(a: tuple[Any, ...] = args) -> object:
            return tpm_util.checkquote(*a, "sha256")

        try:
            got = checkquote()
            want = {int(i): d for i, d in c["expected"].items()}
            if got != want:
                raise ValueError(f"checkquote returned other PCR values: {got} != {want}")
        except Exception as e:
            errors[c["case"]] = f"{type(e).__name__}: {e}"
            continue
        calls[c["case"], "checkquote"] = checkquote
        # The same bare verification as the floor in attestd's process, to compare the two
        # processes' conditions.
        key = serialization.load_pem_public_key(pem)
        if isinstance(key, rsa.RSAPublicKey):
            (size,) = struct.unpack_from(">H", sigblob, 4)
            floor = bare_verify(key, sigblob[6 : 6 + size], quoteblob, padding.PKCS1v15(), SHA256)
        else:
            (rsize,) = struct.unpack_from(">H", sigblob, 4)
            r = int.from_bytes(sigblob[6 : 6 + rsize], "big")
            (ssize,) = struct.unpack_from(">H", sigblob, 6 + rsize)
            s = int.from_bytes(sigblob[8 + rsize : 8 + rsize + ssize], "big")
            floor = bare_verify(key, encode_dss_signature(r, s), quoteblob, ec.ECDSA(SHA256))
        floor()
        calls[c["case"], "floor"] = floor
    reply(
        {
            "version": importlib.metadata.version("keylime"),
            "cryptography": cryptography.__version__,
            "python": platform.python_version(),
            "errors": errors,
        }
    )
    for line in sys.stdin:
        req = json.loads(line)
        fn = calls[req["case"], req["what"]]
        for _ in range(req["warmup"]):
            fn()
        reply({"samples": sample(fn, req["n"])})


def cryptography_version() -> str:
    import cryptography

    return str(cryptography.__version__)


def keylime_python(arg: str | None) -> tuple[str | None, str]:
    """The peer environment's python, or None and why not."""
    if arg:
        return arg, ""
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(PEERS_SH)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return None, f"bench/peers.sh failed: {proc.stderr.strip()[-500:]}"
    return proc.stdout.strip().splitlines()[-1], ""


# --- main ------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer runs (well under two minutes)")
    p.add_argument("--out", default=str(REPO / "build" / "bench.json"))
    p.add_argument("--keylime-python", help="python of an environment with keylime installed")
    p.add_argument("--cpu", type=int, help="the CPU to run on (default: the last one allowed)")
    p.add_argument("--keylime-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.keylime_worker:
        keylime_worker()
        return

    # Runs per figure, split into interleaved rounds; warm-up calls before the first round.
    runs, rounds, warmup = (1500, 5, 200) if args.quick else (20000, 40, 2000)
    per_round = runs // rounds

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="attestd-bench-quote-") as tmp:
        evidence = make_evidence(Path(tmp))
    print(f"evidence: 6 quotes from swtpm in {time.monotonic() - t_start:.1f} s", file=sys.stderr)

    # attestd and the Keylime worker (which inherits this) share one CPU, so that the two
    # processes are measured under the same conditions on a shared machine.
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    python, keylime_reason = keylime_python(args.keylime_python)
    peer = None
    if python:
        try:
            peer = KeylimePeer(python, evidence)
        except (RuntimeError, OSError) as e:
            keylime_reason = str(e)
    funcs = {ev.case: attestd_and_floor(ev) for ev in evidence}
    samples: dict[str, dict[str, list[int]]] = {
        ev.case: {"attestd": [], "floor": [], "keylime": [], "keylime_floor": []} for ev in evidence
    }
    try:
        for r in range(rounds):
            w = warmup if r == 0 else 0
            for ev in evidence:
                check, floor = funcs[ev.case]
                got = samples[ev.case]
                for _ in range(w):
                    check()
                    floor()
                got["attestd"] += sample(check, per_round)
                got["floor"] += sample(floor, per_round)
                if peer and ev.case not in peer.errors:
                    got["keylime"] += peer.time(ev.case, "checkquote", per_round, w)
                    got["keylime_floor"] += peer.time(ev.case, "floor", per_round, w)
    finally:
        if peer:
            peer.close()

    quote_check: dict[str, float] = {}
    crypto_floor: dict[str, float] = {}
    keylime: dict[str, float | None] = {}
    keylime_floor: dict[str, float] = {}
    print(
        f"{'case':14} {'attestd µs':>10} {'floor µs':>9} {'attestd/floor':>13} "
        f"{'keylime µs':>10} {'keylime/attestd':>15} {'floor in Keylime process µs':>27}"
    )
    for ev in evidence:
        got = samples[ev.case]
        ours, floor_us = median_us(got["attestd"]), median_us(got["floor"])
        quote_check[ev.case] = round(ours, 1)
        crypto_floor[ev.case] = round(floor_us, 1)
        theirs = median_us(got["keylime"]) if got["keylime"] else None
        keylime[ev.case] = round(theirs, 1) if theirs is not None else None
        if got["keylime_floor"]:
            keylime_floor[ev.case] = round(median_us(got["keylime_floor"]), 1)
        if theirs is not None:
            kl = f"{theirs:10.1f} {theirs / ours:15.2f} {keylime_floor.get(ev.case, 0.0):27.1f}"
        else:
            why = (peer.errors.get(ev.case) if peer else None) or keylime_reason
            kl = f"{'null':>10} {'':15} ({why})"
        print(f"{ev.case:14} {ours:10.1f} {floor_us:9.1f} {ours / floor_us:13.2f} {kl}")

    notes = (
        f"Medians of {per_round * rounds} single-call timings per figure, in {rounds} rounds "
        f"interleaving attestd, floor and Keylime case by case, after {warmup} warm-up calls; "
        f"GC on; both processes pinned to CPU {cpu}. Evidence: one swtpm TPM after "
        "tpm-sim/boot.sh plus extends of PCRs "
        f"{','.join(map(str, EXTRA_EXTENDS))}; RSA-2048 RSASSA-SHA256 and P-256 ECDSA-SHA256 "
        "AKs (DeviceTpm.create_ak); tpm2_quote of sha256 PCRs 0..n-1 over a 20-character "
        "nonce. quote_check_us: attestd.core.quote.parse_evidence + appraise_quote (AK parsed "
        "once; a policy whose reference values match; previous=None, now_ms=0). "
        "crypto_floor_us: one cryptography verify() of the same signature over the same "
        "message (PKCS#1 v1.5 / ECDSA, SHA-256). "
    )
    if peer and any(v is not None for v in keylime.values()):
        notes += (
            f"keylime_checkquote_us: keylime {peer.version} from PyPI (cryptography "
            f"{peer.cryptography}, Python {peer.python}; attestd: cryptography "
            f"{cryptography_version()}, Python {platform.python_version()}) in a separate venv "
            "(bench/peers.sh), "
            "keylime.tpm.tpm_util.checkquote timed in-process in a worker subprocess on the "
            "same quote: AK as PEM (tpm2_readpublic -f pem), the nonce string, TPMT_SIGNATURE "
            "(tpm2_quote -s), TPMS_ATTEST (-m), tpm2-tools PCR blob (-o), "
            "exp_hash_alg='sha256'; its result was checked against the PCR values. "
            "checkquote loads the PEM on every call (its API takes PEM) and does not compare "
            "PCR values with reference values (attestd's figure includes that). The bare "
            "verify() in the Keylime worker process took "
            + ", ".join(f"{k} {v}" for k, v in keylime_floor.items())
            + " µs (same conditions check)."
        )
        if peer.errors:
            notes += " checkquote failed on " + "; ".join(
                f"{k}: {v}" for k, v in peer.errors.items()
            )
    else:
        why = keylime_reason or (
            "; ".join(f"{k}: {v}" for k, v in peer.errors.items()) if peer else "unknown"
        )
        notes += f"keylime_checkquote_us is null: Keylime could not be run ({why})."
    print(notes, file=sys.stderr)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc["quote_check_us"] = quote_check
    doc["crypto_floor_us"] = crypto_floor
    doc["keylime_checkquote_us"] = keylime
    doc["quote_check_notes"] = notes
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"total {time.monotonic() - t_start:.1f} s; wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
