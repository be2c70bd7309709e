"""The security interceptor: authenticate, authorize by ``access.MATRIX``, rate-limit, audit.

Credentials a caller may present:

- an API token, ``authorization: Bearer atd_<id>_<secret>``: looked up by id, its
  secret compared (constant time) with the stored SHA-256; revoked or expired
  tokens are refused;
- a role client certificate on the mTLS port (gRPC verified the chain to the
  client CA during the handshake): looked up by serial and matched by the SHA-256
  of the whole certificate, so revoking it takes effect at once;
- a device's own attestd credential (its EAR JWT) as the bearer token: role
  device, for its own records only.

A credential that is presented but does not check out is refused
(UNAUTHENTICATED) even where none is needed: a caller that meant to be someone
must learn that it is not. Refusals and every state-changing call are appended
to the audit log with the caller and the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import Message

from attestd.service.access import (
    MATRIX,
    OPEN_PREFIXES,
    AuditSlot,
    Principal,
    Role,
    Rule,
    current_actor,
    current_audit,
    current_peer,
    current_principal,
)
from attestd.service.auditing import audit_event
from attestd.service.errors import Handler, ServiceError, StreamHandler, classify, rewrap
from attestd.service.ratelimit import RateLimiter, peer_host
from attestd.service.state import ServiceState
from attestd.store.base import AuditEvent

log = logging.getLogger("attestd.security")

TOKEN_PREFIX = "atd_"  # noqa: S105 (a prefix, not a secret)
MAX_BEARER = 4096  # below gRPC's own 8 KiB header limit, so this check applies
# How often a stream re-checks its caller's credential (seconds).
RECHECK_S = 2.0
# Audit records of refused credentials per peer per minute; more are counted, not written.
AUTH_AUDIT_PER_MIN = 20

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def new_token() -> tuple[str, str, bytes]:
    """(credential id, token to hand out, SHA-256 of its secret to store)."""
    ident = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return f"tok-{ident}", f"{TOKEN_PREFIX}{ident}_{secret}", token_secret_hash(secret)


def token_secret_hash(secret: str) -> bytes:
    return hashlib.sha256(b"attestd-api-token\0" + secret.encode()).digest()


def _split_token(token: str) -> tuple[str, str] | None:
    body = token[len(TOKEN_PREFIX) :]
    ident, sep, secret = body.partition("_")
    if not sep or len(ident) != 16 or not secret:
        return None
    return f"tok-{ident}", secret


@functools.lru_cache(maxsize=1024)
def _certificate_identity(pem: bytes) -> tuple[str, str]:
    """(hex serial, hex SHA-256 of the DER) of a client certificate."""
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    return format(cert.serial_number, "x"), hashlib.sha256(der).hexdigest()


def _refuse(message: str, code: str, status: grpc.StatusCode = UNAUTH) -> ServiceError:
    return ServiceError(message, code, status)


class Authenticator:
    """Turns what a caller presented into a Principal (or None: no credential)."""

    def __init__(self, state: ServiceState) -> None:
        self.s = state

    async def authenticate(
        self, metadata: Sequence[tuple[str, str | bytes]] | None, auth_context: dict[str, Any]
    ) -> Principal | None:
        bearer = [v for k, v in (metadata or ()) if k == "authorization"]
        certs = auth_context.get("x509_pem_cert") or []
        if len(bearer) > 1 or (bearer and certs):
            raise _refuse("present one credential, not several", "CREDENTIAL_AMBIGUOUS")
        if certs:
            return await self._certificate(certs[0])
        if not bearer:
            return None
        value = bearer[0] if isinstance(bearer[0], str) else bearer[0].decode("ascii", "replace")
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_BEARER:
            raise _refuse("the authorization header is not 'Bearer <token>'", "CREDENTIAL_INVALID")
        if token.startswith(TOKEN_PREFIX):
            return await self._api_token(token)
        if token.count(".") == 2:
            return await self._device_credential(token)
        raise _refuse("the bearer token is not an attestd token", "CREDENTIAL_INVALID")

    async def _api_token(self, token: str) -> Principal:
        parts = _split_token(token)
        if parts is None:
            raise _refuse("the API token is malformed", "CREDENTIAL_INVALID")
        cred_id, secret = parts
        store = self.s.store.store
        record = await self.s.store(store.get_caller_credential, cred_id)
        # The hash is compared even for unknown ids, so timing does not tell them apart.
        stored = record.secret_hash if record is not None and record.kind == "token" else b"\0" * 32
        if not hmac.compare_digest(token_secret_hash(secret), stored) or record is None:
            raise _refuse("the API token is not valid", "CREDENTIAL_INVALID")
        self._check_live(record.revoked_at_ms, record.expires_at_ms, "API token")
        return Principal(Role(record.role), record.name, record.cred_id)

    async def _certificate(self, pem: str | bytes) -> Principal:
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            serial, fingerprint = _certificate_identity(data)
        except ValueError:
            raise _refuse("the client certificate cannot be read", "CREDENTIAL_INVALID") from None
        store = self.s.store.store
        record = await self.s.store(store.find_certificate_credential, serial)
        if record is None or not hmac.compare_digest(record.cert_sha256, fingerprint):
            raise _refuse(
                "the client certificate was not issued by `attestd admin issue-client-cert`",
                "CREDENTIAL_INVALID",
            )
        self._check_live(record.revoked_at_ms, record.expires_at_ms, "client certificate")
        return Principal(Role(record.role), record.name, record.cred_id)

    async def _device_credential(self, token: str) -> Principal:
        from attestd.service.verdicts import VALID, VerdictsService

        answer = await VerdictsService(self.s).verify_token(token, "")
        if answer.state != VALID:
            code = answer.reason.split(":", 1)[0] or "CREDENTIAL_INVALID"
            raise _refuse(f"the device credential is not valid ({code})", "CREDENTIAL_INVALID")
        return Principal(Role.DEVICE, answer.device_id, answer.credential_id, answer.device_id)

    def _check_live(self, revoked_at_ms: int, expires_at_ms: int, what: str) -> None:
        if revoked_at_ms:
            raise _refuse(f"the {what} was revoked", "CREDENTIAL_REVOKED")
        if expires_at_ms and self.s.now_ms() >= expires_at_ms:
            raise _refuse(f"the {what} has expired", "CREDENTIAL_EXPIRED")


def authorize(method: str, rule: Rule | None, principal: Principal | None, request: Any) -> None:
    """Raise unless ``principal`` may call ``method`` with ``request``."""
    if rule is None:
        raise _refuse(f"{method} is not callable", "METHOD_NOT_ALLOWED", DENIED)
    if principal is None:
        if rule.open:
            return
        raise _refuse(
            "this call needs a credential (an API token or a client certificate)",
            "CREDENTIAL_REQUIRED",
        )
    if not rule.allows(principal.role):
        raise _refuse(
            f"the {principal.role} role may not call {method}", "ROLE_NOT_ALLOWED", DENIED
        )
    if (
        principal.role is Role.DEVICE
        and rule.self_field
        and getattr(request, rule.self_field, "") != principal.device_id
    ):
        raise _refuse("a device may act only for itself", "NOT_YOUR_DEVICE", DENIED)


@contextlib.contextmanager
def claimed_audit(state: ServiceState, response: Message) -> Iterator[AuditEvent | None]:
    """The audit record of the call being served, for the servicer to write itself.

    A servicer that writes its result in one store transaction (Attest) appends the
    record there too: one transaction instead of two, and the record cannot be lost
    between them. The interceptor then writes nothing more for the call. If the block
    fails (the transaction refused: say, the nonce was spent by a racing call), the
    record is handed back and the interceptor records the refusal as for any call.
    """
    slot = current_audit.get()
    if slot is None or slot.claimed:
        yield None
        return
    slot.claimed = True
    try:
        yield audit_event(state.now_ms(), slot.kind, current_actor(), slot.request, response, "ok")
    except BaseException:
        slot.claimed = False
        raise


class SecurityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """One place for authentication, the role matrix, abuse limits and audit records.

    Sits inside ErrorInterceptor, which turns the ServiceErrors raised here into a
    status and an ``attestd-code``.
    """

    def __init__(self, state: ServiceState) -> None:
        self.s = state
        self.auth = Authenticator(state)
        config = state.config
        self.peer_limits = {
            bucket: RateLimiter(config.peer_rate_per_s, config.peer_burst)
            for bucket in ("nonce", "enroll")
        }
        self.device_limits = {
            bucket: RateLimiter(config.device_rate_per_s, config.device_burst)
            for bucket in ("nonce", "enroll")
        }
        self._auth_audits: dict[str, tuple[int, int, int]] = {}  # host -> (minute, n, skipped)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        rule = MATRIX.get(method)
        # attestd has no client-streaming RPCs: any other kind is refused (None).
        return rewrap(
            handler,
            lambda inner: self._unary(inner, method, rule),
            lambda inner: self._stream(inner, method, rule),
        )

    def _unary(self, inner: Handler, method: str, rule: Rule | None) -> Handler:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._admit(method, rule, request, context)
            if rule is None or not rule.audit:
                return await inner(request, context)
            slot = AuditSlot(rule.audit, request)
            current_audit.set(slot)
            try:
                response = await inner(request, context)
            except Exception as exc:
                if not isinstance(exc, grpc.aio.AbortError) and not slot.claimed:
                    await self._audit(rule.audit, request, None, classify(exc)[1])
                raise
            if not slot.claimed:
                await self._audit(rule.audit, request, response, "ok")
            return response

        return wrapped

    def _stream(self, inner: StreamHandler, method: str, rule: Rule | None) -> StreamHandler:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._admit(method, rule, request, context)
            if current_principal.get() is None:  # open streams: nothing to re-check
                async for item in inner(request, context):
                    yield item
                return
            # A long-lived stream (WatchVerdicts) ends soon after its caller's credential is
            # revoked or expires: the credential is checked again every RECHECK_S.
            items = inner(request, context).__aiter__()
            loop = asyncio.get_running_loop()
            due = loop.time() + RECHECK_S
            pending: asyncio.Future[Any] | None = None
            try:
                while True:
                    if pending is None:
                        pending = asyncio.ensure_future(items.__anext__())
                    done, _ = await asyncio.wait({pending}, timeout=max(0.0, due - loop.time()))
                    if done:
                        try:
                            item = pending.result()
                        except StopAsyncIteration:
                            return
                        pending = None
                        yield item
                    if loop.time() >= due:
                        await self._recheck(method, context)
                        due = loop.time() + RECHECK_S
            finally:
                if pending is not None:
                    pending.cancel()

        return wrapped

    async def _recheck(self, method: str, context: grpc.aio.ServicerContext) -> None:
        try:
            await self.auth.authenticate(context.invocation_metadata(), context.auth_context())
        except ServiceError as e:
            await self._audit_refusal(method, context.peer() or "", e)
            raise

    async def _admit(
        self, method: str, rule: Rule | None, request: Any, context: grpc.aio.ServicerContext
    ) -> None:
        peer = context.peer() or ""
        current_peer.set(peer)
        current_principal.set(None)
        try:
            principal = await self.auth.authenticate(
                context.invocation_metadata(), context.auth_context()
            )
            current_principal.set(principal)
            authorize(method, rule, principal, request)
        except ServiceError as e:
            await self._audit_refusal(method, peer, e)
            raise
        if rule is not None and rule.rate:
            self._rate_limit(rule.rate, peer, request)

    def _rate_limit(self, bucket: str, peer: str, request: Any) -> None:
        """Per peer address, and per device *from that address*.

        A device's allowance is keyed with the caller's address: anyone may ask for a
        nonce naming any device (the TPM proves the device only later, in the quote),
        so a per-device bucket shared by all callers would let a stranger use up the
        real device's allowance and lock it out.
        """
        now = time.monotonic()
        host = peer_host(peer)
        wait = self.peer_limits[bucket].take(host, now)
        if not wait:
            if bucket == "nonce":
                device = request.device_id
            else:
                device = hashlib.sha256(request.ek_certificate or request.ek_public).hexdigest()
            wait = self.device_limits[bucket].take(f"{device}|{host}", now) if device else 0.0
        if wait:
            raise ServiceError(
                f"too many calls; retry in {wait:.1f} s",
                "RATE_LIMITED",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )

    async def _audit(
        self, kind: str, request: Message, response: Message | None, outcome: str
    ) -> None:
        event = audit_event(self.s.now_ms(), kind, current_actor(), request, response, outcome)
        try:
            await self.s.store(self.s.store.store.append_audit, event)
        except Exception:
            log.exception("could not append to the audit log (%s)", kind)
            raise

    async def _audit_refusal(self, method: str, peer: str, error: ServiceError) -> None:
        """Refused credentials and roles go to the audit log, at a bounded rate per peer."""
        host = peer_host(peer)
        minute = int(time.monotonic() // 60)
        last_minute, count, skipped = self._auth_audits.get(host, (minute, 0, 0))
        if last_minute != minute:
            count = 0
        if count >= AUTH_AUDIT_PER_MIN:
            self._auth_audits[host] = (minute, count, skipped + 1)
            return
        if len(self._auth_audits) > 10_000:
            self._auth_audits.clear()
        self._auth_audits[host] = (minute, count + 1, 0)
        detail: dict[str, Any] = {"method": method, "code": error.code, "peer": peer}
        if skipped:
            detail["not_recorded_before"] = skipped
        event = AuditEvent(self.s.now_ms(), "auth.refused", current_actor(), "", detail)
        try:
            await self.s.store(self.s.store.store.append_audit, event)
        except Exception:
            log.exception("could not append an authentication refusal to the audit log")
