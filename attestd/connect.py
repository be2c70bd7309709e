"""How attestd's command-line tools, the agent and the examples reach a server.

TLS by default: the server's certificate is checked against ``--ca-cert`` (or the
system's roots). A caller with a role authenticates with an API token
(``ATTESTD_TOKEN`` or ``--token-file``; never a command-line argument, where
other users could read it) or with a client certificate on the server's mTLS
port (``--client-cert`` / ``--client-key``). ``--insecure`` talks plaintext to a
server started with ``--insecure``.

Every option has an environment variable, so a shell set up once
(``ATTESTD_SERVER``, ``ATTESTD_CA_CERT``, ``ATTESTD_TOKEN``…) serves every command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ENV_SERVER = "ATTESTD_SERVER"
ENV_CA_CERT = "ATTESTD_CA_CERT"
ENV_TOKEN = "ATTESTD_TOKEN"  # noqa: S105 (the variable's name)
ENV_TOKEN_FILE = "ATTESTD_TOKEN_FILE"  # noqa: S105
ENV_CLIENT_CERT = "ATTESTD_CLIENT_CERT"
ENV_CLIENT_KEY = "ATTESTD_CLIENT_KEY"
ENV_INSECURE = "ATTESTD_INSECURE"
MAX_TOKEN_FILE = 8192


class ConnectError(Exception):
    """The connection options are unusable (a file missing, a token unreadable)."""


@dataclass(frozen=True)
class Connection:
    server: str
    ca_cert: Path | None = None
    token: str = ""
    client_cert: Path | None = None
    client_key: Path | None = None
    insecure: bool = False

    def channel_credentials(self) -> grpc.ChannelCredentials:
        try:
            roots = self.ca_cert.read_bytes() if self.ca_cert else None
            key = self.client_key.read_bytes() if self.client_key else None
            chain = self.client_cert.read_bytes() if self.client_cert else None
        except OSError as e:
            raise ConnectError(f"cannot read {e.filename}: {e.strerror}") from None
        return grpc.ssl_channel_credentials(roots, key, chain)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


class _Metadata(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the bearer token to every call (plaintext channels cannot carry call creds)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.extra = metadata

    def _details(self, details: Any) -> Any:
        return _Details(
            details.method,
            details.timeout,
            tuple(details.metadata or ()) + self.extra,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)


@dataclass(frozen=True)
class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


def open_channel(conn: Connection, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A blocking channel to ``conn.server`` carrying ``conn``'s credential."""
    if conn.insecure:
        channel = grpc.insecure_channel(conn.server, options=list(options))
    else:
        channel = grpc.secure_channel(conn.server, conn.channel_credentials(), list(options))
    if conn.token:
        channel = grpc.intercept_channel(channel, _Metadata(conn.metadata()))
    return channel


def open_aio_channel(conn: Connection, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """An asyncio channel; the token, if any, goes as call credentials (TLS only)."""
    if conn.insecure:
        if conn.token:
            raise ConnectError("an API token is never sent over a plaintext channel")
        return grpc.aio.insecure_channel(conn.server, options=list(options))
    creds = conn.channel_credentials()
    if conn.token:
        creds = grpc.composite_channel_credentials(
            creds, grpc.access_token_call_credentials(conn.token)
        )
    return grpc.aio.secure_channel(conn.server, creds, list(options))


def read_token_file(path: Path) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_TOKEN_FILE + 1)
    except OSError as e:
        raise ConnectError(f"cannot read the token file {path}: {e.strerror}") from None
    token = data.decode("ascii", "replace").strip()
    if not token or len(data) > MAX_TOKEN_FILE or any(c.isspace() for c in token):
        raise ConnectError(f"{path} does not hold one token")
    return token


def add_connection_args(
    parser: argparse.ArgumentParser, default_server: str, *, credentials: bool = True
) -> None:
    """--server and the security options, each with its environment variable.

    ``credentials=False`` (the device agent: its TPM proves it): only the server's
    address and how to trust it, no token or client certificate options.
    """
    env = os.environ.get
    g = parser.add_argument_group("connection")
    g.add_argument(
        "--server",
        default=env(ENV_SERVER, default_server),
        help=f"attestd address (${ENV_SERVER}; default {default_server})",
    )
    g.add_argument(
        "--ca-cert",
        default=env(ENV_CA_CERT),
        help=f"CA certificate (PEM) that signed the server's certificate (${ENV_CA_CERT};"
        " default: the system's roots)",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        default=env(ENV_INSECURE, "") not in ("", "0"),
        help=f"plaintext, for a server run with --insecure (${ENV_INSECURE}=1)",
    )
    if not credentials:
        return
    g.add_argument(
        "--token-file",
        default=env(ENV_TOKEN_FILE),
        help=f"file holding an API token (${ENV_TOKEN_FILE}, or the token in ${ENV_TOKEN})",
    )
    g.add_argument(
        "--client-cert",
        default=env(ENV_CLIENT_CERT),
        help=f"client certificate (PEM) for the mTLS port (${ENV_CLIENT_CERT})",
    )
    g.add_argument(
        "--client-key",
        default=env(ENV_CLIENT_KEY),
        help=f"its private key (${ENV_CLIENT_KEY})",
    )


def connection_from_args(args: argparse.Namespace) -> Connection:
    """The Connection the options of ``add_connection_args`` describe (a parser made with
    ``credentials=False`` gives one without a token or client certificate, whatever the
    environment holds)."""
    credentials = hasattr(args, "token_file")
    token = ""
    if credentials and args.token_file:
        token = read_token_file(Path(args.token_file))
    elif credentials and os.environ.get(ENV_TOKEN):
        token = os.environ[ENV_TOKEN].strip()
    client_cert = getattr(args, "client_cert", None)
    client_key = getattr(args, "client_key", None)
    if bool(client_cert) != bool(client_key):
        raise ConnectError("--client-cert and --client-key go together")
    if args.insecure and (client_cert or args.ca_cert):
        raise ConnectError("--insecure uses no certificates")
    if args.insecure and token:
        print(
            "warning: sending an API token over plaintext (--insecure): anyone on the path"
            " can read and reuse it",
            file=sys.stderr,
        )
    return Connection(
        server=args.server,
        ca_cert=Path(args.ca_cert) if args.ca_cert else None,
        token=token,
        client_cert=Path(client_cert) if client_cert else None,
        client_key=Path(client_key) if client_key else None,
        insecure=args.insecure,
    )


def channel_from_args(args: argparse.Namespace) -> grpc.Channel:
    return open_channel(connection_from_args(args))
