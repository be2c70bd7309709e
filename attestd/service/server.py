"""Building and running the gRPC server.

``create_server`` returns the started server and its bound port, apart from
``serve`` which waits for a signal: tests bind port 0 and call over a real
channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from attestd.service.attestation import AttestationService
from attestd.service.config import (
    ServerConfig,
    load_certificates,
    prepare_data_dir,
)
from attestd.service.devices import DevicesService
from attestd.service.enrollment import EnrollmentService
from attestd.service.errors import ErrorInterceptor
from attestd.service.keys import IssuingCA, SigningKeyring
from attestd.service.policy import PolicyService
from attestd.service.state import ServiceState, StoreRunner
from attestd.service.verdicts import KeysService, VerdictsService
from attestd.store.sqlite import SqliteStore
from attestd.v1 import (
    attestation_pb2,
    attestation_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    verdicts_pb2,
    verdicts_pb2_grpc,
)

log = logging.getLogger("attestd")

SERVICE_NAMES = (
    enrollment_pb2.DESCRIPTOR.services_by_name["Enrollment"].full_name,
    enrollment_pb2.DESCRIPTOR.services_by_name["Devices"].full_name,
    attestation_pb2.DESCRIPTOR.services_by_name["Attestation"].full_name,
    policy_pb2.DESCRIPTOR.services_by_name["Policy"].full_name,
    verdicts_pb2.DESCRIPTOR.services_by_name["Verdicts"].full_name,
    keys_pb2.DESCRIPTOR.services_by_name["Keys"].full_name,
)
EXPIRY_SWEEP_S = 1.0


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    state: ServiceState
    sweeper: asyncio.Task[None] | None = None

    async def stop(self, grace: float | None = 5.0) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sweeper
        await self.server.stop(grace)
        self.state.store.close()


async def sweep_expiries(state: ServiceState) -> None:
    """Announce expired credentials to watchers (VERDICT_EVENT_KIND_EXPIRED)."""
    while True:
        await asyncio.sleep(EXPIRY_SWEEP_S)
        try:
            if await state.store(state.store.store.announce_expiries, state.now_ms()):
                state.notify()
        except Exception:  # the store may be briefly unavailable; try again next tick
            log.exception("expiry sweep failed")


async def create_server(config: ServerConfig) -> RunningServer:
    """Open the store and keys, register the services, bind, start."""
    prepare_data_dir(config.data_dir)
    now_ms = int(time.time() * 1000)
    roots = load_certificates(config.ek_roots, "ek_roots")
    intermediates = load_certificates(config.ek_intermediates, "ek_intermediates")
    if not roots:
        log.warning("no trusted EK roots configured: every enrollment will be refused")
    state = ServiceState(
        config=config,
        store=StoreRunner(SqliteStore(config.store_path)),
        ek_roots=roots,
        ek_intermediates=intermediates,
        keyring=SigningKeyring(config.data_dir, config.credential_lifetime_s, now_ms),
        ca=IssuingCA(config.data_dir, config.issuing_ca_cert, config.issuing_ca_key),
    )
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ],
    )
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(EnrollmentService(state), server)
    enrollment_pb2_grpc.add_DevicesServicer_to_server(DevicesService(state), server)
    attestation_pb2_grpc.add_AttestationServicer_to_server(AttestationService(state), server)
    policy_pb2_grpc.add_PolicyServicer_to_server(PolicyService(state), server)
    verdicts_pb2_grpc.add_VerdictsServicer_to_server(VerdictsService(state), server)
    keys_pb2_grpc.add_KeysServicer_to_server(KeysService(state), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(config.listen)
    if port == 0:
        state.store.close()
        raise OSError(f"cannot listen on {config.listen}")
    await server.start()
    for name in (*SERVICE_NAMES, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("attestd listening on port %d, data in %s", port, config.data_dir)
    return RunningServer(server, port, state, asyncio.create_task(sweep_expiries(state)))


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM, then stop gracefully."""
    running = await create_server(config)
    host = config.listen.rsplit(":", 1)[0]
    print(f"attestd serving on {host}:{running.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await running.stop(5.0)
