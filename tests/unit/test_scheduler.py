"""The scheduler: cross-adapter passes, barriers, token budgets, micro-batches, the window."""

import asyncio
import sys
import time

import numpy as np
import pytest

from actors.passes import merge_results
from actors.scheduler import Scheduler, SchedulerLimits
from actors.work import CreateModelWork, Datum, ForwardBackwardResult, ForwardBackwardWork, LoraSpec
from tests.fakes import FakeBackend


class SpyBackend(FakeBackend):
    """Records the (model, datums) of every pass; each pass takes `pass_s` seconds."""

    def __init__(self, pass_s=0.1):
        super().__init__()
        self.passes: list[list[tuple[str, int]]] = []
        self.pass_s = pass_s

    def forward_backward_batch(self, works):
        time.sleep(self.pass_s)
        self.passes.append([(w.model_id, len(w.data)) for w in works])
        return super().forward_backward_batch(works)


def limits(**overrides) -> SchedulerLimits:
    values = dict(
        max_sample_rows=8,
        max_pass_tokens=1000,
        max_pass_adapters=8,
        cross_adapter_batching=True,
        batch_window_s=0.0,
        gap_timeout_s=5.0,
    )
    return SchedulerLimits(**{**values, **overrides})


def make(backend, init_compute_thread=None, **overrides) -> Scheduler:
    for m in "abcd":
        backend.create_model(CreateModelWork(m, LoraSpec(rank=2)))
    return Scheduler(
        backend.forward_backward_batch,
        backend.check_forward_backward,
        backend.sample,
        limits(**overrides),
        init_compute_thread=init_compute_thread,
    )


def fb(model_id, n_datums=1, length=10, seq_id=None, tenant=None):
    """A request of `model_id`; each model is its own tenant unless `tenant` says otherwise."""
    data = [Datum(np.arange(length), {"target_tokens": np.arange(length)}) for _ in range(n_datums)]
    return ForwardBackwardWork(model_id, seq_id, data, "cross_entropy", tenant=tenant or f"tenant-{model_id}")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def burst(scheduler, works, gap_s=0.02):
    """Submit the first request, let it start, then the rest while it runs."""
    first = asyncio.create_task(scheduler.forward_backward(works[0]))
    await asyncio.sleep(gap_s)
    return await asyncio.gather(first, *(scheduler.forward_backward(w) for w in works[1:]))


def test_pending_requests_of_different_adapters_share_one_pass():
    backend = SpyBackend()
    run(burst(make(backend), [fb("a"), fb("b"), fb("c"), fb("d")]))
    assert backend.passes == [[("a", 1)], [("b", 1), ("c", 1), ("d", 1)]]


def test_without_cross_adapter_batching_each_pass_holds_one_adapter():
    backend = SpyBackend()
    run(burst(make(backend, cross_adapter_batching=False), [fb("a"), fb("b"), fb("c"), fb("b")]))
    assert backend.passes == [[("a", 1)], [("b", 1), ("b", 1)], [("c", 1)]]


def test_a_barrier_holds_its_own_model_only():
    backend = SpyBackend()
    scheduler = make(backend)

    async def scenario():
        first = asyncio.create_task(scheduler.forward_backward(fb("a")))
        await asyncio.sleep(0.02)
        queued = [
            scheduler.forward_backward(fb("b", seq_id=1)),
            scheduler.ordered("b", 2, lambda: backend.passes.append([("optim", "b")])),
            scheduler.forward_backward(fb("b", seq_id=3)),
            scheduler.forward_backward(fb("c")),
        ]
        await asyncio.gather(first, *queued)

    run(scenario())
    # c joins b's first request; b's third waits for its optim_step, then runs
    assert backend.passes == [[("a", 1)], [("b", 1), ("c", 1)], [("optim", "b")], [("b", 1)]]


def test_a_huge_request_is_split_and_interleaved_with_other_tenants():
    backend = SpyBackend()
    scheduler = make(backend, max_pass_tokens=100)
    results = run(burst(scheduler, [fb("a"), fb("b", n_datums=12), fb("c", n_datums=2)]))
    # b gets its fair half of the budget first, c its two datums, b the rest of the budget;
    # b's last datums run in the next pass, and its result holds all twelve.
    assert backend.passes == [[("a", 1)], [("b", 8), ("c", 2)], [("b", 4)]]
    assert len(results[1].loss_fn_outputs) == 12


def test_a_tenant_with_many_adapters_gets_one_share_of_a_pass():
    backend = SpyBackend()
    scheduler = make(backend, max_pass_tokens=100)
    works = [fb("a", tenant="x"), *(fb(m, n_datums=10, tenant="x") for m in "abc"), fb("d", n_datums=10, tenant="y")]
    run(burst(scheduler, works))
    # tenant x's three adapters share x's half of the budget; tenant y gets the other half
    assert backend.passes[:2] == [[("a", 1)], [("a", 5), ("d", 5)]]


def test_work_over_a_tenants_quota_waits_its_turn_in_order_and_others_pass_it_by():
    backend = SpyBackend()
    scheduler = make(backend, max_queued_per_tenant=2)
    works = [
        fb("a", seq_id=1, tenant="x"),
        fb("a", seq_id=2, tenant="x"),
        fb("a", seq_id=3, tenant="x"),
        fb("b", tenant="x"),
        fb("b", tenant="x"),
        fb("c", tenant="y"),
    ]
    results = run(burst(scheduler, works))
    assert len(results) == 6 and all(r.metrics["loss:sum"] > 0 for r in results)  # nothing was refused
    assert backend.passes == [[("a", 1)], [("a", 1), ("c", 1), ("a", 1)], [("b", 1), ("b", 1)]]
    assert [c for c in backend.calls if c[:2] == ("forward_backward", "a")] == [
        ("forward_backward", "a", s) for s in (1, 2, 3)
    ]


def test_the_window_lets_an_active_tenant_join_the_pass():
    backend = SpyBackend(pass_s=0.0)
    scheduler = make(backend, batch_window_s=0.3)

    async def scenario():
        await asyncio.gather(scheduler.forward_backward(fb("a")), scheduler.forward_backward(fb("b")))  # both active
        first = asyncio.create_task(scheduler.forward_backward(fb("a")))
        await asyncio.sleep(0.1)
        await asyncio.gather(first, scheduler.forward_backward(fb("b")))

    run(scenario())
    assert backend.passes[-1] == [("a", 1), ("b", 1)]


def test_merge_results_like_the_sdk_merges_chunks():
    parts = [
        ForwardBackwardResult([{"logprobs": np.zeros(2)}], {"loss:sum": 1.0, "frac:mean": 0.5, "x:max": 1.0}),
        ForwardBackwardResult([{"logprobs": np.ones(2)}] * 3, {"loss:sum": 2.0, "frac:mean": 0.1, "x:max": 3.0}),
    ]
    merged = merge_results(parts)
    assert len(merged.loss_fn_outputs) == 4
    assert merged.metrics == pytest.approx({"loss:sum": 3.0, "frac:mean": (0.5 + 0.3) / 4, "x:max": 3.0})


@pytest.mark.parametrize(
    "packed, passes", [(False, [[("a", 1)], [("b", 1), ("c", 1)]]), (True, [[("a", 1), ("b", 1), ("c", 1)]])]
)
def test_a_packed_pass_is_budgeted_by_real_tokens_not_rows_times_the_longest(packed, passes):
    backend = SpyBackend(pass_s=0.0)
    scheduler = make(backend, max_pass_tokens=100, packed_passes=packed)

    async def together():
        return await asyncio.gather(*(scheduler.forward_backward(w) for w in (fb("a", length=60), fb("b"), fb("c"))))

    run(together())
    assert backend.passes == passes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread is Linux's")
def test_the_compute_thread_runs_at_a_lower_priority_than_the_event_loop():
    import os

    loop_nice = os.getpriority(os.PRIO_PROCESS, 0)
    calls = []
    sched = make(FakeBackend(), lambda: calls.append(os.getpriority(os.PRIO_PROCESS, 0)), compute_nice=5)
    compute_nice = run(sched.run_now(lambda: os.getpriority(os.PRIO_PROCESS, 0)))
    assert compute_nice == min(19, loop_nice + 5)
    assert calls == [compute_nice]  # the backend's own set-up runs after, on the lowered thread
    assert os.getpriority(os.PRIO_PROCESS, 0) == loop_nice  # the caller's thread is untouched


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
def test_an_idle_compute_thread_and_the_threads_it_starts_run_under_sched_idle():
    import os
    import threading

    calls = []
    sched = make(FakeBackend(), lambda: calls.append(os.sched_getscheduler(0)), compute_idle=True)

    def policies() -> tuple[int, int]:
        started = []  # a thread the compute thread starts (as torch starts its workers) inherits it
        worker = threading.Thread(target=lambda: started.append(os.sched_getscheduler(0)))
        worker.start()
        worker.join()
        return os.sched_getscheduler(0), started[0]

    assert run(sched.run_now(policies)) == (os.SCHED_IDLE, os.SCHED_IDLE)
    assert calls == [os.SCHED_IDLE]  # the backend's own set-up runs after, on the lowered thread
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's thread is untouched


def test_a_nice_value_with_the_idle_policy_is_refused():
    from pydantic import ValidationError

    from configs.schema import BaseModelConfig

    assert BaseModelConfig(name="m").compute_thread_policy == "normal"
    with pytest.raises(ValidationError, match="compute_thread_nice applies under compute_thread_policy normal"):
        BaseModelConfig(name="m", compute_thread_policy="idle", compute_thread_nice=5)
