"""Software TPMs for tests, driven through the tpm-sim/ scripts.

The scripts are the single source of truth for how a simulated TPM is
manufactured, started, rebooted and measured; this module only calls them
and adds a few read-only helpers (NV, PCRs, clock) built on tpm2-tools.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import NamedTuple

SCRIPTS = Path(__file__).resolve().parent.parent / "tpm-sim"

EK_CERT_RSA_NV = 0x01C00002
EK_CERT_ECC_NV = 0x01C00016
PLATFORM_CERT_NV = 0x01C08000
EK_RSA_HANDLE = 0x81010001
BOOT_PCRS = tuple(range(10))

# Quiet tpm2-tss: its error logging is noise when a test expects a failure.
_ENV = {**os.environ, "TSS2_LOG": os.environ.get("TSS2_LOG", "all+none")}


class TpmSimError(RuntimeError):
    """A tpm-sim script or tpm2 tool failed; the message carries its stderr."""


def _run(argv: list[str]) -> bytes:
    proc = subprocess.run(argv, capture_output=True, env=_ENV, timeout=60)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise TpmSimError(f"{' '.join(argv)} exited {proc.returncode}: {err}")
    return proc.stdout


def _script(name: str, *args: str) -> str:
    return _run([str(SCRIPTS / name), *args]).decode().strip()


def free_port_pair() -> int:
    """A port P such that P and P+1 are both free on 127.0.0.1 right now."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port: int = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise TpmSimError("no free pair of adjacent ports on 127.0.0.1")


class BootEvent(NamedTuple):
    """One measurement made by boot.sh (digests as hex)."""

    pcr: int
    sha1: str
    sha256: str
    description: str


# Every started TPM, so an interpreter exit without fixture teardown
# (e.g. a crash in a session fixture) still leaves no swtpm behind.
_running: set[SimTpm] = set()


@atexit.register
def _stop_all() -> None:
    for tpm in list(_running):
        with contextlib.suppress(Exception):
            tpm.stop()


class SimTpm:
    """A manufactured swtpm instance in `state_dir`; start() to serve it on loopback."""

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir)
        self.port: int | None = None

    def __repr__(self) -> str:
        return f"SimTpm({str(self.state_dir)!r}, port={self.port})"

    @property
    def tcti(self) -> str:
        if self.port is None:
            raise TpmSimError(f"{self!r} is not started")
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def running(self) -> bool:
        return self.port is not None

    def start(self, port: int | None = None) -> str:
        """Start serving; returns the TCTI string. Picks free ports unless given one."""
        if self.running:
            return self.tcti
        # A freshly found port can be taken by someone else before swtpm binds it.
        attempts = 1 if port is not None else 3
        for attempt in range(1, attempts + 1):
            p = port if port is not None else free_port_pair()
            try:
                _script("start.sh", "--state", str(self.state_dir), "--port", str(p))
                break
            except TpmSimError:
                if attempt == attempts:
                    raise
        self.port = p
        _running.add(self)
        return self.tcti

    def stop(self) -> None:
        """Stop swtpm; harmless if it is not running."""
        _script("stop.sh", "--state", str(self.state_dir))
        self.port = None
        _running.discard(self)

    def powercycle(self) -> None:
        """Reboot the simulated machine: resetCount + 1, PCRs back to reset values."""
        _script("powercycle.sh", "--state", str(self.state_dir))

    def boot(self, tamper: bool = False) -> list[BootEvent]:
        """Run the simulated measured boot; returns the events it extended."""
        out = _script("boot.sh", "--tcti", self.tcti, *(["--tamper"] if tamper else []))
        events = []
        for line in out.splitlines():
            pcr, sha1, sha256, description = line.split("\t", 3)
            events.append(BootEvent(int(pcr), sha1, sha256, description))
        return events

    # Read-only helpers for assertions; they create no transient objects.

    def nv_read(self, index: int) -> bytes:
        return _run(["tpm2_nvread", "-T", self.tcti, hex(index)])

    def ek_cert_der(self) -> bytes:
        return self.nv_read(EK_CERT_RSA_NV)

    def pcrs(self, pcrs: tuple[int, ...] = BOOT_PCRS) -> dict[str, dict[int, bytes]]:
        """PCR values as {"sha1": {index: digest}, "sha256": {...}}."""
        sel = ",".join(map(str, pcrs))
        out = _run(["tpm2_pcrread", "-T", self.tcti, f"sha1:{sel}+sha256:{sel}"]).decode()
        values: dict[str, dict[int, bytes]] = {}
        bank: dict[int, bytes] = {}
        for line in out.splitlines():
            if m := re.fullmatch(r"\s*(sha1|sha256):\s*", line):
                bank = values.setdefault(m[1], {})
            elif m := re.fullmatch(r"\s*(\d+)\s*:\s*0x([0-9A-Fa-f]+)\s*", line):
                bank[int(m[1])] = bytes.fromhex(m[2])
        return values

    def reset_count(self) -> int:
        out = _run(["tpm2_readclock", "-T", self.tcti]).decode()
        m = re.search(r"reset_count:\s*(\d+)", out)
        if not m:
            raise TpmSimError(f"no reset_count in tpm2_readclock output: {out!r}")
        return int(m[1])

    def __enter__(self) -> SimTpm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Manufacturer:
    """A TPM vendor: one local CA in `ca_dir` that certifies every TPM it makes."""

    def __init__(self, ca_dir: Path | str) -> None:
        self.ca_dir = Path(ca_dir)

    def __repr__(self) -> str:
        return f"Manufacturer({str(self.ca_dir)!r})"

    def make_tpm(self, state_dir: Path | str) -> SimTpm:
        """Manufacture a new (stopped) TPM with EK and platform certificates."""
        _script("manufacture.sh", "--ca", str(self.ca_dir), "--state", str(state_dir))
        return SimTpm(state_dir)

    def _ensure_ca(self) -> None:
        # swtpm_localca only creates the CA when it first signs something, so
        # a vendor that has made no TPM yet makes one to bring its CA into being.
        if not (self.ca_dir / "swtpm-localca-rootca-cert.pem").exists():
            self.make_tpm(self.ca_dir / "first-tpm")

    @property
    def root_cert_path(self) -> Path:
        self._ensure_ca()
        return self.ca_dir / "swtpm-localca-rootca-cert.pem"

    @property
    def intermediate_cert_path(self) -> Path:
        self._ensure_ca()
        return self.ca_dir / "issuercert.pem"
