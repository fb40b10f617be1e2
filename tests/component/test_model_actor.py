"""The model actor's ordering, de-duplication and error handling, over a fake backend."""

import asyncio
import os
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

from actors.model_actor import ModelActor
from actors.work import (
    AdamParams,
    CreateModelWork,
    Datum,
    ForwardBackwardWork,
    LoraSpec,
    OptimStepWork,
    SampleResult,
    SampleWork,
)
from configs.errors import LimitExceededError, ServerError, UserError
from configs.schema import BaseModelConfig
from tests.fakes import FakeBackend


def make_actor(gap_timeout_s=5.0, **config):

    config = BaseModelConfig(name="fake", seq_gap_timeout_s=gap_timeout_s, **config)
    return ModelActor(config, tempfile.mkdtemp(), tempfile.mkdtemp(), backend_factory=FakeBackend)


def fb(seq_id, loss_fn="cross_entropy", **config):
    data = [Datum(np.arange(3), {"target_tokens": np.arange(3)})]
    return ForwardBackwardWork("m", seq_id, data, loss_fn, config)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def created(actor):
    await actor.create_model(CreateModelWork("m", LoraSpec(rank=2)))
    return actor


def test_forward_backward_runs_in_seq_order_even_when_submitted_out_of_order():
    async def scenario():
        actor = await created(make_actor())
        later = asyncio.create_task(actor.optim_step(OptimStepWork("m", 2, AdamParams())))
        await asyncio.sleep(0.05)
        assert actor._backend.calls == [("create_model", "m", 0)]  # seq 2 waits for seq 1
        await actor.forward_backward(fb(1))
        await later
        return actor._backend.calls

    assert run(scenario()) == [("create_model", "m", 0), ("forward_backward", "m", 1), ("optim_step", "m", 2)]


def test_retried_submission_runs_once_and_both_get_the_result():
    async def scenario():
        actor = await created(make_actor())
        first, second = await asyncio.gather(actor.forward_backward(fb(1)), actor.forward_backward(fb(1)))
        retried_later = await actor.forward_backward(fb(1))
        return actor._backend.calls, first, second, retried_later

    calls, first, second, later = run(scenario())
    assert calls.count(("forward_backward", "m", 1)) == 1
    assert first is second is later


def test_skipped_seq_does_not_hold_later_requests():
    async def scenario():
        actor = await created(make_actor())
        later = asyncio.create_task(actor.forward_backward(fb(2)))
        await asyncio.sleep(0.05)
        await actor.skip("m", 1)
        await later
        return actor._backend.calls

    assert run(scenario())[-1] == ("forward_backward", "m", 2)


def test_missing_seq_is_given_up_after_the_gap_timeout():
    async def scenario():
        actor = await created(make_actor(gap_timeout_s=0.2))
        loop = asyncio.get_running_loop()
        start = loop.time()
        await actor.forward_backward(fb(2))
        return loop.time() - start

    assert 0.15 <= run(scenario()) < 5


def test_failures_keep_their_category_and_the_actor_keeps_serving():
    async def scenario():
        actor = await created(make_actor())
        with pytest.raises(UserError):
            await actor.forward_backward(fb(1, "fake_user_error"))
        with pytest.raises(ServerError, match="fake crash"):
            await actor.forward_backward(fb(2, "fake_crash"))
        return await actor.forward_backward(fb(3))

    assert run(scenario()).metrics["loss:sum"] > 0


def test_create_model_is_idempotent_and_release_session_unloads():
    async def scenario():
        actor = make_actor()
        await actor.create_model(CreateModelWork("s1:train:0", LoraSpec(rank=2)))
        await actor.create_model(CreateModelWork("s1:train:0", LoraSpec(rank=2)))
        await actor.create_model(CreateModelWork("s2:train:0", LoraSpec(rank=2)))
        released = await actor.release_session("s1")
        return released, await actor.has_model("s1:train:0"), await actor.has_model("s2:train:0")

    assert run(scenario()) == (["s1:train:0"], False, True)


def test_custom_losses_named_in_the_config_are_registered_in_the_actor(tiny_model_dir, checkpoint_root):
    from losses import unregister_custom_loss

    config = BaseModelConfig(name="tiny", source=str(tiny_model_dir), custom_losses=["tests.custom_loss_example"])

    async def scenario():
        actor = ModelActor(config, tempfile.mkdtemp(), checkpoint_root)
        await actor.create_model(CreateModelWork("m", LoraSpec(rank=2, seed=0)))
        data = [Datum(np.arange(5), {"target_tokens": np.arange(1, 6), "weights": np.ones(5, np.float32)})]
        plain = await actor.forward_backward(ForwardBackwardWork("m", 1, data, "cross_entropy", forward_only=True))
        custom = await actor.forward_backward(
            ForwardBackwardWork("m", 2, data, "weighted_squared_logprob", {"scale": 2.0})
        )
        return plain, custom

    unregister_custom_loss("weighted_squared_logprob")  # so that the actor is what registers it
    sys.modules.pop("tests.custom_loss_example", None)
    plain, custom = run(scenario())
    expected = 2.0 * float((plain.loss_fn_outputs[0]["logprobs"].astype(np.float64) ** 2).sum())
    assert custom.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    assert custom.metrics["custom/squares:sum"] == 1.0


def test_sampling_requests_pending_together_run_as_one_batch():
    class SpyBackend(FakeBackend):
        def __init__(self, *args):
            super().__init__(*args)
            self.sample_batches = []
            self.sampling = threading.Event()

        def list_samplers(self):
            return ["s1", "s2"]

        def sample(self, works):
            self.sampling.set()
            time.sleep(0.2)  # the first batch runs while the others queue up
            self.sample_batches.append(sorted(w.sampler_id for w in works))
            return [SampleResult([]) for _ in works]

    async def scenario():

        actor = ModelActor(
            BaseModelConfig(name="fake"), tempfile.mkdtemp(), tempfile.mkdtemp(), backend_factory=SpyBackend
        )
        works = [SampleWork(s, i, np.arange(3)) for i, s in enumerate(["s1", "s2", "s1", "s2", "s1"])]
        first = asyncio.create_task(actor.sample(works[0]))
        while not actor._backend.sampling.is_set():  # the first batch is on the compute thread
            await asyncio.sleep(0.01)
        await asyncio.gather(first, *(actor.sample(w) for w in works[1:]))
        again = await actor.sample(works[1])  # a retried (sampler, seq_id) is answered, not re-run
        return actor._backend.sample_batches, again

    batches, again = run(scenario())
    assert batches == [["s1"], ["s1", "s1", "s2", "s2"]]
    assert isinstance(again, SampleResult)


def test_compute_thread_gets_the_backends_thread_settings():
    async def scenario():
        actor = await created(make_actor())
        await actor.forward_backward(fb(1))
        return actor._backend.compute_thread_inits

    assert [name.startswith("thinker-compute") for name in run(scenario())] == [True]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
@pytest.mark.parametrize(
    ("policy", "expected"), [({}, "SCHED_OTHER"), ({"compute_thread_policy": "idle"}, "SCHED_IDLE")]
)
def test_the_compute_thread_runs_under_sched_idle_when_configured(policy, expected):
    async def scenario():
        actor = await created(make_actor(**policy))
        await actor.forward_backward(fb(1))
        return actor._backend.compute_thread_policies

    assert run(scenario()) == [getattr(os, expected)]


def test_too_many_adapters_is_a_user_error_naming_the_limit():
    async def scenario():
        actor = make_actor(max_adapters=3)
        for i in range(3):
            await actor.create_model(CreateModelWork(f"m{i}", LoraSpec(rank=2)))
        with pytest.raises(LimitExceededError, match=r"max_adapters = 3"):
            await actor.create_model(CreateModelWork("m3", LoraSpec(rank=2)))
        await actor.create_model(CreateModelWork("m0", LoraSpec(rank=2)))  # a retried create still answers
        await actor.unload_model("m0")
        await actor.create_model(CreateModelWork("m4", LoraSpec(rank=2)))
        return sorted(actor._backend.models)

    assert run(scenario()) == ["m1", "m2", "m4"]


def test_a_request_with_no_datums_fails_alone_and_never_wedges_the_actor():
    async def scenario():
        actor = await created(make_actor())
        await actor.create_model(CreateModelWork("other", LoraSpec(rank=2)))
        empty = ForwardBackwardWork("m", 1, [], "cross_entropy")
        fine = ForwardBackwardWork("other", 1, fb(1).data, "cross_entropy")
        outcomes = await asyncio.gather(
            actor.forward_backward(empty), actor.forward_backward(fine), return_exceptions=True
        )
        after = await actor.forward_backward(fb(2))  # the same model's next request runs too
        return outcomes, after

    (failed, passed), after = run(scenario())
    assert isinstance(failed, UserError) and "at least one datum" in str(failed)
    assert passed.metrics["loss:sum"] > 0 and after.metrics["loss:sum"] > 0


def test_tokens_trained_and_sampled_are_counted_per_tenant():
    from actors.metadata.database import Database, default_url
    from actors.metadata.registry import Registry
    from actors.metadata.tenants import Tenants

    cache = tempfile.mkdtemp()
    database = Database(default_url(cache))
    database.migrate()
    tenants = Tenants(database, "open")
    alice, bob = tenants.authenticate("tml-alice"), tenants.authenticate("tml-bob")
    actor = ModelActor(BaseModelConfig(name="fake"), cache, tempfile.mkdtemp(), backend_factory=FakeBackend)

    async def scenario():
        await actor.create_model(CreateModelWork("s:train:0", LoraSpec(rank=2), tenant=alice))
        data = [Datum(np.arange(n), {"target_tokens": np.arange(n)}) for n in (3, 4)]
        await actor.forward_backward(ForwardBackwardWork("s:train:0", 1, data, "cross_entropy", tenant=alice))
        await actor.sample(SampleWork("fake", None, np.arange(3), tenant=bob))
        await asyncio.sleep(0.5)  # the usage writes do not hold up the answers

    run(scenario())
    registry = Registry(database)
    assert registry.usage(alice)["tokens_trained"] == 7 and registry.usage(bob)["tokens_trained"] == 0
