"""Building and running the gRPC server.

``create_server`` returns the started server and its bound port, apart from
``serve`` which waits for a signal: tests bind port 0 and call over a real
channel.

``serve_workers`` runs several worker processes on one port (SO_REUSEPORT; the
kernel spreads connections over them). The parent binds nothing: it creates
what the workers share (data directory, keys, CA, store schema), starts them
("spawn"), forwards SIGTERM/SIGINT, and if one dies unexpectedly stops the
others and fails. They share the SQLite store (WAL); worker 0 alone runs the
expiry and retention sweep and copies the WAL into the database file (no
worker's commit does that itself), and every worker reloads the signing keys when
another one rotates them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from attestd.service.admin import AdminService
from attestd.service.attestation import AttestationService
from attestd.service.auditing import checkpoint_if_due
from attestd.service.config import (
    ConfigError,
    ServerConfig,
    check_tls,
    load_certificates,
    prepare_data_dir,
)
from attestd.service.devices import DevicesService
from attestd.service.enrollment import EnrollmentService
from attestd.service.errors import ErrorInterceptor
from attestd.service.keys import IssuingCA, SigningKeyring, read_private_key
from attestd.service.policy import PolicyService
from attestd.service.security import SecurityInterceptor
from attestd.service.state import ServiceState, StoreRunner
from attestd.service.verdicts import KeysService, VerdictsService
from attestd.store.sqlite import PRUNE_BATCH, SqliteStore
from attestd.v1 import (
    admin_pb2,
    admin_pb2_grpc,
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
access_log = logging.getLogger("attestd.access")

SERVICE_NAMES = (
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    enrollment_pb2.DESCRIPTOR.services_by_name["Enrollment"].full_name,
    enrollment_pb2.DESCRIPTOR.services_by_name["Devices"].full_name,
    attestation_pb2.DESCRIPTOR.services_by_name["Attestation"].full_name,
    policy_pb2.DESCRIPTOR.services_by_name["Policy"].full_name,
    verdicts_pb2.DESCRIPTOR.services_by_name["Verdicts"].full_name,
    keys_pb2.DESCRIPTOR.services_by_name["Keys"].full_name,
)
EXPIRY_SWEEP_S = 1.0
RETENTION_EVERY = 60  # expiry sweeps between retention passes (more often while behind)
KEYRING_REFRESH_S = 1.0
# How often the sweeping process copies the store's WAL into the database file, and the
# WAL's length (pages) beyond which it is checkpointed in full and started again.
WAL_CHECKPOINT_S = 0.25
WAL_RESTART_PAGES = 16_000
WORKER_STOP_S = 15.0  # after this long a stopping worker is killed


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    state: ServiceState
    sweeper: asyncio.Task[None] | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    mtls_port: int = 0

    async def stop(self, grace: float | None = 5.0) -> None:
        for task in (self.sweeper, *self.tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.server.stop(grace)
        # Waits for a store call still running: off the loop.
        await asyncio.to_thread(self.state.store.close)


async def checkpoint_audit(state: ServiceState) -> None:
    """Sign the audit log's newest record when a checkpoint is due."""
    config = state.config
    key = state.keyring.current
    await state.store(
        checkpoint_if_due,
        state.store.store,
        key.key,
        key.kid,
        state.now_ms(),
        config.audit_checkpoint_every,
        config.audit_checkpoint_interval_s,
    )


async def sweep_expiries(state: ServiceState) -> None:
    """Announce expired credentials to watchers (VERDICT_EVENT_KIND_EXPIRED); apply retention;
    sign audit checkpoints.

    Runs in one process of a multi-worker server (announcing is idempotent anyway).
    """
    store = state.store.store
    ticks = 0
    while True:
        await asyncio.sleep(EXPIRY_SWEEP_S)
        try:
            if await state.store(store.announce_expiries, state.now_ms()):
                state.notify()
            await checkpoint_audit(state)
        except Exception:  # the store may be briefly unavailable; try again next tick
            log.exception("expiry sweep failed")
        ticks -= 1
        if ticks > 0:
            continue
        ticks = RETENTION_EVERY
        try:
            deleted = await state.store(store.prune, state.now_ms(), state.config.event_retention)
        except Exception:
            log.exception("retention sweep failed")
            continue
        if deleted:
            log.info("retention: %d old rows deleted", deleted)
            if deleted >= PRUNE_BATCH:
                ticks = 1  # more to do: again at the next tick


def _keyring_stamp(index: Path) -> tuple[int, int, int] | None:
    try:
        st = index.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


async def checkpoint_wal(state: ServiceState) -> None:
    """Copy the store's WAL into its database file every WAL_CHECKPOINT_S, on a thread
    of its own (a checkpoint syncs the file; commits on the event loop then never do).
    Runs in the sweeping process; the others' commits leave checkpoints to it."""
    checkpoint = getattr(state.store.store, "checkpoint", None)
    if checkpoint is None:
        return
    while True:
        await asyncio.sleep(WAL_CHECKPOINT_S)
        try:
            await asyncio.to_thread(checkpoint, WAL_RESTART_PAGES)
        except Exception:  # busy or briefly unavailable: again next tick
            log.debug("WAL checkpoint failed", exc_info=True)


async def refresh_keyring(state: ServiceState) -> None:
    """Reload the signing keys when keys.json changes (another worker rotated them).

    The index is replaced atomically after the new key file is written, so a reload
    sees either the old ring or the new one whole.
    """
    config = state.config
    index = config.data_dir / "keys" / "keys.json"
    seen = await asyncio.to_thread(_keyring_stamp, index)
    while True:
        await asyncio.sleep(KEYRING_REFRESH_S)
        try:
            stamp = await asyncio.to_thread(_keyring_stamp, index)
            if stamp is None or stamp == seen:
                continue
            state.keyring = await asyncio.to_thread(
                SigningKeyring, config.data_dir, config.credential_lifetime_s, state.now_ms()
            )
            seen = stamp  # as of before the read: a change since is seen next tick
            log.info("signing keys reloaded: current kid %s", state.keyring.current.kid)
        except Exception:  # a half-written file is retried next tick
            log.exception("reloading the signing keys failed")


class AccessLogInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Logs each call's method at DEBUG (workers' log lines carry their index and pid)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        access_log.debug("call %s", handler_call_details.method)
        return await continuation(handler_call_details)


async def create_server(
    config: ServerConfig,
    *,
    reuse_port: bool = False,
    sweep: bool = True,
    refresh_keys: bool = False,
) -> RunningServer:
    """Open the store and keys, register the services, bind, start.

    ``reuse_port``: share the port with other processes (the workers of one server);
    without it, a port already in use is an error. ``sweep``: run the expiry and
    retention sweep and the store's WAL checkpoints (one process of several).
    ``refresh_keys``: follow key rotations made by other processes.
    """
    check_tls(config)
    prepare_data_dir(config.data_dir)
    now_ms = int(time.time() * 1000)
    roots = load_certificates(config.ek_roots, "ek_roots")
    intermediates = load_certificates(config.ek_intermediates, "ek_intermediates")
    if not roots:
        log.warning("no trusted EK roots configured: every enrollment will be refused")
    # Keys first: a refused key file must not leave a store open behind it.
    keyring = SigningKeyring(config.data_dir, config.credential_lifetime_s, now_ms)
    ca = IssuingCA(config.data_dir, config.issuing_ca_cert, config.issuing_ca_key)
    client_ca = client_ca_of(config)
    store = SqliteStore(config.store_path, history_per_device=config.history_per_device)
    # Commits never copy the WAL into the database file themselves: the sweeping process
    # does that on a thread of its own (checkpoint_wal).
    store.checkpoint_inline(False)
    state = ServiceState(
        config=config,
        store=StoreRunner(store),
        ek_roots=roots,
        ek_intermediates=intermediates,
        keyring=keyring,
        ca=ca,
        client_ca=client_ca,
    )
    server = grpc.aio.server(
        interceptors=[AccessLogInterceptor(), ErrorInterceptor(), SecurityInterceptor(state)],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", int(reuse_port)),
        ],
    )
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(EnrollmentService(state), server)
    enrollment_pb2_grpc.add_DevicesServicer_to_server(DevicesService(state), server)
    attestation_pb2_grpc.add_AttestationServicer_to_server(AttestationService(state), server)
    policy_pb2_grpc.add_PolicyServicer_to_server(PolicyService(state), server)
    verdicts_pb2_grpc.add_VerdictsServicer_to_server(VerdictsService(state), server)
    keys_pb2_grpc.add_KeysServicer_to_server(KeysService(state), server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(state), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port, mtls_port = _bind(server, config, state)
    except Exception:
        state.store.close()
        raise
    await server.start()
    for name in (*SERVICE_NAMES, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if config.insecure:
        log.warning(
            "INSECURE: serving plaintext without TLS on port %d (--insecure): tokens and"
            " verdicts cross the network unprotected, and no client certificates can be used",
            port,
        )
    else:
        log.info(
            "attestd listening on port %d (TLS%s), data in %s",
            port,
            f"; mTLS port {mtls_port}" if mtls_port else "",
            config.data_dir,
        )
    tasks = [asyncio.create_task(refresh_keyring(state))] if refresh_keys else []
    if sweep:
        tasks.append(asyncio.create_task(checkpoint_wal(state)))
    sweeper = asyncio.create_task(sweep_expiries(state)) if sweep else None
    return RunningServer(server, port, state, sweeper, tasks, mtls_port)


def client_ca_of(config: ServerConfig) -> IssuingCA:
    return IssuingCA(
        config.data_dir,
        config.client_ca_cert,
        config.client_ca_key,
        stem="client-ca",
        common_name="attestd client CA",
    )


def _read_tls(config: ServerConfig) -> tuple[bytes, bytes]:
    assert config.tls_cert is not None and config.tls_key is not None
    read_private_key(config.tls_key)  # refuses a key file others can read
    try:
        return config.tls_key.read_bytes(), config.tls_cert.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the TLS certificate or key: {e}") from None


def _add_port(server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None) -> int:
    try:
        if creds is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, creds)
    except RuntimeError:  # newer grpc raises where older returned 0
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address} (address in use or not valid)")
    return int(port)


def _bind(server: grpc.aio.Server, config: ServerConfig, state: ServiceState) -> tuple[int, int]:
    """The main port (TLS, or plaintext with insecure) and the mTLS port; their numbers."""
    if config.insecure:
        return _add_port(server, config.listen, None), 0
    key, chain = _read_tls(config)
    port = _add_port(server, config.listen, grpc.ssl_server_credentials([(key, chain)]))
    mtls_port = 0
    if config.mtls_listen:
        client_roots = state.client_ca.chain_pem().encode()
        mtls = grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_roots, require_client_auth=True
        )
        mtls_port = _add_port(server, config.mtls_listen, mtls)
    return port, mtls_port


def settle_heap() -> None:
    """Once serving: what start-up made (modules, keys, configuration) lives as long as
    the process, so it is moved out of the garbage collector's sight. A full collection
    stops the event loop while it scans every tracked object; now it scans only what
    serving made, so those pauses are shorter."""
    gc.collect()
    gc.freeze()


def _address(config: ServerConfig, port: int) -> str:
    return f"{config.listen.rsplit(':', 1)[0]}:{port}"


async def serve(config: ServerConfig) -> None:
    """Run in this process until SIGINT/SIGTERM, then stop gracefully."""
    running = await create_server(config)
    settle_heap()
    print(f"attestd serving on {_address(config, running.port)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await running.stop(5.0)


# --- several worker processes on one port ----------------------------------


class WorkerFailed(Exception):
    """A worker could not start (exit_code 2) or died while serving (exit_code 1)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def prepare_shared(config: ServerConfig) -> None:
    """Create what the workers would otherwise race to create: keys, CA, store schema.

    Also reads every configured file, so a bad setting fails here, once.
    """
    prepare_data_dir(config.data_dir)
    load_certificates(config.ek_roots, "ek_roots")
    load_certificates(config.ek_intermediates, "ek_intermediates")
    SigningKeyring(config.data_dir, config.credential_lifetime_s, int(time.time() * 1000))
    IssuingCA(config.data_dir, config.issuing_ca_cert, config.issuing_ca_key)
    client_ca_of(config)
    if not config.insecure:
        _read_tls(config)
    SqliteStore(config.store_path, history_per_device=config.history_per_device).close()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def serve_workers(
    config: ServerConfig,
    workers: int,
    log_level: int = logging.WARNING,
    attestd_log_level: int = logging.NOTSET,
) -> None:
    """Run ``workers`` processes serving ``config.listen`` until SIGINT/SIGTERM.

    The workers log at ``log_level``, attestd's own loggers at ``attestd_log_level``
    (NOTSET: the same).

    Prints "attestd serving on HOST:PORT" once all of them listen. Raises WorkerFailed
    if one cannot start or dies unexpectedly (the others are stopped first).
    """
    if not config.port:
        raise ConfigError(f"listen: {workers} workers need an explicit port")
    if config.mtls_listen and not config.insecure and not config.mtls_port:
        raise ConfigError(f"mtls_listen: {workers} workers need an explicit port")
    prepare_shared(config)
    ctx = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.process.BaseProcess] = []
    stopping: list[int] = []  # the signal that asked us to stop, if any

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        conns = []
        for index in range(workers):
            if stopping:
                break
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=worker_main,
                args=(config, index, writer, log_level, attestd_log_level),
                name=f"attestd-worker-{index}",
            )
            proc.start()
            writer.close()
            procs.append(proc)
            conns.append(reader)
            log.info("worker %d started (pid %s)", index, proc.pid)
        failure = _await_ready(config, procs, conns, stopping)
        if failure is None and not stopping:
            print(f"attestd serving on {_address(config, config.port)}", flush=True)
            failure = _supervise(procs, stopping)
        if failure is not None or stopping:  # (again: one may have started since)
            forward(stopping[0] if stopping else signal.SIGTERM, None)
        _reap(procs)
        for conn in conns:
            conn.close()
        if failure is not None:
            raise failure
        bad = [
            f"worker {i} {_describe_exit(p.exitcode)}"
            for i, p in enumerate(procs)
            if p.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT)
        ]
        if bad:
            raise WorkerFailed("while stopping: " + ", ".join(bad), 1)
    finally:
        _reap(procs)  # never leave a worker behind, whatever happened
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _await_ready(
    config: ServerConfig,
    procs: list[multiprocessing.process.BaseProcess],
    conns: list[multiprocessing.connection.Connection],
    stopping: list[int],
) -> WorkerFailed | None:
    """Wait until every worker listens; the first failure to start, if any."""
    pending = dict(enumerate(conns))
    while pending and not stopping:
        waitables: list[Any] = [*pending.values(), *(procs[i].sentinel for i in pending)]
        multiprocessing.connection.wait(waitables)
        for index, conn in list(pending.items()):
            proc = procs[index]
            if not conn.poll() and proc.exitcode is None:
                continue
            try:
                message: tuple[str, Any] = conn.recv()
            except (EOFError, OSError):  # it died without a word
                proc.join(1)
                return WorkerFailed(
                    f"worker {index} could not start on {config.listen}"
                    f" ({_describe_exit(proc.exitcode)})",
                    2,
                )
            if message[0] != "ready":
                return WorkerFailed(f"worker {index}: {message[1]}", 2)
            log.info("worker %d (pid %s) listening", index, proc.pid)
            del pending[index]
    return None


def _supervise(
    procs: list[multiprocessing.process.BaseProcess], stopping: list[int]
) -> WorkerFailed | None:
    """Wait for a signal (all workers then stop) or for a worker to die (a failure)."""
    deadline: float | None = None
    while True:
        # One look at each (exitcode reaps): a worker dying now is waited for below.
        codes = [p.exitcode for p in procs]
        dead = [i for i, code in enumerate(codes) if code is not None]
        if dead and not stopping:
            index = dead[0]
            message = (
                f"worker {index} (pid {procs[index].pid}) stopped unexpectedly"
                f" ({_describe_exit(codes[index])}); all workers stopped"
            )
            log.error("%s", message)
            return WorkerFailed(message, 1)
        alive = [p for p, code in zip(procs, codes, strict=True) if code is None]
        if not alive:
            return None
        if stopping and deadline is None:
            deadline = time.monotonic() + WORKER_STOP_S
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        multiprocessing.connection.wait([p.sentinel for p in alive], timeout)
        if deadline is not None and time.monotonic() >= deadline:
            return None  # _reap kills the stragglers


def _reap(procs: list[multiprocessing.process.BaseProcess]) -> None:
    deadline = time.monotonic() + WORKER_STOP_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.exitcode is None:
            log.error("worker %s (pid %s) did not stop: killing it", p.name, p.pid)
            p.kill()
            p.join(5)


def worker_main(
    config: ServerConfig,
    index: int,
    conn: multiprocessing.connection.Connection,
    log_level: int,
    attestd_log_level: int = logging.NOTSET,
) -> None:
    """A worker process: serve until SIGTERM/SIGINT or until the parent is gone."""
    who = f"[worker {index} pid %(process)d]"
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s %(name)s {who}: %(message)s"
    )
    log.setLevel(attestd_log_level)
    with contextlib.suppress(ImportError):
        from cryptography.utils import CryptographyDeprecationWarning

        warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
    try:
        asyncio.run(_worker(config, index, conn))
    except Exception as e:
        log.error("worker %d failed: %s", index, e)
        with contextlib.suppress(OSError):
            conn.send(("error", str(e)))
        raise SystemExit(2) from None
    finally:
        conn.close()


async def _worker(
    config: ServerConfig, index: int, conn: multiprocessing.connection.Connection
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    parent = multiprocessing.parent_process()
    if parent is not None:  # a parent killed outright leaves no orphan serving
        loop.add_reader(parent.sentinel, stop.set)
    running = await create_server(config, reuse_port=True, sweep=index == 0, refresh_keys=True)
    settle_heap()
    conn.send(("ready", running.port))
    await stop.wait()
    log.info("stopping")
    await running.stop(5.0)
