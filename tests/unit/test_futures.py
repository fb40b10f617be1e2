"""Futures: their records in the metadata database and a model deployment's outcomes."""

import asyncio
import time

import pytest

from actors.ids import new_request_id, request_minted_at
from actors.metadata.database import Database
from actors.metadata.futures import FutureRecords, LoggedCall, outcome_of
from actors.metadata.tables import utc_now
from actors.metadata.tenants import Tenants
from actors.outcomes import Outcomes
from configs.errors import NotFoundError, UserError


@pytest.fixture
def records(database_url):
    db = Database(database_url)
    db.migrate()
    tenants = Tenants(db, "open")
    tenants.authenticate("tml-alice"), tenants.authenticate("tml-bob")
    yield FutureRecords(db, ttl_s=2.0), tenants.authenticate("tml-alice"), tenants.authenticate("tml-bob")
    db.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_records_hold_outcomes_for_their_owner_until_the_ttl(records):
    futures, alice, bob = records
    done, failed = new_request_id(), new_request_id()
    futures.add(done, alice, "optim_step", "base", {"path": "x"})
    assert futures.get(alice, done).status == "pending"
    assert futures.finish(done, {"loss": 1.5})
    futures.add_failed(failed, alice, "forward_backward", UserError("bad datum"))
    assert outcome_of(futures.get(alice, done)) == (True, {"loss": 1.5})
    stored, error = outcome_of(futures.get(alice, failed))
    assert stored and isinstance(error, UserError) and str(error) == "bad datum"
    with pytest.raises(NotFoundError) as foreign:
        futures.get(bob, done)
    with pytest.raises(NotFoundError) as unknown:
        futures.get(bob, new_request_id())
    assert str(foreign.value).split("'")[0] == str(unknown.value).split("'")[0]
    time.sleep(2.1)
    with pytest.raises(NotFoundError):
        futures.get(alice, done)
    assert futures.expire() == 2


def test_an_outcome_too_large_to_store_stays_with_the_deployment(records, monkeypatch):
    futures, alice, _ = records
    monkeypatch.setattr("actors.metadata.futures.MAX_STORED_OUTCOME", 10)
    request_id = new_request_id()
    futures.add(request_id, alice, "sample", "base", {})
    assert not futures.finish(request_id, b"x" * 100)
    record = futures.get(alice, request_id)
    assert record.status == "done" and outcome_of(record) == (False, None)


def test_a_deployment_keeps_outcomes_and_long_polls_them(records):
    futures, alice, _ = records
    outcomes = Outcomes(futures, ttl_s=60)

    async def scenario():
        ok, bad = new_request_id(), new_request_id()
        for request_id in (ok, bad):
            futures.add(request_id, alice, "optim_step", "base", {})

        async def slow(value):
            await asyncio.sleep(0.3)
            return value

        async def broken():
            raise UserError("no")

        running = asyncio.create_task(outcomes.track(ok, slow(7)))
        await asyncio.sleep(0.01)
        pending = await outcomes.wait(ok, 0.05)
        done = await outcomes.wait(ok, 5)
        with pytest.raises(UserError):
            await outcomes.track(bad, broken())
        failed = await outcomes.wait(bad, 1)
        await running
        await asyncio.sleep(0.2)  # the records are written in a worker thread
        return pending, done, failed, await outcomes.wait(new_request_id(), 1), ok, bad

    pending, done, (state, error), unknown, ok, bad = run(scenario())
    outcomes_started = unknown[1]
    assert (
        pending == ("pending", None)
        and done == ("done", 7)
        and unknown == ("unknown", outcomes_started)
        and outcomes_started.tzinfo is not None
    )
    assert state == "failed" and isinstance(error, UserError)
    assert outcome_of(futures.get(alice, ok)) == (True, 7)
    assert futures.get(alice, bad).status == "failed"


def test_request_ids_carry_their_mint_time():
    assert abs(request_minted_at(new_request_id()) - time.time()) < 5


def test_the_request_log_lives_until_its_snapshot_or_unload_however_old(records):
    """A logged request's payload outlives the TTL until the durable snapshot that covers it is
    named (then the record ages out like any other), so a replay never misses a step of an idle
    model; an unsequenced request is covered by id (it ran before the snapshot), never by clock."""
    futures, alice, _ = records
    logged = {}
    for seq_id in range(1, 6):
        logged[seq_id] = new_request_id()
        call = LoggedCall("run-a", seq_id, "forward_backward", (seq_id,))
        futures.add(logged[seq_id], alice, "forward_backward", "base", {}, call)
    ran, queued = new_request_id(), new_request_id()  # unsequenced (simple routes)
    for request_id, arg in ((ran, "r"), (queued, "q")):
        call = LoggedCall("run-a", None, "chat_forward_backward", (arg,))
        futures.add(request_id, alice, "forward_backward", "base", {}, call)
    other = new_request_id()
    futures.add(other, alice, "optim_step", "base", {}, LoggedCall("run-b", 1, "optim_step", (1,)))
    time.sleep(2.1)  # past the TTL: the records are answered as unknown, but the log is kept
    assert futures.expire() == 0
    everything = [(1,), (2,), (3,), (4,), (5,), ("r",), ("q",)]
    assert [args for _, _, _, args in futures.log("run-a", None, None)] == everything

    futures.name_snapshot("run-a", 3, utc_now(), [ran])  # a snapshot after seq 3 that holds `ran`
    assert [args for _, _, _, args in futures.log("run-a", 3, utc_now())] == [(4,), (5,), ("q",)]
    assert futures.expire() == 4  # the covered records, old enough, go
    assert futures.trim_log("run-a") == 3  # unloaded
    assert futures.expire() == 3
    assert [args for _, _, _, args in futures.log("run-b", None, None)] == [(1,)]  # another model's, untouched


def test_sample_completions_are_numbered_per_target_in_commit_order(records):
    """retrieve_futures' cursor: each target's completions 1, 2, ... in the order they finished, a
    sample finished twice (a replay) keeps its number, and another tenant or target sees none."""
    futures, alice, bob = records
    a1, a2, a3, b1 = (new_request_id() for _ in range(4))
    for request_id, target in ((a1, "s:sample:0#0"), (a2, "s:sample:0#0"), (a3, "s:sample:0#1"), (b1, "s:sample:0#0")):
        futures.add(request_id, bob if request_id == b1 else alice, "sample", "base", {}, None, target)
    futures.finish(a2, {"tokens": [1]})
    futures.finish(a1, UserError("bad prompt"))
    futures.finish(a3, {"tokens": [2]})
    futures.finish(a2, {"tokens": [1]})  # again: keeps its place
    assert futures.completions(alice, "s:sample:0#0", 0) == [(1, a2, "done"), (2, a1, "failed")]
    assert futures.completions(alice, "s:sample:0#0", 1) == [(2, a1, "failed")]
    assert futures.completions(alice, "s:sample:0#1", 0) == [(1, a3, "done")]
    assert futures.completions(bob, "s:sample:0#0", 0) == []  # Bob's sample is still pending
    futures.finish(b1, {"tokens": []})
    assert futures.completions(bob, "s:sample:0#0", 0) == [(3, b1, "done")]
    assert futures.completions(alice, "s:sample:0#0", 2) == []  # Alice's target shows nothing of Bob's
    assert [r.id for r in futures.pending_samples(alice, "s:sample:0#0", utc_now())] == []


class _Deployment:
    """A model deployment's wait_result, as Futures calls it (handle.wait_result.remote(...))."""

    def __init__(self, outcomes: dict, started_at):
        self.outcomes, self.started_at = outcomes, started_at
        self.wait_result = self  # handle.wait_result.remote(...)

    async def remote(self, request_id, timeout_s):
        return self.outcomes.get(request_id, ("unknown", self.started_at))


def test_a_poller_is_never_left_waiting_on_a_lost_sample(records, monkeypatch):
    """retrieve_futures' long-poll ends empty: the target's older pending samples are settled from
    their deployment (an outcome it holds but the record missed) or failed as lost in a restart."""
    from datetime import timedelta

    from deployments import futures as ingress_futures

    monkeypatch.setattr(ingress_futures, "LOST_AFTER", timedelta(0))
    futures, alice, _ = records
    done, lost, running = new_request_id(), new_request_id(), new_request_id()
    for request_id in (done, lost, running):
        futures.add(request_id, alice, "sample", "base", {}, None, "s:sample:0#0")
    deployment = _Deployment({done: ("done", {"tokens": [1]}), running: ("pending", None)}, utc_now())
    ingress = ingress_futures.Futures(futures, lambda base: deployment)
    found = run(ingress.completions(alice, "s:sample:0#0", 0, 0.0))
    assert sorted((request_id, status) for _, request_id, status in found) == sorted([(done, "done"), (lost, "failed")])
    stored, error = outcome_of(futures.get(alice, lost))
    assert stored and "lost" in str(error)
    assert futures.get(alice, running).status == "pending"
