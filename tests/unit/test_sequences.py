"""Sampled sequences for stable_reinforce: records, provenance checks, ownership and expiry."""

from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import update

from actors.metadata.database import Database
from actors.metadata.sequences import SampledSequences, Span
from actors.metadata.tables import SampledSequenceRecord, utc_now
from actors.metadata.tenants import Tenants
from actors.work import Datum
from configs.errors import UserError

PROMPT = np.array([5, 9, 14, 3])
TOKENS = np.array([7, 8, 2])
LOGPROBS = np.array([-0.5, -1.25, -2.0], np.float32)


@pytest.fixture
def store(database_url):
    db = Database(database_url)
    db.migrate()
    tenants = Tenants(db, "open")
    alice, bob = tenants.authenticate("tml-alice"), tenants.authenticate("tml-bob")
    sequences = SampledSequences(db)
    (sid,) = sequences.record(alice, "sess-a", "req-1", PROMPT, [(TOKENS, LOGPROBS)])
    yield sequences, db, alice, bob, sid
    db.close()


def cookbook_datum(advantage=1.0, **inputs) -> Datum:
    targets = np.concatenate([PROMPT[1:], TOKENS])
    base = {"target_tokens": targets, "advantages": np.array([0, 0, 0] + [advantage] * 3, np.float32)}
    return Datum(np.concatenate([PROMPT, TOKENS[:-1]]), {**base, **inputs})


def spans(sid, sampled_offset=0):
    return (
        [Span("prompt", sid, 0, 4), Span("sampled", sid, sampled_offset, 2)],
        [Span("prompt", sid, 1, 3), Span("sampled", sid, 0, 3)],
    )


def test_resolve_fills_the_recorded_logprobs_on_sampled_targets_only(store):
    sequences, _, alice, _, sid = store
    d = cookbook_datum()
    sequences.resolve(alice, "sess-a", [d], [spans(sid)])
    np.testing.assert_array_equal(d.loss_fn_inputs["sampler_logprobs"], [0, 0, 0, -0.5, -1.25, -2.0])
    np.testing.assert_array_equal(d.loss_fn_inputs["sampled_mask"], [0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize(
    "tenant, session, datum, datum_spans, message",
    [
        ("alice", "sess-a", cookbook_datum(sampler_logprobs=np.zeros(6)), "ok", "filled in by the server"),
        ("alice", "sess-a", cookbook_datum(), None, "needs provenance spans"),
        ("alice", "sess-b", cookbook_datum(), "ok", "unknown sequence id"),
        ("bob", "sess-a", cookbook_datum(), "ok", "unknown sequence id"),
        ("alice", "sess-a", cookbook_datum(), "shifted", "tokens differ"),
        ("alice", "sess-a", cookbook_datum(), "short", "cover 5 positions but the field has 6"),
        ("alice", "sess-a", cookbook_datum(), "past-end", "which has 3"),
        ("alice", "sess-a", cookbook_datum(), "negative", "negative"),
    ],
)
def test_resolve_refuses_what_the_records_do_not_back(store, tenant, session, datum, datum_spans, message):
    sequences, _, alice, bob, sid = store
    choices = {
        "ok": spans(sid),
        None: None,
        "shifted": spans(sid, sampled_offset=1),
        "short": (spans(sid)[0], [Span("prompt", sid, 1, 3), Span("sampled", sid, 0, 2)]),
        "past-end": (spans(sid)[0], [Span("prompt", sid, 1, 3), Span("sampled", sid, 1, 3)]),
        "negative": (spans(sid)[0], [Span("prompt", sid, 1, 3), Span("sampled", sid, -1, 3)]),
    }
    with pytest.raises(UserError, match=message):
        sequences.resolve({"alice": alice, "bob": bob}[tenant], session, [datum], [choices[datum_spans]])


def test_advantages_outside_sampled_tokens_are_refused(store):
    sequences, _, alice, _, sid = store
    d = cookbook_datum()
    d.loss_fn_inputs["advantages"][1] = 0.5
    with pytest.raises(UserError, match="position 1 is nonzero"):
        sequences.resolve(alice, "sess-a", [d], [spans(sid)])


def test_a_record_lives_a_day_from_its_last_use(store):
    sequences, db, alice, _, sid = store
    with db.transaction() as session:
        session.execute(update(SampledSequenceRecord).values(last_used_at=utc_now() - timedelta(hours=23)))
    sequences.resolve(alice, "sess-a", [cookbook_datum()], [spans(sid)])  # used: a new day starts
    assert sequences.expire() == 0
    with db.transaction() as session:
        session.execute(update(SampledSequenceRecord).values(last_used_at=utc_now() - timedelta(days=1, seconds=1)))
    with pytest.raises(UserError, match="unknown sequence id"):
        sequences.resolve(alice, "sess-a", [cookbook_datum()], [spans(sid)])
    assert sequences.expire() == 1
