"""The one place that maps an exception to an HTTP status and a Tinker error `category`, and
back (`exception_of`, for the Ray-native client, which gets the routes' answers, not exceptions).

The SDK retries 408/409/429/5xx (for minutes), so a user's mistake must never map to one of them.
"""

from __future__ import annotations

import logging

from ray.exceptions import RayTaskError

from configs.errors import (
    AuthenticationError,
    CapacityError,
    NotFoundError,
    RequestTooLargeError,
    ServerError,
    SessionFinishedError,
    ThinkerError,
    UserError,
)

logger = logging.getLogger(__name__)


def unwrap(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, rather than its RayTaskError wrapper."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        return exc.cause
    return exc


def error_response(exc: BaseException) -> tuple[int, dict[str, str]]:
    """(HTTP status, {"error", "category"}) for any exception."""
    exc = unwrap(exc)
    if isinstance(exc, AuthenticationError):  # `detail` too: the SDK's `tinker auth login` shows that field
        return 401, {"error": str(exc), "category": "user", "detail": str(exc)}
    if isinstance(exc, NotFoundError):
        return 404, {"error": str(exc), "category": "user"}
    if isinstance(exc, RequestTooLargeError):
        return 413, {"error": str(exc), "category": "user"}
    if isinstance(exc, SessionFinishedError):  # the SDK stops its heartbeats on a 410
        return 410, {"error": str(exc), "category": "user"}
    if isinstance(exc, UserError):
        return 400, {"error": str(exc), "category": "user"}
    if isinstance(exc, CapacityError):
        return 429, {"error": str(exc), "category": "server"}
    logger.error("internal error", exc_info=exc)
    return 500, {"error": f"internal server error: {type(exc).__name__}: {exc}", "category": "server"}


def exception_of(status: int, body: dict) -> ThinkerError:
    """The Thinker error an error answer (`status`, `{"error", "category"}`) stands for."""
    kinds = {401: AuthenticationError, 404: NotFoundError, 410: SessionFinishedError, 413: RequestTooLargeError}
    kinds[429] = CapacityError
    kind = kinds.get(status, UserError if 400 <= status < 500 else ServerError)
    return kind(str(body.get("error") or body.get("detail") or f"HTTP {status}"))
