"""The one boundary where `KilnError` becomes a `google.rpc.Status`, and back.

gRPC servers abort with it (rich details in `grpc-status-details-bin`), gRPC clients rebuild the
exception from it, and REST renders it as Google's JSON error body.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import duration_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from libs.errors import (
    BY_CODE,
    DOMAIN,
    FieldViolation,
    Internal,
    KilnError,
    QuotaViolation,
    Unavailable,
    error_class,
)

log = logging.getLogger(__name__)

_DETAILS_KEY = "grpc-status-details-bin"
GENERIC_INTERNAL = "internal error"


def to_status(err: KilnError) -> status_pb2.Status:
    status = status_pb2.Status(code=code_pb2.Code.Value(err.code), message=err.message)
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata)
    )
    if err.violations:
        status.details.add().Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in err.violations
                ]
            )
        )
    if err.quota_violations:
        status.details.add().Pack(
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
                    for v in err.quota_violations
                ]
            )
        )
    if err.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(err.retry_after_s * 1000))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def from_status(status: status_pb2.Status) -> KilnError:
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after_s: float | None = None
    quota: list[QuotaViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            quota = [QuotaViolation(v.subject, v.description) for v in failure.violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.ToMilliseconds() / 1000
    cls = error_class(code_pb2.Code.Name(status.code), reason)
    return cls(
        status.message,
        reason=reason,
        metadata=metadata,
        violations=violations,
        retry_after_s=retry_after_s,
        quota_violations=quota,
    )


def from_rpc_error(err: grpc.aio.AioRpcError, peer: str = "upstream service") -> KilnError:
    """Rebuilds the exception a downstream Kiln service raised, details and all; `peer` names the
    service in the message when it could not be reached at all."""
    for key, value in err.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            return from_status(status_pb2.Status.FromString(value))
    code = err.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"{peer} unavailable: {err.details() or code.name}", reason="UPSTREAM_UNAVAILABLE")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"{peer} did not answer in time", reason="UPSTREAM_TIMEOUT")
    cls = BY_CODE.get(code.name, Internal)
    return cls(err.details() or code.name)


def to_json(err: KilnError) -> dict[str, Any]:
    """Google's REST error body: {"error": {"code", "status", "message", "details"}}."""
    status = to_status(err)
    return {
        "error": {
            "code": err.http_status,
            "status": err.code,
            "message": err.message,
            "details": [json_format.MessageToDict(d) for d in status.details],
        }
    }


def as_kiln_error(exc: BaseException) -> KilnError:
    """Known errors pass through; anything else is logged in full and becomes a generic INTERNAL."""
    if isinstance(exc, KilnError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        return from_rpc_error(exc)
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):  # also an exhausted pool
        log.warning("storage unavailable: %s", exc)
        return Unavailable("storage is unavailable; retry", reason="STORAGE_UNAVAILABLE", retry_after_s=1)
    log.error("unexpected error", exc_info=exc)
    return Internal(GENERIC_INTERNAL)


T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def grpc_boundary(method: F) -> F:
    """Wraps a servicer method (unary or server-streaming) so errors leave as rich statuses."""

    async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
        await context.abort_with_status(rpc_status.to_status(to_status(as_kiln_error(exc))))

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(
            self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as exc:  # the boundary: nothing escapes unmapped
                await abort(context, exc)

        return cast(F, stream)

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await cast(Callable[..., Awaitable[Any]], method)(self, request, context)
        except Exception as exc:
            await abort(context, exc)

    return cast(F, unary)
