"""Exceptions -> gRPC status, in one interceptor.

Every error a client sees carries a status code and a stable reason code in
the trailing metadata key ``attestd-code`` (docs/api.md lists them). An
unexpected exception becomes INTERNAL with an opaque reference; its
traceback goes to the server log only, never to the client.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from attestd.core.errors import EnrollmentError, EvidenceError
from attestd.store.base import Conflict, NotFound, Rejected, StoreError, StoreUnavailable

log = logging.getLogger("attestd.service")

CODE_KEY = "attestd-code"
# Streaming services of grpc itself (health, reflection) are left as they are.
_NOT_OURS = ("/grpc.",)


class ServiceError(Exception):
    """An error with its gRPC status and reason code, raised by servicers."""

    status = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        message: str,
        code: str,
        status: grpc.StatusCode | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        # Extra trailing metadata for the client (e.g. where to resume a watch).
        self.metadata = metadata
        if status is not None:
            self.status = status


_IN_USE_CODES = frozenset({"POLICY_IN_USE", "GROUP_IN_USE"})
_PERMISSION_CODES = frozenset(
    {
        "EK_CHAIN_UNTRUSTED",
        "ACTIVATION_SECRET_MISMATCH",
        "DEVICE_EK_MISMATCH",
        "DEVICE_NOT_PREREGISTERED",
    }
)


def classify(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(status, reason code, message) for an exception a servicer raised."""
    if isinstance(exc, ServiceError):
        return exc.status, exc.code, str(exc)
    if isinstance(exc, EnrollmentError):
        status = (
            grpc.StatusCode.PERMISSION_DENIED
            if exc.code in _PERMISSION_CODES
            else grpc.StatusCode.INVALID_ARGUMENT
        )
        return status, exc.code, str(exc)
    if isinstance(exc, EvidenceError):
        return grpc.StatusCode.INVALID_ARGUMENT, exc.code, str(exc)
    if isinstance(exc, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, exc.code, "the store is unavailable; retry later"
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, exc.code, str(exc)
    if isinstance(exc, Rejected):
        return grpc.StatusCode.FAILED_PRECONDITION, exc.code, str(exc)
    if isinstance(exc, Conflict):
        if exc.code in _PERMISSION_CODES:
            status = grpc.StatusCode.PERMISSION_DENIED
        elif exc.code in _IN_USE_CODES:
            status = grpc.StatusCode.FAILED_PRECONDITION
        else:
            status = grpc.StatusCode.ALREADY_EXISTS
        return status, exc.code, str(exc)
    if isinstance(exc, StoreError):
        return grpc.StatusCode.UNAVAILABLE, exc.code, "the store failed; retry later"
    ref = secrets.token_hex(6)
    log.error("internal error ref=%s", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, "INTERNAL", f"internal error (reference {ref})"


def _trailers(exc: BaseException, code: str) -> tuple[tuple[str, str], ...]:
    extra = exc.metadata if isinstance(exc, ServiceError) else ()
    return ((CODE_KEY, code), *extra)


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamHandler = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


def rewrap(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Handler], Handler],
    stream: Callable[[StreamHandler], StreamHandler],
) -> grpc.RpcMethodHandler | None:
    """``handler`` with its unary-unary or unary-stream behaviour wrapped (the same
    (de)serializers); None for a kind attestd's services do not have."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream(handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return None


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps exceptions from unary and server-streaming handlers to a status plus
    ``attestd-code``."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_NOT_OURS):
            return handler
        wrapped = rewrap(
            handler,
            lambda inner: self._unary(inner, method),
            lambda inner: self._stream(inner, method),
        )
        return handler if wrapped is None else wrapped

    @staticmethod
    def _unary(inner: Handler, method: str) -> Handler:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                status, code, message = classify(exc)
                if status is not grpc.StatusCode.INTERNAL:
                    log.info("%s refused: %s %s", method, status.name, code)
                await context.abort(status, message, trailing_metadata=_trailers(exc, code))

        return wrapped

    @staticmethod
    def _stream(inner: StreamHandler, method: str) -> StreamHandler:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in inner(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                status, code, message = classify(exc)
                log.info("%s ended: %s %s", method, status.name, code)
                await context.abort(status, message, trailing_metadata=_trailers(exc, code))

        return wrapped
