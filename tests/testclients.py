"""Credentials of the running test servers, for the CLI run as a subprocess.

A module of its own (imported by one name from every test directory) so that
there is exactly one registry, however pytest imported the conftest files.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# address -> (CA certificate or None for --insecure, {role: API token})
CLIENTS: dict[str, tuple[Path | None, dict[str, str]]] = {}


# Which role a CLI command needs (the first words of its arguments).
CLI_ROLES = {
    "policy": "policy-author",
    "group": "policy-author",
    "verdict": "gateway",
    "credential": "gateway",
    "trust-bundle": "gateway",
}


def cli_env(args: tuple[str, ...], role: str | None = "auto") -> dict[str, str]:
    """Environment for the CLI talking to the test server named by ``--server``."""
    env = {"TSS2_LOG": "all+none"}
    if "--server" not in args:
        return env
    address = args[args.index("--server") + 1]
    if address not in CLIENTS:
        return env
    ca, tokens = CLIENTS[address]
    if ca is not None:
        env["ATTESTD_CA_CERT"] = str(ca)
    else:
        env["ATTESTD_INSECURE"] = "1"
    if role == "auto":
        role = None if not args or args[0] == "agent" else CLI_ROLES.get(args[0], "admin")
    if role is not None:
        env["ATTESTD_TOKEN"] = tokens[role]
    return env


@contextlib.contextmanager
def cli_environment(args: tuple[str, ...] | list[str], role: str | None = "auto") -> Iterator[None]:
    """os.environ as ``cli_env`` would set it, for the CLI run in this process."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("ATTESTD_")}
    for k in saved:
        del os.environ[k]
    os.environ.update({k: v for k, v in cli_env(tuple(args), role).items() if k != "TSS2_LOG"})
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("ATTESTD_")]:
            del os.environ[k]
        os.environ.update(saved)


def run_cli(
    *args: str, tool: str = "attestd", check: bool = False, role: str | None = "auto"
) -> subprocess.CompletedProcess[str]:
    """Run the installed command (beside this interpreter) as a user would.

    Against a test server (``--server`` ADDRESS), the command trusts the server's CA
    and carries the token of the role its command needs (``role``: "auto", a role, or
    None for no credential); the agent (tool attestd-agent) never has a token.
    """
    exe = Path(sys.executable).parent / tool
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTESTD_")}
    env.update(cli_env(args, None if tool != "attestd" else role))
    proc = subprocess.run(
        [str(exe), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{tool} {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc
