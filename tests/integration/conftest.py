"""A real attestd server (grpc.aio on a free port, SQLite file) for integration tests.

The server runs its own event loop on a background thread, so tests drive it
synchronously through real gRPC channels, the real agent and the real CLI.
Tests that need time to pass can move the server's clock (``server.advance``).

Like a deployment, it serves TLS (a trial CA from `attestd admin tls-init`) and
authenticates callers: the harness makes one API token per role and talks to
each service with the role that service is for (policy as a policy author,
verdicts as a gateway, devices/keys/admin as an admin); devices call without a
credential. ``run_cli`` gives the CLI the same, by command.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from testclients import CLIENTS, run_cli  # noqa: F401 (re-exported for the tests)
from tpmsim import Manufacturer, SimTpm

from attestd.agent.client import Agent, AgentConfig, capture_policy
from attestd.connect import Connection, open_channel
from attestd.service.access import Role
from attestd.service.admin import ROLE_TO_PB, create_token
from attestd.service.config import ServerConfig
from attestd.service.server import RunningServer, create_server
from attestd.tlsinit import TlsFiles, init_tls
from attestd.v1 import (
    admin_pb2,
    admin_pb2_grpc,
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


ROLES = ("admin", "policy-author", "gateway")


class ServerThread:
    """attestd's real server on 127.0.0.1:0, in its own event loop thread."""

    def __init__(self, config: ServerConfig, tls: TlsFiles | None = None) -> None:
        self.config = config
        self.tls = tls
        self.ca_cert = tls.ca_cert if tls is not None else None
        self.offset_s = 0.0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: RunningServer = self.call(create_server(config))
        real_clock = self.running.state.clock
        self.running.state.clock = lambda: real_clock() + self.offset_s
        self.address = f"127.0.0.1:{self.running.port}"
        self.mtls_address = f"127.0.0.1:{self.running.mtls_port}"
        self.tokens = {role: self.make_token(role) for role in ROLES}
        CLIENTS[self.address] = (self.ca_cert, self.tokens)
        self.channels: dict[str, grpc.Channel] = {}
        # Devices: no credential.
        self.channel = self.open(None)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def make_token(self, role: str, name: str = "") -> str:
        """A new API token for ``role``, made as an admin would (through the store)."""
        state = self.running.state
        request = admin_pb2.CreateTokenRequest(
            role=ROLE_TO_PB[Role(role)], name=name or f"test-{role}"
        )
        response = self.call(
            state.store(create_token, state.store.store, request, state.now_ms(), "tests")
        )
        return str(response.token)

    def connection(self, token: str | None = None, **kw: Any) -> Connection:
        return Connection(
            self.address,
            ca_cert=self.ca_cert,
            token=token or "",
            insecure=self.config.insecure,
            **kw,
        )

    def open(self, role: str | None, token: str | None = None) -> grpc.Channel:
        """A channel to the main port with ``role``'s token (or ``token``; None: neither)."""
        key = role or token or ""
        if key not in self.channels:
            secret = token or (self.tokens[role] if role else None)
            self.channels[key] = open_channel(self.connection(secret))
        return self.channels[key]

    def advance(self, seconds: float) -> None:
        """Move the server's clock forward (expiry tests without sleeping)."""
        self.offset_s += seconds

    @property
    def enrollment(self) -> enrollment_pb2_grpc.EnrollmentStub:
        return enrollment_pb2_grpc.EnrollmentStub(self.channel)

    @property
    def devices(self) -> enrollment_pb2_grpc.DevicesStub:
        return enrollment_pb2_grpc.DevicesStub(self.open("admin"))

    @property
    def attestation(self) -> attestation_pb2_grpc.AttestationStub:
        return attestation_pb2_grpc.AttestationStub(self.channel)

    @property
    def policy(self) -> policy_pb2_grpc.PolicyStub:
        return policy_pb2_grpc.PolicyStub(self.open("policy-author"))

    @property
    def verdicts(self) -> verdicts_pb2_grpc.VerdictsStub:
        return verdicts_pb2_grpc.VerdictsStub(self.open("gateway"))

    @property
    def keys(self) -> keys_pb2_grpc.KeysStub:
        return keys_pb2_grpc.KeysStub(self.open("admin"))

    @property
    def admin(self) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self.open("admin"))

    def agent_config(self, tcti: str, state_dir: Path) -> AgentConfig:
        return AgentConfig(
            server=self.address,
            tcti=tcti,
            state_dir=state_dir,
            ca_cert=self.ca_cert,
            insecure=self.config.insecure,
        )

    def put_policy(self, doc: dict[str, Any], note: str = "test") -> policy_pb2.PolicyInfo:
        info: policy_pb2.PolicyInfo = self.policy.PutPolicy(
            policy_pb2.PutPolicyRequest(document=json.dumps(doc), change_note=note, author="tests")
        )
        return info

    def stop(self) -> None:
        for channel in self.channels.values():
            channel.close()
        CLIENTS.pop(self.address, None)
        asyncio.run_coroutine_threadsafe(self.running.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """The trial TLS CA and server certificate every test server uses."""
    return init_tls(tmp_path_factory.mktemp("tls"), ["127.0.0.1", "localhost"])


def server_config(data_dir: Path, manufacturer: Manufacturer, tls: TlsFiles) -> ServerConfig:
    """A server config as the tests use it: free ports, TLS, generous abuse limits."""
    return ServerConfig(
        listen="127.0.0.1:0",
        mtls_listen="127.0.0.1:0",
        data_dir=data_dir,
        ek_roots=(manufacturer.root_cert_path,),
        ek_intermediates=(manufacturer.intermediate_cert_path,),
        tls_cert=tls.server_cert,
        tls_key=tls.server_key,
        # Tests attest quickly and often from one address: limits are tested on their own.
        peer_rate_per_s=10_000.0,
        peer_burst=10_000,
        device_rate_per_s=10_000.0,
        device_burst=10_000,
    )


@pytest.fixture
def server_factory(
    tmp_path: Path, manufacturer: Manufacturer, tls_files: TlsFiles
) -> Iterator[Callable[..., ServerThread]]:
    """make(**config overrides) -> a running server trusting `manufacturer`'s root."""
    servers: list[ServerThread] = []

    def make(**overrides: Any) -> ServerThread:
        config = server_config(tmp_path / f"server{len(servers)}", manufacturer, tls_files)
        server = ServerThread(dataclasses.replace(config, **overrides), tls_files)
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
        agent = Agent(target.agent_config(tpm.tcti, state))
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


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
