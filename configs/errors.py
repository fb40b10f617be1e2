"""The exception tree shared by every layer (user / not-found / capacity / server).

- It lives in `configs`, the leaf package that deployments, actors and losses may all import.
- Exceptions carry only a message: no custom `__init__` arguments, so they pickle through Ray.
- Each also inherits the matching stdlib type, so generic handlers still make sense.
- The mapping to HTTP status and Tinker `category` is `deployments.errors.error_response`.
"""


class ThinkerError(Exception):
    """Base of every error Thinker raises on purpose."""


class UserError(ThinkerError, ValueError):
    """The request is wrong (bad shape, unknown loss, out-of-range token): the caller must fix it."""


class RequestTooLargeError(UserError):
    """The request body or batch is larger than this server accepts."""


class LimitExceededError(UserError):
    """The request would go over a configured limit (adapters, samplers, sizes); the message names
    the limit and its value. A user error (400), never 429: the SDK retries 429 for minutes."""


class SessionFinishedError(UserError):
    """The session was finished (by its client, or expired by the server): no new work (410)."""


class AuthenticationError(ThinkerError, PermissionError):
    """No usable API key: missing (where keys are required), unknown or revoked (401)."""


class NotFoundError(ThinkerError, LookupError):
    """A model, request id or checkpoint the caller named does not exist (or has expired)."""


class CapacityError(ThinkerError, RuntimeError):
    """The server is temporarily out of room inside (not a limit the caller went over: that is
    LimitExceededError); the same request may succeed later."""


class ServerError(ThinkerError, RuntimeError):
    """Something broke inside Thinker; not the caller's fault."""
