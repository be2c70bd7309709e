"""A real attestd server (grpc.aio on a free port, SQLite file) for integration tests.

The server runs its own event loop on a background thread, so tests drive it
synchronously through real gRPC channels, the real agent and the real CLI.
Tests that need time to pass can move the server's clock (``server.advance``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from tpmsim import Manufacturer, SimTpm

from attestd.agent.client import Agent, AgentConfig, capture_policy
from attestd.service.config import ServerConfig
from attestd.service.server import RunningServer, create_server
from attestd.v1 import (
    attestation_pb2_grpc,
    enrollment_pb2_grpc,
    keys_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    verdicts_pb2_grpc,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BOOT_SELECTION = [("sha256", list(range(10)))]


class ServerThread:
    """attestd's real server on 127.0.0.1:0, in its own event loop thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.offset_s = 0.0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: RunningServer = asyncio.run_coroutine_threadsafe(
            create_server(config), self.loop
        ).result(30)
        real_clock = self.running.state.clock
        self.running.state.clock = lambda: real_clock() + self.offset_s
        self.address = f"127.0.0.1:{self.running.port}"
        self.channel = grpc.insecure_channel(self.address)

    def advance(self, seconds: float) -> None:
        """Move the server's clock forward (expiry tests without sleeping)."""
        self.offset_s += seconds

    @property
    def enrollment(self) -> enrollment_pb2_grpc.EnrollmentStub:
        return enrollment_pb2_grpc.EnrollmentStub(self.channel)

    @property
    def devices(self) -> enrollment_pb2_grpc.DevicesStub:
        return enrollment_pb2_grpc.DevicesStub(self.channel)

    @property
    def attestation(self) -> attestation_pb2_grpc.AttestationStub:
        return attestation_pb2_grpc.AttestationStub(self.channel)

    @property
    def policy(self) -> policy_pb2_grpc.PolicyStub:
        return policy_pb2_grpc.PolicyStub(self.channel)

    @property
    def verdicts(self) -> verdicts_pb2_grpc.VerdictsStub:
        return verdicts_pb2_grpc.VerdictsStub(self.channel)

    @property
    def keys(self) -> keys_pb2_grpc.KeysStub:
        return keys_pb2_grpc.KeysStub(self.channel)

    def put_policy(self, doc: dict[str, Any], note: str = "test") -> policy_pb2.PolicyInfo:
        info: policy_pb2.PolicyInfo = self.policy.PutPolicy(
            policy_pb2.PutPolicyRequest(document=json.dumps(doc), change_note=note, author="tests")
        )
        return info

    def stop(self) -> None:
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.running.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def server_factory(
    tmp_path: Path, manufacturer: Manufacturer
) -> Iterator[Callable[..., ServerThread]]:
    """make(**config overrides) -> a running server trusting `manufacturer`'s root."""
    servers: list[ServerThread] = []

    def make(**overrides: Any) -> ServerThread:
        config = ServerConfig(
            listen="127.0.0.1:0",
            data_dir=tmp_path / f"server{len(servers)}",
            ek_roots=(manufacturer.root_cert_path,),
            ek_intermediates=(manufacturer.intermediate_cert_path,),
        )
        server = ServerThread(dataclasses.replace(config, **overrides))
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def server(server_factory: Callable[..., ServerThread]) -> ServerThread:
    return server_factory()


@dataclass
class Device:
    """A simulated machine: its TPM and its agent, talking to `server`."""

    tpm: SimTpm
    agent: Agent
    server: ServerThread
    state_dir: Path

    @property
    def device_id(self) -> str:
        return self.agent.device_id()

    def golden_policy(self, name: str = "default") -> dict[str, Any]:
        return capture_policy(self.tpm.tcti, name, BOOT_SELECTION)


@pytest.fixture
def device_factory(
    tpm_factory: Callable[..., SimTpm], server: ServerThread, tmp_path: Path
) -> Iterator[Callable[..., Device]]:
    """make(maker=None, *, enroll=True, boot=True, ak_alg="rsa", target=server) -> Device."""
    agents: list[Agent] = []

    def make(
        maker: Manufacturer | None = None,
        *,
        enroll: bool = True,
        boot: bool = True,
        ak_alg: str = "rsa",
        target: ServerThread | None = None,
    ) -> Device:
        tpm = tpm_factory(maker)
        if boot:
            tpm.boot()
        target = target or server
        state = tmp_path / f"agent{len(agents)}"
        agent = Agent(AgentConfig(server=target.address, tcti=tpm.tcti, state_dir=state))
        agents.append(agent)
        if enroll:
            agent.enroll(ak_alg=ak_alg)
        return Device(tpm, agent, target, state)

    yield make
    for a in agents:
        a.close()


@pytest.fixture
def device(device_factory: Callable[..., Device], server: ServerThread) -> Device:
    """An enrolled, booted device whose boot is the server's golden 'default' policy."""
    dev = device_factory()
    server.put_policy(dev.golden_policy())
    return dev


def rpc_code(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """(status, attestd-code) of a failed call."""
    assert isinstance(exc, grpc.Call)
    return exc.code(), dict(exc.trailing_metadata() or ()).get("attestd-code", "")


def run_cli(
    *args: str, tool: str = "attestd", check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the installed command (beside this interpreter) as a user would."""
    exe = Path(sys.executable).parent / tool
    env = {**os.environ, "TSS2_LOG": "all+none"}
    proc = subprocess.run(
        [str(exe), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{tool} {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
