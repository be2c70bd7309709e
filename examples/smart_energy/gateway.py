#!/usr/bin/env python3
"""Smart-energy gateway: takes meter readings over mTLS only from attested devices.

A sensor connects with the client certificate attestd issued for its TPM-resident
key. The gateway trusts only attestd's device CA (from GetTrustBundle), takes the
device id from the certificate's SAN URI (``urn:attestd:device:<id>``) and admits
the connection only while that device is currently affirming:

- an in-memory cache holds each device's state: filled with GetVerdict the first
  time the device is seen, then kept fresh by one background WatchVerdicts stream
  (which resumes from the last cursor it saw whenever it has to reconnect; if attestd
  no longer keeps the events after that cursor, CURSOR_EXPIRED, it reads every cached
  device again with GetVerdict and watches after the newest cursor attestd named);
- each new certificate is also checked once with VerifyCredential (a certificate
  from before a revocation or a failed attestation is refused even though the
  device has since been readmitted and attested again), remembered until the
  device's next REVOKED/FAILED/EXPIRED/READMITTED event;
- on REVOKED, FAILED or EXPIRED the device's open connections are closed at once
  (the sensor is told why) and new ones are refused.

While the watch stream is down the cache is not trusted: every new connection asks
GetVerdict afresh, the devices with open connections are polled every second, and if
attestd cannot be reached at all for ``--offline-grace`` seconds every connection is
closed (fail closed).

Protocol, newline-delimited JSON: the gateway greets with ``{"admitted": ID, ...}``
or ``{"refused": WHY}``; the sensor sends ``{"meter": STR, "kwh": NUMBER}`` (and
optionally ``"seq": INT``); the gateway answers only malformed lines
(``{"error": WHY}``) and, when it drops the connection, ``{"closed": WHY}``.
Accepted readings are appended to ``--readings`` as JSON lines with the device id.

    ATTESTD_TOKEN_FILE=gateway.token \\
    python examples/smart_energy/gateway.py --attestd 127.0.0.1:50051 \\
        --ca-cert attestd-tls/ca-cert.pem --listen 127.0.0.1:8443 --readings readings.jsonl

attestd is reached over TLS (``--ca-cert``/``ATTESTD_CA_CERT``: the CA that signed
attestd's certificate) with a credential of the gateway role: an API token
(``ATTESTD_TOKEN``, or a file: ``--token-file``/``ATTESTD_TOKEN_FILE``; made with
``attestd admin token create --role gateway``) or a gateway client certificate on
attestd's mTLS port (``--client-cert``/``--client-key``). The gateway checks the
credential once at start and stops if attestd refuses it. There is no plaintext
mode: the token would cross the network readable by anyone on the path.

The gateway's own certificate: ``--cert``/``--key``, or a self-signed Ed25519 one
made in ``--tls-dir`` on first start (sensors trust ``--tls-dir/gateway-cert.pem``).
Ed25519 matters for sensors whose OpenSSL uses the tpm2 provider: see README.md.
On start it prints ``listening on HOST:PORT`` (the real port when given 0).
SIGTERM or SIGINT: stop accepting, tell every sensor, close, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from attestd.connect import (
    ENV_CA_CERT,
    ENV_CLIENT_CERT,
    ENV_CLIENT_KEY,
    ENV_TOKEN,
    ENV_TOKEN_FILE,
    ConnectError,
    connection_from_args,
    open_aio_channel,
)
from attestd.service.keys import device_id_of
from attestd.v1 import common_pb2, verdicts_pb2, verdicts_pb2_grpc

log = logging.getLogger("gateway")

MAX_LINE = 4096  # bytes per JSON line
RPC_TIMEOUT_S = 5.0
HANDSHAKE_TIMEOUT_S = 10.0
SWEEP_S = 0.25  # local expiry checks
POLL_S = 1.0  # GetVerdict polling of connected devices while the watch is down
RESYNC_CONCURRENCY = 8  # GetVerdict calls at once when the cache is read again
# WatchVerdicts refused with CURSOR_EXPIRED carries the newest event cursor here.
CODE_KEY = "attestd-code"
LATEST_CURSOR_KEY = "attestd-latest-cursor"

AFFIRMING = common_pb2.VERDICT_STATUS_AFFIRMING
STATUS_NAMES = {1: "none", 2: "affirming", 3: "warning", 4: "contraindicated"}
K = verdicts_pb2
ENDING = {
    K.VERDICT_EVENT_KIND_FAILED: "failed",
    K.VERDICT_EVENT_KIND_REVOKED: "revoked",
    K.VERDICT_EVENT_KIND_EXPIRED: "expired",
}
KIND_NAMES = {1: "affirmed", 2: "failed", 3: "revoked", 4: "readmitted", 5: "expired"}
CREDENTIAL_STATES = {2: "invalid", 3: "expired", 4: "revoked"}


def now_ms() -> int:
    return int(time.time() * 1000)


def json_line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


class AttestdUnavailable(Exception):
    """attestd did not answer: the gateway refuses (fails closed)."""


# -- the verdict cache ----------------------------------------------------------


@dataclass(eq=False)
class DeviceState:
    """What the gateway believes about one device, from GetVerdict and the watch."""

    affirming: bool
    expires_at_ms: int  # of the device's live credential; 0: none
    why: str = ""  # why not affirming
    generation: int = 0  # bumped whenever the device's credentials may have ended
    certificates: dict[str, int] = field(default_factory=dict)  # serial -> not after (ms)

    def refusal(self, at_ms: int) -> str | None:
        """Why the device may not connect now; None if it may."""
        if not self.affirming:
            return self.why or "not affirming"
        if at_ms >= self.expires_at_ms:
            return "credential expired"
        return None

    def end(self, why: str) -> None:
        self.affirming = False
        self.why = why
        self.generation += 1
        self.certificates.clear()

    def take(self, other: DeviceState) -> None:
        """Adopt a fresh snapshot; certificates are checked again after it."""
        self.affirming, self.expires_at_ms, self.why = (
            other.affirming,
            other.expires_at_ms,
            other.why,
        )
        self.generation += 1
        self.certificates.clear()

    @classmethod
    def from_verdict(cls, v: verdicts_pb2.DeviceVerdict) -> DeviceState:
        if v.revoked:
            why = f"revoked: {v.revocation_reason}"
        elif not v.HasField("verdict"):
            why = "never attested"
        elif v.verdict.status != AFFIRMING:
            codes = ", ".join(f.code for f in v.verdict.failures)
            name = STATUS_NAMES.get(v.verdict.status, str(v.verdict.status))
            why = f"verdict {name}" + (f" ({codes})" if codes else "")
        elif not v.credential_expires_at_ms:
            why = "no live credential (expired, or revoked or failed since)"
        else:
            return cls(True, v.credential_expires_at_ms)
        return cls(False, 0, why)


class VerdictCache:
    """Device states, filled on first sight and kept fresh by WatchVerdicts."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        on_ended: Callable[[str, str], None],
        after_cursor: int = 0,
        on_resynced: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.channel = channel
        self.stub = verdicts_pb2_grpc.VerdictsStub(channel)
        self.on_ended = on_ended
        # After the cache was read again: check what it cannot see (open connections'
        # certificates, which a missed revocation may have ended).
        self.on_resynced = on_resynced
        self.entries: dict[str, DeviceState] = {}
        self.cursor = after_cursor
        self._call: Any = None  # the watch stream, while it runs
        self._fills: dict[str, asyncio.Future[DeviceState]] = {}
        self._raced: set[str] = set()  # devices with an event during their fill
        self.resyncing = False  # reading every cached device again (CURSOR_EXPIRED)

    @property
    def live(self) -> bool:
        """The watch stream is up: the cache can be trusted without asking attestd.

        False while the cache is read again after CURSOR_EXPIRED (no stream runs then).
        """
        call = self._call
        return (
            not self.resyncing
            and call is not None
            and not call.done()
            and self.channel.get_state() == grpc.ChannelConnectivity.READY
        )

    # Filling -----------------------------------------------------------------

    async def lookup(self, device_id: str) -> DeviceState:
        """The device's state: cached while the watch is live, else asked afresh."""
        entry = self.entries.get(device_id)
        if entry is not None and self.live:
            return entry
        return await self.refresh(device_id)

    async def refresh(self, device_id: str) -> DeviceState:
        """GetVerdict for the device (one call in flight per device)."""
        fill = self._fills.get(device_id)
        if fill is None:
            fill = asyncio.ensure_future(self._fill(device_id))
            self._fills[device_id] = fill
            fill.add_done_callback(lambda _f: self._fills.pop(device_id, None))
        return await asyncio.shield(fill)

    async def _fill(self, device_id: str) -> DeviceState:
        # An event that arrives while GetVerdict is in flight may be newer than the
        # answer: ask again then (a few times at most).
        for _ in range(3):
            self._raced.discard(device_id)
            try:
                verdict = await self.stub.GetVerdict(
                    verdicts_pb2.GetVerdictRequest(device_id=device_id), timeout=RPC_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    return DeviceState(False, 0, "unknown to attestd")
                raise AttestdUnavailable(f"GetVerdict: {e.code().name}: {e.details()}") from None
            if device_id not in self._raced:
                break
        self._raced.discard(device_id)
        fresh = DeviceState.from_verdict(verdict)
        entry = self.entries.get(device_id)
        if entry is None:
            self.entries[device_id] = entry = fresh
        else:
            was = entry.refusal(now_ms())
            entry.take(fresh)
            why = entry.refusal(now_ms())
            if why is not None and was is None:
                self.on_ended(device_id, why)
        return entry

    async def check_certificate(
        self, device_id: str, entry: DeviceState, der: bytes, serial: str, not_after_ms: int
    ) -> str | None:
        """Why attestd does not vouch for this certificate now; None if it does."""
        if serial in entry.certificates:
            return None
        for _ in range(3):
            generation = entry.generation
            try:
                answer = await self.stub.VerifyCredential(
                    verdicts_pb2.VerifyCredentialRequest(certificate=der, device_id=device_id),
                    timeout=RPC_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as e:
                raise AttestdUnavailable(
                    f"VerifyCredential: {e.code().name}: {e.details()}"
                ) from None
            if answer.state != verdicts_pb2.CREDENTIAL_STATE_VALID:
                state = CREDENTIAL_STATES.get(answer.state, str(answer.state))
                return f"certificate {state}: {answer.reason}"
            if entry.generation == generation:  # no event in between: the answer stands
                at = now_ms()
                for old in [s for s, end in entry.certificates.items() if end <= at]:
                    del entry.certificates[old]
                entry.certificates[serial] = not_after_ms
                return None
        return "the device's state kept changing; try again"

    # The watch -----------------------------------------------------------------

    async def resync(self, latest: int | None, problem: str) -> None:
        """Events after our cursor are gone: read every cached device again.

        ``latest`` is the newest event cursor, read by attestd before we ask for any
        verdict: every change after it comes on the stream watched from it, every
        change before it is in the verdicts read now. Without it (an attestd that does
        not send it), the cache is emptied and the watch starts again from cursor 0.
        Meanwhile ``live`` is false: lookups ask attestd.
        """
        self.resyncing = True
        try:
            if latest is None:
                log.warning(
                    "verdict events after cursor %d are gone (%s) and attestd did not say"
                    " where to resume; emptying the cache (every device is looked up"
                    " afresh) and watching from cursor 0",
                    self.cursor,
                    problem,
                )
                self.entries.clear()
                self.cursor = 0
                return
            # A GetVerdict already in flight may have been answered before `latest`
            # was read: have it ask again (as for an event during a fill).
            self._raced.update(self._fills)
            devices = sorted(set(self.entries) | set(self._fills))
            log.warning(
                "verdict events after cursor %d are gone (%s): events were missed;"
                " reading the %d cached device(s) again before watching after cursor %d",
                self.cursor,
                problem,
                len(devices),
                latest,
            )
            slots = asyncio.Semaphore(RESYNC_CONCURRENCY)

            async def read_again(device_id: str) -> None:
                async with slots:
                    await self.refresh(device_id)

            results = await asyncio.gather(
                *(read_again(d) for d in devices), return_exceptions=True
            )
            unread = [d for d, r in zip(devices, results, strict=True) if r is not None]
            for device_id in unread:
                # Not read again: forget it, so that it is looked up afresh.
                self.entries.pop(device_id, None)
            if self.on_resynced is not None:
                await self.on_resynced()
            self.cursor = latest
            log.warning(
                "missed verdict events: the cache was read again (%d device(s)%s);"
                " watching after cursor %d",
                len(devices) - len(unread),
                f", {len(unread)} unreachable and forgotten" if unread else "",
                latest,
            )
        finally:
            self.resyncing = False

    def apply(self, event: verdicts_pb2.VerdictEvent) -> None:
        self.cursor = max(self.cursor, event.cursor)
        device_id = event.device_id
        if device_id in self._fills:
            self._raced.add(device_id)
        entry = self.entries.get(device_id)
        log.info(
            "event %d: %s %s (%d ms after it happened)",
            event.cursor,
            KIND_NAMES.get(event.kind, str(event.kind)),
            device_id,
            now_ms() - event.at_ms,
        )
        if event.kind in ENDING:
            what = ENDING[event.kind]
            why = f"{what}: {event.reason}" if event.reason else what
            if entry is not None:
                entry.end(why)
            self.on_ended(device_id, why)
        elif entry is None:
            return  # not seen yet: GetVerdict when it is
        elif event.kind == K.VERDICT_EVENT_KIND_AFFIRMED:
            entry.affirming = True
            entry.expires_at_ms = event.credential_expires_at_ms
            entry.why = ""
        elif event.kind == K.VERDICT_EVENT_KIND_READMITTED:
            # Readmission earns nothing by itself: the next affirming attestation does.
            entry.end("readmitted, not attested since")

    async def watch(self) -> None:
        """Follow WatchVerdicts forever, reconnecting from the last cursor."""
        backoff = 0.2
        while True:
            request = verdicts_pb2.WatchVerdictsRequest(after_cursor=self.cursor)
            self._call = call = self.stub.WatchVerdicts(request)
            log.info("watching verdict events after cursor %d", self.cursor)
            expired: tuple[int | None] | None = None  # (latest cursor,) on CURSOR_EXPIRED
            try:
                async for event in call:
                    self.apply(event)
                    backoff = 0.2
                problem = "the stream ended"
            except grpc.aio.AioRpcError as e:
                problem = f"{e.code().name}: {e.details()}"
                expired = cursor_expired(e)
            finally:
                self._call = None
                call.cancel()
            if expired is not None:
                # Not a broken stream: attestd no longer keeps the events after our
                # cursor. Retrying from it would fail forever (or, were it accepted,
                # skip a revocation): read the cache again instead.
                await self.resync(expired[0], problem)
                backoff = 0.2
                continue
            log.warning(
                "verdict watch lost (%s); the cache is not trusted until it is back; "
                "retrying in %.1f s from cursor %d",
                problem,
                backoff,
                self.cursor,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


def cursor_expired(e: grpc.aio.AioRpcError) -> tuple[int | None] | None:
    """(latest cursor or None,) if WatchVerdicts refused an expired cursor, else None."""
    if e.code() != grpc.StatusCode.OUT_OF_RANGE:
        return None
    trailers = dict(e.trailing_metadata() or ())
    if trailers.get(CODE_KEY) != "CURSOR_EXPIRED":
        return None
    latest = str(trailers.get(LATEST_CURSOR_KEY, ""))
    return (int(latest),) if latest.isdigit() else (None,)


# -- the gateway ------------------------------------------------------------------


def refused_credential(e: grpc.aio.AioRpcError) -> None:
    """Stop if attestd refused the gateway's credential: retrying will not help."""
    if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        raise SystemExit(
            f"gateway: attestd refused the gateway's credential: {e.code().name}:"
            f" {e.details()}; give a token of the gateway role (${ENV_TOKEN},"
            f" --token-file or ${ENV_TOKEN_FILE}) or a gateway client certificate"
        ) from None


@dataclass(eq=False)
class Connection:
    device_id: str
    peer: str
    writer: asyncio.StreamWriter
    not_after_ms: int
    der: bytes  # the client certificate, checked again after missed events
    serial: str
    readings: int = 0
    closed_because: str | None = None

    def kick(self, why: str) -> None:
        """Tell the sensor why and close: the TLS close_notify goes out right away."""
        if self.closed_because is not None:
            return
        self.closed_because = why
        with contextlib.suppress(Exception):
            self.writer.write(json_line({"closed": why}))
            self.writer.close()
            # A sensor that never completes the TLS shutdown cannot keep the socket.
            asyncio.get_running_loop().call_later(2.0, self.writer.transport.abort)


class Gateway:
    def __init__(self, args: argparse.Namespace, readings: TextIO) -> None:
        self.args = args
        self.readings = readings
        # TLS and the gateway's credential; after an outage, reconnect within seconds
        # (gRPC's own backoff grows to 2 min).
        self.channel = open_aio_channel(
            args.connection, options=[("grpc.max_reconnect_backoff_ms", 2000)]
        )
        self.cache = VerdictCache(
            self.channel, self.drop_device, args.after_cursor, self.recheck_certificates
        )
        self.connections: dict[str, set[Connection]] = {}
        self.tls: ssl.SSLContext | None = None
        self.stopping = False
        self._unreachable_since: float | None = None

    # Admission -------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        peer = _join(host, port)
        assert self.tls is not None
        try:
            await writer.start_tls(self.tls, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            log.warning("refused %s: TLS handshake failed: %s", peer, _tls_reason(e))
            writer.transport.abort()
            return
        conn: Connection | None = None
        try:
            conn = await self.admit(peer, writer)
            if conn is not None:
                await self.take_readings(conn, reader)
        except (ConnectionError, ssl.SSLError) as e:
            if conn is None or conn.closed_because is None:  # else: a reading met our close
                log.info("%s: connection lost: %s", peer, _tls_reason(e))
        finally:
            if conn is not None:
                self.connections.get(conn.device_id, set()).discard(conn)
                if not self.connections.get(conn.device_id):
                    self.connections.pop(conn.device_id, None)
                log.info(
                    "device %s (%s) gone after %d readings%s",
                    conn.device_id,
                    peer,
                    conn.readings,
                    f": {conn.closed_because}" if conn.closed_because else "",
                )
            if not writer.is_closing():
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 3.0)

    async def admit(self, peer: str, writer: asyncio.StreamWriter) -> Connection | None:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der)
        device_id = device_id_of(cert)
        if not device_id:
            return await self.refuse(writer, peer, "?", "no attestd device id in the certificate")
        try:
            entry = await self.cache.lookup(device_id)
            why = entry.refusal(now_ms())
            if why is None:
                why = await self.cache.check_certificate(
                    device_id,
                    entry,
                    der,
                    format(cert.serial_number, "x"),
                    int(cert.not_valid_after_utc.timestamp() * 1000),
                )
        except AttestdUnavailable as e:
            why = f"attestd unreachable, failing closed ({e})"
        if why is None:
            # Registered before the last check, with no await in between: an event
            # from here on finds the connection and closes it.
            conn = Connection(
                device_id,
                peer,
                writer,
                int(cert.not_valid_after_utc.timestamp() * 1000),
                der,
                format(cert.serial_number, "x"),
            )
            self.connections.setdefault(device_id, set()).add(conn)
            why = entry.refusal(now_ms())
            if why is None and not self.stopping:
                writer.write(json_line({"admitted": device_id, "until_ms": entry.expires_at_ms}))
                await writer.drain()
                log.info("admitted device %s from %s", device_id, peer)
                return conn
            self.connections[device_id].discard(conn)
            why = why or "gateway shutting down"
        return await self.refuse(writer, peer, device_id, why)

    async def refuse(
        self, writer: asyncio.StreamWriter, peer: str, device_id: str, why: str
    ) -> None:
        log.warning("refused device %s from %s: %s", device_id, peer, why)
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            writer.write(json_line({"refused": why}))
            await writer.drain()
        return None

    # Readings ------------------------------------------------------------------

    async def take_readings(self, conn: Connection, reader: asyncio.StreamReader) -> None:
        while conn.closed_because is None:
            try:
                line = await reader.readline()
            except ValueError:  # longer than MAX_LINE
                conn.kick(f"line longer than {MAX_LINE} bytes")
                return
            if not line or conn.closed_because is not None:
                return
            reading, problem = parse_reading(line)
            if reading is None:
                conn.writer.write(json_line({"error": problem}))
                continue
            record = {"device": conn.device_id, **reading, "received_at_ms": now_ms()}
            self.readings.write(json.dumps(record, sort_keys=True) + "\n")
            self.readings.flush()
            conn.readings += 1

    # Dropping ------------------------------------------------------------------

    def drop_device(self, device_id: str, why: str) -> None:
        """Close every open connection of the device now."""
        conns = list(self.connections.get(device_id, ()))
        for conn in conns:
            conn.kick(why)
        if conns:
            log.warning("closed %d connection(s) of device %s: %s", len(conns), device_id, why)

    async def recheck_certificates(self) -> None:
        """After missed events: does attestd still vouch for each open connection?

        A revocation in the gap, followed by readmission and a new attestation, leaves
        the device affirming, but the certificates from before it are no longer good.
        """
        slots = asyncio.Semaphore(RESYNC_CONCURRENCY)

        async def recheck(conn: Connection) -> None:
            entry = self.cache.entries.get(conn.device_id)
            if entry is None or conn.closed_because is not None:
                return  # forgotten: the sweep reads it again
            async with slots:
                try:
                    why = entry.refusal(now_ms()) or await self.cache.check_certificate(
                        conn.device_id, entry, conn.der, conn.serial, conn.not_after_ms
                    )
                except AttestdUnavailable as e:
                    why = f"attestd unreachable after missed events, failing closed ({e})"
            if why is not None:
                log.warning("closing %s (device %s): %s", conn.peer, conn.device_id, why)
                conn.kick(why)

        conns = [c for cs in self.connections.values() for c in cs]
        await asyncio.gather(*(recheck(c) for c in conns))

    async def sweep(self) -> None:
        """Local expiry checks; polling and failing closed while the watch is down."""
        last_poll = 0.0
        while True:
            await asyncio.sleep(SWEEP_S)
            at = now_ms()
            if not self.cache.live and self.connections and time.monotonic() - last_poll >= POLL_S:
                last_poll = time.monotonic()
                await self.poll_connected()
            forgotten = [d for d in self.connections if d not in self.cache.entries]
            if forgotten:  # the cache was emptied or a device forgotten: read them again
                await self.poll_connected(forgotten)
            for device_id, conns in list(self.connections.items()):
                entry = self.cache.entries.get(device_id)
                if entry is None:
                    continue  # not read again yet: polled above, dropped after the grace
                why = entry.refusal(at)
                if why is not None:
                    self.drop_device(device_id, why)
                    continue
                for conn in list(conns):
                    if conn.not_after_ms <= at:
                        conn.kick("certificate expired")

    async def poll_connected(self, devices: list[str] | None = None) -> None:
        devices = list(self.connections) if devices is None else devices
        results = await asyncio.gather(
            *(self.cache.refresh(d) for d in devices), return_exceptions=True
        )
        if not any(isinstance(r, AttestdUnavailable) for r in results):
            self._unreachable_since = None
            return
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
        offline = time.monotonic() - self._unreachable_since
        if offline >= self.args.offline_grace:
            for device_id in devices:
                self.drop_device(device_id, f"attestd unreachable for {offline:.0f} s")

    # Running -------------------------------------------------------------------

    async def trust_bundle(self) -> str:
        stub = verdicts_pb2_grpc.VerdictsStub(self.channel)
        deadline = time.monotonic() + self.args.connect_timeout
        while True:
            try:
                bundle = await stub.GetTrustBundle(
                    verdicts_pb2.GetTrustBundleRequest(), timeout=RPC_TIMEOUT_S
                )
                return bundle.ca_certificates_pem
            except grpc.aio.AioRpcError as e:
                refused_credential(e)
                if time.monotonic() >= deadline:
                    hint = ""
                    if any(w in (e.details() or "").lower() for w in ("ssl", "handshake")):
                        hint = (
                            f" (TLS failed: give the CA that signed attestd's certificate,"
                            f" --ca-cert or ${ENV_CA_CERT})"
                        )
                    raise SystemExit(
                        f"gateway: attestd at {self.args.attestd} did not answer "
                        f"GetTrustBundle: {e.code().name}: {e.details()}{hint}"
                    ) from None
                await asyncio.sleep(0.5)

    async def check_credential(self) -> None:
        """Stop at once if attestd refuses the gateway's credential (or its role)."""
        stub = verdicts_pb2_grpc.VerdictsStub(self.channel)
        probe = "dev-" + "0" * 32  # well formed, enrolled nowhere
        try:
            await stub.GetVerdict(
                verdicts_pb2.GetVerdictRequest(device_id=probe), timeout=RPC_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            refused_credential(e)
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise SystemExit(
                    f"gateway: attestd at {self.args.attestd}: GetVerdict:"
                    f" {e.code().name}: {e.details()}"
                ) from None

    async def run(self) -> int:
        ca_pem = await self.trust_bundle()
        await self.check_credential()
        cert_path, key_path = server_identity(self.args)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.verify_mode = ssl.CERT_REQUIRED  # no certificate, no connection
        tls.load_verify_locations(cadata=ca_pem)  # attestd's device CA, nothing else
        tls.load_cert_chain(cert_path, key_path)
        self.tls = tls

        host, port = split_host_port(self.args.listen)
        server = await asyncio.start_server(self.handle, host, port, limit=MAX_LINE)
        bound = server.sockets[0].getsockname()
        print(f"listening on {_join(bound[0], bound[1])}", flush=True)
        log.info("trusting attestd's device CA only; certificate %s", cert_path)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks = [
            asyncio.create_task(self.cache.watch(), name="watch"),
            asyncio.create_task(self.sweep(), name="sweep"),
        ]
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopped and task.exception() is not None:
                log.error("%s failed: %r", task.get_name(), task.exception())

        log.info("stopping")
        self.stopping = True
        server.close()
        for device_id in list(self.connections):
            self.drop_device(device_id, "gateway shutting down")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5.0)
        await self.channel.close()
        log.info("stopped")
        return 0 if stopped in done else 1


def parse_reading(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """A reading ``{"meter": str, "kwh": number[, "seq": int]}``, or why it is not one."""
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None, "not JSON"
    if not isinstance(doc, dict):
        return None, "not a JSON object"
    meter, kwh, seq = doc.get("meter"), doc.get("kwh"), doc.get("seq")
    if not isinstance(meter, str) or not 0 < len(meter) <= 64:
        return None, "meter: a string of 1 to 64 characters"
    if (
        isinstance(kwh, bool)
        or not isinstance(kwh, int | float)
        or not math.isfinite(kwh)
        or kwh < 0
    ):
        return None, "kwh: a finite number, not negative"
    reading: dict[str, Any] = {"meter": meter, "kwh": kwh}
    if seq is not None:
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            return None, "seq: a non-negative integer"
        reading["seq"] = seq
    return reading, ""


# -- the gateway's own certificate ------------------------------------------------


def server_identity(args: argparse.Namespace) -> tuple[Path, Path]:
    """(certificate, key): --cert/--key, or a self-signed Ed25519 pair in --tls-dir."""
    if args.cert or args.key:
        if not (args.cert and args.key):
            raise SystemExit("gateway: --cert and --key go together")
        return Path(args.cert), Path(args.key)
    directory = Path(args.tls_dir)
    cert_path, key_path = directory / "gateway-cert.pem", directory / "gateway-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    host, _ = split_host_port(args.listen)
    key = ed25519.Ed25519PrivateKey.generate()
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for name in {host or "0.0.0.0", "127.0.0.1", "::1", *args.server_name}:  # noqa: S104
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            names.append(x509.DNSName(name))
            continue
        if ip.is_unspecified:
            names.append(x509.DNSName(socket.gethostname()))
        else:
            names.append(x509.IPAddress(ip))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smart-energy gateway")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, None)
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("made a self-signed Ed25519 certificate: %s", cert_path)
    return cert_path, key_path


def split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"gateway: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tls_reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attestd", required=True, help="attestd's gRPC address, HOST:PORT")
    env = os.environ.get
    a = p.add_argument_group("reaching attestd (TLS, and a credential of the gateway role)")
    a.add_argument(
        "--ca-cert",
        default=env(ENV_CA_CERT),
        help=f"CA (PEM) that signed attestd's TLS certificate (${ENV_CA_CERT};"
        " default: the system's roots)",
    )
    a.add_argument(
        "--token-file",
        default=env(ENV_TOKEN_FILE),
        help=f"file holding a gateway API token (${ENV_TOKEN_FILE}; or the token in ${ENV_TOKEN})",
    )
    a.add_argument(
        "--client-cert",
        default=env(ENV_CLIENT_CERT),
        help=f"instead of a token: a gateway client certificate, for attestd's mTLS port"
        f" (${ENV_CLIENT_CERT})",
    )
    a.add_argument("--client-key", default=env(ENV_CLIENT_KEY), help=f"its key (${ENV_CLIENT_KEY})")
    p.add_argument("--listen", required=True, help="HOST:PORT for sensors (port 0: any free)")
    p.add_argument("--readings", required=True, help="append accepted readings here (- stdout)")
    p.add_argument("--cert", help="the gateway's certificate (PEM); with --key")
    p.add_argument("--key", help="the gateway's private key (PEM)")
    p.add_argument(
        "--tls-dir",
        default="gateway-tls",
        help="without --cert/--key: where the self-signed certificate is made and kept",
    )
    p.add_argument(
        "--server-name",
        action="append",
        default=[],
        help="another name for the self-signed certificate; repeatable",
    )
    p.add_argument("--after-cursor", type=int, default=0, help="watch events after this cursor")
    p.add_argument(
        "--offline-grace",
        type=float,
        default=60.0,
        help="seconds attestd may be unreachable before every connection is closed",
    )
    p.add_argument(
        "--connect-timeout", type=float, default=30.0, help="seconds to wait for attestd at start"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.server, args.insecure = args.attestd, False
    try:
        args.connection = connection_from_args(args)
    except ConnectError as e:
        p.error(str(e))
    if not args.connection.token and not args.connection.client_cert:
        p.error(
            f"attestd needs a credential of the gateway role: a token (${ENV_TOKEN},"
            f" --token-file or ${ENV_TOKEN_FILE}) or --client-cert/--client-key"
        )
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s gateway %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.readings == "-":
        return asyncio.run(serve(args, sys.stdout))
    with open(args.readings, "a", encoding="utf-8") as readings:
        return asyncio.run(serve(args, readings))


async def serve(args: argparse.Namespace, readings: TextIO) -> int:
    # The gRPC channel belongs to the running event loop: make it inside.
    return await Gateway(args, readings).run()


if __name__ == "__main__":
    sys.exit(main())
