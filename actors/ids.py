"""Every id and name Thinker mints or accepts, and what each looks like: the one place that says so.

- One character set and length limit for all of them: ASCII letters, digits, `_`, `.`, `-`, and
  `:` joining the parts of compound ids; at most 128 characters; the first one a letter, digit
  or `_`. So an id is never empty, `.` or `..`, never holds `/`, `\\`, NUL, spaces or non-ASCII,
  and is safe as one component of a storage path.
- Names that clients choose (checkpoint names, the simple routes' adapter names) use the same set
  without `:`, so they never look like an id the server minted.
- Minted here: session ids, training model ids `{session}:train:{n}`, sampler ids
  `{session}:sample:{n}` and request ids `req-{mint time, ms, hex}-{random hex}`.
- Torch-free and dependency-free: the ingress and the model actors both import it.
"""

from __future__ import annotations

import re
import time
import uuid

from configs.errors import UserError

MAX_LENGTH = 128
_ID = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.:-]{{0,{MAX_LENGTH - 1}}}")
_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{MAX_LENGTH - 1}}}")
_OWNED = re.compile(r"(?P<session>[^:]+):(?P<kind>train|sample):(?P<seq>\d{1,18})")
_REQUEST = re.compile(r"req-(?P<ms>[0-9a-f]{1,12})-[0-9a-f]{32}")

_LIMIT = f"at most {MAX_LENGTH} characters, starting with a letter, digit or '_'"
ID_RULE = f"letters, digits, '_', '.', '-' and ':', {_LIMIT}"
NAME_RULE = f"letters, digits, '_', '.' and '-', {_LIMIT}"


def check_id(value: object, what: str = "id") -> str:
    """`value` if it is a well-formed id, else a UserError that names `what` and the rule."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise UserError(f"{what} must be {ID_RULE}; got {_shown(value)}")
    return value


def check_name(value: object, what: str = "checkpoint name") -> str:
    """`value` if it is a well-formed client-chosen name (no ':'), else a UserError."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise UserError(f"{what} must be {NAME_RULE}; got {_shown(value)}")
    return value


def new_session_id() -> str:
    return str(uuid.uuid4())


def model_id(session_id: str, model_seq_id: int) -> str:
    """The training model id of a session's `model_seq_id`-th model."""
    return check_id(f"{check_id(session_id, 'session_id')}:train:{int(model_seq_id)}", "model_id")


def sampler_id(session_id: str, sampling_session_seq_id: int) -> str:
    """The sampler id of a session's `sampling_session_seq_id`-th sampling session."""
    return check_id(f"{check_id(session_id, 'session_id')}:sample:{int(sampling_session_seq_id)}", "sampler id")


def session_of(owned_id: str) -> str | None:
    """The session a training model or sampler id belongs to; None for ids no session minted
    (base model names, the simple routes' adapter names)."""
    match = _OWNED.fullmatch(owned_id)
    return match["session"] if match else None


def new_request_id() -> str:
    """A fresh request id; it carries its mint time, so a store can tell a fresh id from an expired one."""
    return f"req-{int(time.time() * 1000):x}-{uuid.uuid4().hex}"


def request_minted_at(request_id: str) -> float | None:
    """Wall-clock seconds at which the request id was minted; None for ids Thinker did not mint."""
    match = _REQUEST.fullmatch(request_id)
    return int(match["ms"], 16) / 1000 if match else None


def _shown(value: object) -> str:
    """The offending value for an error message: repr, cut short (an id may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(value) if isinstance(value, str) else '?'} characters)"
