"""Server configuration: a YAML file, overridden by command-line flags."""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509

from attestd.core.limits import DEFAULT_LIMITS, Limits


class ConfigError(Exception):
    """The configuration is unusable; the message says which setting."""


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("attestd-data")
    ek_roots: tuple[Path, ...] = ()
    # Intermediate CA certificates (PEM) offered to path building; not trusted by themselves.
    ek_intermediates: tuple[Path, ...] = ()
    nonce_ttl_s: int = 60
    challenge_ttl_s: int = 300
    credential_lifetime_s: int = 3600
    default_policy: str = "default"
    # Devices no group claims (by id or rule) belong to this group, if it exists.
    default_group: str = "default"
    max_message_bytes: int = 2 * 1024 * 1024
    # The CA that issues client certificates: PEM files, or (unset) one created in data_dir.
    issuing_ca_cert: Path | None = None
    issuing_ca_key: Path | None = None
    limits: Limits = field(default_factory=lambda: DEFAULT_LIMITS)
    # Processes serving the one port (SO_REUSEPORT); None: one per CPU (one on port 0).
    workers: int | None = None
    # Attestation rows kept per device (the oldest go; per-device counters keep the totals).
    history_per_device: int = 100
    # Verdict events kept (the newest); older ones are deleted by the periodic sweep.
    event_retention: int = 100_000

    # -- security (docs/security.md) --
    # The server's TLS certificate chain and key (PEM). Required unless ``insecure``.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Plaintext, no TLS: for a loopback test only; warned about on every start.
    insecure: bool = False
    # The mTLS port: callers present a role client certificate issued by the client CA.
    # "" disables it (and, with insecure, there is none).
    mtls_listen: str = "127.0.0.1:50052"
    # The CA of role client certificates: PEM files, or (unset) one created in data_dir.
    client_ca_cert: Path | None = None
    client_ca_key: Path | None = None
    # Which devices may enroll: "any" (an EK certificate chaining to ek_roots) or
    # "preregistered" (and also listed by `attestd device preregister`).
    admission: str = "any"
    # Abuse limits (per worker process): GetNonce and Enroll per peer address and per
    # device, as a sustained rate (calls/s) with a burst; unused nonces a device may hold.
    peer_rate_per_s: float = 50.0
    peer_burst: int = 200
    device_rate_per_s: float = 1.0
    device_burst: int = 10
    max_outstanding_nonces: int = 16
    # Signed audit checkpoints: after this many records, or this long after the last one.
    audit_checkpoint_every: int = 1000
    audit_checkpoint_interval_s: int = 60

    @property
    def store_path(self) -> Path:
        return self.data_dir / "attestd.sqlite"

    @property
    def mtls_port(self) -> int | None:
        _, _, port = self.mtls_listen.rpartition(":")
        return int(port) if port.isdigit() else None

    @property
    def port(self) -> int | None:
        """The port of ``listen`` (None if it names none)."""
        _, _, port = self.listen.rpartition(":")
        return int(port) if port.isdigit() else None

    def worker_count(self) -> int:
        """How many worker processes serve ``listen``.

        Port 0 means "any free port", which each worker would pick for itself: several
        workers need an explicit port to share. Left unset, port 0 (or an address
        without a port) gets one worker, an explicit port one per CPU.
        """
        if self.workers is None:
            return max(1, os.cpu_count() or 1) if self.port else 1
        if self.workers > 1 and not self.port:
            raise ConfigError(
                f"workers: {self.workers} worker processes need an explicit port to share"
                f" (listen is {self.listen}: with port 0 each would listen on a port of its"
                " own); give a port, or run one worker"
            )
        return self.workers


_FIELDS = {f.name for f in dataclasses.fields(ServerConfig)} - {"limits"}


def load_config(path: Path | None, overrides: dict[str, Any]) -> ServerConfig:
    """Read a YAML config file (optional), apply non-None overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a mapping")
        unknown = sorted(set(raw) - _FIELDS)
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        values.update(raw)
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    for key in (
        "data_dir",
        "issuing_ca_cert",
        "issuing_ca_key",
        "tls_cert",
        "tls_key",
        "client_ca_cert",
        "client_ca_key",
    ):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    for key in ("ek_roots", "ek_intermediates"):
        if key in values:
            paths = values[key]
            values[key] = tuple(Path(p) for p in ([paths] if isinstance(paths, str) else paths))
    for key in (
        "nonce_ttl_s",
        "challenge_ttl_s",
        "credential_lifetime_s",
        "max_message_bytes",
        "workers",
        "history_per_device",
        "event_retention",
        "peer_burst",
        "device_burst",
        "max_outstanding_nonces",
        "audit_checkpoint_every",
        "audit_checkpoint_interval_s",
    ):
        if key not in values or (key == "workers" and values[key] is None):
            continue
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{key} must be a positive integer")
    for key in ("peer_rate_per_s", "device_rate_per_s"):
        value = values.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
        ):
            raise ConfigError(f"{key} must be a positive number")
    if values.get("admission", "any") not in ADMISSION_MODES:
        raise ConfigError(f"admission must be one of {', '.join(ADMISSION_MODES)}")
    if not isinstance(values.get("insecure", False), bool):
        raise ConfigError("insecure must be true or false")
    config = ServerConfig(**values)
    check_tls(config)
    return config


ADMISSION_MODES = ("any", "preregistered")


def check_tls(config: ServerConfig) -> None:
    """TLS unless explicitly insecure; cert and key go together."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("tls_cert and tls_key go together")
    if (config.client_ca_cert is None) != (config.client_ca_key is None):
        raise ConfigError("client_ca_cert and client_ca_key go together")
    if config.tls_cert is None and not config.insecure:
        raise ConfigError(
            "tls_cert and tls_key are required (the server's certificate and key, PEM);"
            " `attestd admin tls-init` makes a throwaway CA and certificate for a trial."
            " To serve plaintext on a trusted loopback only, pass --insecure"
        )


def load_certificates(paths: tuple[Path, ...], setting: str) -> list[x509.Certificate]:
    """PEM files of certificates (several per file allowed)."""
    roots: list[x509.Certificate] = []
    for p in paths:
        try:
            roots.extend(x509.load_pem_x509_certificates(p.read_bytes()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{setting}: cannot load {p}: {e}") from None
    return roots


def prepare_data_dir(path: Path) -> None:
    """Create the data directory private to this user; refuse one others can read.

    A data directory others can read or enter exposes the signing and CA keys and the
    store: attestd will not start on it rather than quietly fix it (someone may have
    copied the keys already).
    """
    if not path.exists():
        path.mkdir(mode=0o700, parents=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o007:
        raise ConfigError(
            f"the data directory {path} is accessible to every user (mode {mode:04o});"
            " its keys may have been read: check them, then chmod 700 it"
        )
    if mode & 0o070:
        os.chmod(path, mode & ~0o077)
