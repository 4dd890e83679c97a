"""Every error a client can see, as plain exceptions; `libs.rpc_status` maps them to the wire.

    KilnError                   code                 HTTP
    ├── InvalidArgument         INVALID_ARGUMENT     400  (+ BadRequest field violations)
    ├── Unauthenticated         UNAUTHENTICATED      401
    ├── PermissionDenied        PERMISSION_DENIED    403
    ├── NotFound                NOT_FOUND            404
    ├── FailedPrecondition      FAILED_PRECONDITION  409
    │   └── RequestIdReused     FAILED_PRECONDITION  422  (a request id sent again with another body)
    ├── ResourceExhausted       RESOURCE_EXHAUSTED   429  (+ RetryInfo, QuotaFailure)
    ├── Unavailable             UNAVAILABLE          503  (+ RetryInfo)
    ├── DeadlineExceeded        DEADLINE_EXCEEDED    504
    └── Internal                INTERNAL             500  (message never reaches the client)

Each carries an UPPER_SNAKE `reason` and string `metadata` for the `google.rpc.ErrorInfo` detail.
A subclass that only changes the HTTP status is found again from its reason (`error_class`), so it
keeps that status when it crosses a gRPC hop between services.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

DOMAIN = "kiln.dev"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    subject: str
    description: str


class KilnError(Exception):
    code: ClassVar[str] = "UNKNOWN"
    http_status: ClassVar[int] = 500
    default_reason: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        violations: list[FieldViolation] | None = None,
        retry_after_s: float | None = None,
        quota_violations: list[QuotaViolation] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.violations = list(violations or [])
        self.retry_after_s = retry_after_s
        self.quota_violations = list(quota_violations or [])


class InvalidArgument(KilnError):
    code = "INVALID_ARGUMENT"
    http_status = 400
    default_reason = "INVALID_ARGUMENT"

    @classmethod
    def field(cls, field: str, description: str, reason: str = "INVALID_FIELD") -> InvalidArgument:
        return cls(
            f"{field}: {description}",
            reason=reason,
            metadata={"field": field},
            violations=[FieldViolation(field, description)],
        )


class Unauthenticated(KilnError):
    code = "UNAUTHENTICATED"
    http_status = 401
    default_reason = "API_KEY_INVALID"


class PermissionDenied(KilnError):
    code = "PERMISSION_DENIED"
    http_status = 403
    default_reason = "PERMISSION_DENIED"


class NotFound(KilnError):
    code = "NOT_FOUND"
    http_status = 404
    default_reason = "NOT_FOUND"


class FailedPrecondition(KilnError):
    code = "FAILED_PRECONDITION"
    http_status = 409
    default_reason = "FAILED_PRECONDITION"


class RequestIdReused(FailedPrecondition):
    """The IETF Idempotency-Key draft's 422: the key was already used with a different request."""

    http_status = 422
    default_reason = "REQUEST_ID_REUSED"


class ResourceExhausted(KilnError):
    code = "RESOURCE_EXHAUSTED"
    http_status = 429
    default_reason = "RATE_LIMITED"


class Unavailable(KilnError):
    code = "UNAVAILABLE"
    http_status = 503
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(KilnError):
    code = "DEADLINE_EXCEEDED"
    http_status = 504
    default_reason = "DEADLINE_EXCEEDED"


class Internal(KilnError):
    code = "INTERNAL"
    http_status = 500
    default_reason = "INTERNAL"


BY_CODE: dict[str, type[KilnError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}

BY_REASON: dict[str, type[KilnError]] = {cls.default_reason: cls for cls in (RequestIdReused,)}


def error_class(code: str, reason: str | None) -> type[KilnError]:
    """The class for a status read off the wire: a reason-specific subclass of the code's class,
    or the code's class, or `Internal` for a code Kiln never sends."""
    by_code = BY_CODE.get(code, Internal)
    by_reason = BY_REASON.get(reason or "")
    return by_reason if by_reason is not None and issubclass(by_reason, by_code) else by_code
