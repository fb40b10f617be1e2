"""Ids and names: what Thinker mints parses back, and nothing path-like or oversized gets in."""

import time

import pytest

from actors import ids
from configs.errors import UserError

HOSTILE = [
    "",
    ".",
    "..",
    "../escape-session",
    "a/b",
    "/etc/passwd",
    "a\\b",
    "nul\x00byte",
    "lone\ud800surrogate",
    "caf\u00e9",
    "with space",
    ".hidden",
    "-option",
    "x" * 129,
    None,
    12,
]


def test_minted_ids_parse_back_to_their_session():
    session = ids.new_session_id()
    model, sampler = ids.model_id(session, 3), ids.sampler_id(session, 0)
    assert (model, sampler) == (f"{session}:train:3", f"{session}:sample:0")
    assert ids.session_of(model) == session and ids.session_of(sampler) == session
    assert ids.check_id(model) == model and ids.check_id(sampler) == sampler
    assert ids.session_of("my-adapter") is None and ids.session_of("a:train:x") is None


def test_request_ids_carry_their_mint_time():
    request_id = ids.new_request_id()
    assert ids.check_id(request_id) == request_id
    assert abs(ids.request_minted_at(request_id) - time.time()) < 5
    assert ids.request_minted_at("req-" + "f" * 400 + "-" + "0" * 32) is None  # no 400-digit timestamps
    assert ids.request_minted_at("req-unknown") is None


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_hostile_ids_and_names_are_user_errors(value):
    with pytest.raises(UserError, match="at most 128 characters"):
        ids.check_id(value, "model_id")
    with pytest.raises(UserError, match="at most 128 characters"):
        ids.check_name(value)


def test_names_have_no_colon_and_sessions_must_be_ids():
    assert ids.check_name("step_000010.final-2") == "step_000010.final-2"
    with pytest.raises(UserError, match="checkpoint name"):
        ids.check_name("s:train:0")
    with pytest.raises(UserError, match="session_id"):
        ids.model_id("../escape-session", 0)
    with pytest.raises(UserError, match="model_id"):  # the whole id stays within the limit too
        ids.model_id("s" * 125, 0)


def test_error_messages_stay_short_for_huge_values():
    with pytest.raises(UserError) as failure:
        ids.check_id("x" * 5_000_000)
    assert len(str(failure.value)) < 300 and "5000000 characters" in str(failure.value)
