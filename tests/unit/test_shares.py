"""Training and sampling share the compute thread: neither starves the other, counted in passes
and decode slices; barriers wait for their sampler's earlier requests, later ones wait for them."""

import asyncio
import time

import pytest

from actors.scheduler import Scheduler
from actors.shares import TimeShares
from actors.work import SampleResult, SampleWork, SamplingParams
from tests.fakes import FakeBackend
from tests.unit.test_scheduler import fb, limits, run


class FakeDecoder:
    """A continuous-batching engine without a model: every admitted request needs `steps` decode
    steps of `step_s` seconds each (all rows step together)."""

    def __init__(self, step_s=0.005, steps=10):
        self.step_s, self.steps = step_s, steps
        self.requests: list[list] = []  # [token, steps left]
        self.inbox: list = []
        self.finished_ids: list[str] = []

    def submit(self, work, token):
        self.inbox.append([token, self.steps, work])

    @property
    def busy(self):
        return bool(self.requests or self.inbox)

    def run(self, seconds):
        start, finished = time.monotonic(), []
        while True:
            self.requests += self.inbox
            self.inbox = []
            time.sleep(self.step_s)
            for request in self.requests:
                request[1] -= 1
            for request in [r for r in self.requests if r[1] <= 0]:
                self.requests.remove(request)
                self.finished_ids.append(request[2].sampler_id)
                finished.append((request[0], SampleResult(sequences=[])))
            if not self.busy or time.monotonic() - start >= seconds:
                return finished


class TimedBackend(FakeBackend):
    def __init__(self, pass_s):
        super().__init__()
        self.pass_s = pass_s
        self.order: list[str] = []

    def forward_backward_batch(self, works):
        time.sleep(self.pass_s)
        self.order += [w.model_id for w in works]
        return super().forward_backward_batch(works)


def scheduler(backend, decoder, share=0.5, slice_s=0.02):
    from actors.work import CreateModelWork, LoraSpec

    for m in "ab":
        backend.create_model(CreateModelWork(m, LoraSpec(rank=2)))
    return Scheduler(
        backend.forward_backward_batch,
        backend.check_forward_backward,
        backend.sample,
        limits(sampling_share=share, decode_slice_s=slice_s, max_pass_tokens=10),  # one request a pass
        decoder=decoder,
    )


def sample(sampler_id="s", tenant="t"):
    return SampleWork(sampler_id, None, [1, 2, 3], params=SamplingParams(max_tokens=4), tenant=tenant)


async def both_streams(sched, train_requests, stop_sampling):
    """Training requests (three in flight, one per pass) while sampling requests keep two in flight."""

    async def sampling():
        pending = set()
        while not stop_sampling.is_set():
            while len(pending) < 2:
                pending.add(asyncio.ensure_future(sched.sample(sample())))
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)

    async def training():
        pending = set()
        for i in range(train_requests):
            pending.add(asyncio.ensure_future(sched.forward_backward(fb("a", seq_id=i + 1))))
            if len(pending) == 3:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)
        stop_sampling.set()

    stop_sampling.clear()
    await asyncio.gather(sampling(), training())


def runs(trace, kind):
    """The longest run of consecutive units of `kind` in the trace, and how many there were."""
    longest = current = 0
    for unit, _ in trace:
        current = current + 1 if unit == kind else 0
        longest = max(longest, current)
    return longest, sum(1 for unit, _ in trace if unit == kind)


@pytest.mark.parametrize("share", [0.5, 0.2, 0.8])
def test_a_stream_of_sampling_cannot_starve_training_nor_the_reverse(share):
    backend, decoder = TimedBackend(pass_s=0.02), FakeDecoder(step_s=0.005, steps=8)
    sched = scheduler(backend, decoder, share=share, slice_s=0.02)
    run(both_streams(sched, 30, asyncio.Event()))
    trace = list(sched.trace)
    longest_sampling, slices = runs(trace, "sample")
    longest_training, passes = runs(trace, "train")
    assert passes == 30
    # Each unit is ~20 ms: between two training passes run about share / (1 - share) slices, and
    # the reverse; two more either way for timing noise (a loaded CI machine).
    assert longest_sampling <= max(1, round(share / (1 - share))) + 2
    assert longest_training <= max(1, round((1 - share) / share)) + 2
    contended = [t for t in trace[: len(trace) - 2]]  # the stream ends with training's last pass
    used = {kind: sum(s for k, s in contended if k == kind) for kind in ("train", "sample")}
    assert used["sample"] / (used["sample"] + used["train"]) == pytest.approx(share, abs=0.2)
    assert slices >= 5 and decoder.finished_ids


def test_a_kind_that_was_idle_banks_no_credit():
    shares = TimeShares({"train": 0.5, "sample": 0.5})
    for _ in range(100):  # training alone for a long time
        assert shares.pick(["train"]) == "train"
        shares.charge("train", 1.0)
    picks = []
    for _ in range(6):  # then both: they alternate at once, sampling does not run 100 s in a row
        kind = shares.pick(["train", "sample"])
        shares.charge(kind, 1.0)
        picks.append(kind)
    assert picks.count("train") == 3 and picks.count("sample") == 3


def test_a_sampler_barrier_waits_for_earlier_samples_and_later_ones_wait_for_it():
    backend, decoder = TimedBackend(pass_s=0.0), FakeDecoder(step_s=0.01, steps=5)
    sched = scheduler(backend, decoder)
    events = []

    async def scenario():
        first = asyncio.ensure_future(sched.sample(sample("s")))
        await asyncio.sleep(0.005)

        def remove():
            events.append(("barrier", list(decoder.finished_ids)))

        barrier = asyncio.ensure_future(sched.ordered("s", None, remove))
        later = asyncio.ensure_future(sched.sample(sample("s")))
        other = asyncio.ensure_future(sched.sample(sample("other")))
        await asyncio.gather(first, barrier, later, other)

    run(scenario())
    ((_, finished_before_barrier),) = events
    assert finished_before_barrier.count("s") == 1  # the first sample, not the later one
    assert decoder.finished_ids.count("s") == 2


def test_a_barrier_waiting_for_its_samples_does_not_hold_up_other_models():
    backend, decoder = TimedBackend(pass_s=0.0), FakeDecoder(step_s=0.01, steps=30)
    sched = scheduler(backend, decoder)
    done = []

    async def scenario():
        sampling = asyncio.ensure_future(sched.sample(sample("a")))
        await asyncio.sleep(0.01)
        barrier = asyncio.ensure_future(sched.ordered("a", None, lambda: done.append(list(decoder.finished_ids))))
        other = asyncio.ensure_future(sched.forward_backward(fb("b")))
        await other
        assert not sampling.done() and not barrier.done()  # b's pass did not wait for them
        await asyncio.gather(sampling, barrier)

    run(scenario())
    assert done == [["a"]]  # the barrier ran after the sample it waited for


def test_barriers_and_samples_of_an_id_keep_their_submission_order():
    """B1, S, B2 of one id: S runs after B1 and before B2, though B2 is queued when B1 ends."""
    backend, decoder = TimedBackend(pass_s=0.0), FakeDecoder(step_s=0.005, steps=3)
    sched = scheduler(backend, decoder)
    log = []
    submit = decoder.submit
    decoder.submit = lambda work, token: (log.append("S starts"), submit(work, token))

    def barrier(name):
        def fn():
            time.sleep(0.03)
            log.append(name)

        return fn

    async def scenario():
        b0 = asyncio.ensure_future(sched.ordered("b", None, barrier("B0")))  # keeps the thread busy
        await asyncio.sleep(0.005)
        b1 = asyncio.ensure_future(sched.ordered("a", None, barrier("B1")))
        s = asyncio.ensure_future(sched.sample(sample("a")))
        b2 = asyncio.ensure_future(sched.ordered("a", None, barrier("B2")))
        await asyncio.gather(b0, b1, s, b2)

    run(scenario())
    assert log == ["B0", "B1", "S starts", "B2"]


def test_a_sample_waiting_in_its_tenants_backlog_still_goes_before_a_later_barrier():
    backend, decoder = TimedBackend(pass_s=0.0), FakeDecoder(step_s=0.01, steps=5)
    from actors.work import CreateModelWork, LoraSpec

    for m in "ab":
        backend.create_model(CreateModelWork(m, LoraSpec(rank=2)))
    sched = Scheduler(
        backend.forward_backward_batch,
        backend.check_forward_backward,
        backend.sample,
        limits(max_queued_per_tenant=1),
        decoder=decoder,
    )
    log = []

    async def scenario():
        first = asyncio.ensure_future(sched.sample(sample("other", tenant="T")))  # fills T's quota
        await asyncio.sleep(0.005)
        backlogged = asyncio.ensure_future(sched.sample(sample("a", tenant="T")))
        barrier = asyncio.ensure_future(sched.ordered("a", None, lambda: log.append(list(decoder.finished_ids))))
        await asyncio.gather(first, backlogged, barrier)

    run(scenario())
    assert log == [["other", "a"]]  # the barrier ran after the backlogged sample


def test_a_job_reported_twice_is_answered_once_and_the_scheduler_goes_on():
    class TwiceDecoder(FakeDecoder):
        def run(self, seconds):
            finished = super().run(seconds)
            return finished + finished

    backend = TimedBackend(pass_s=0.0)
    sched = scheduler(backend, TwiceDecoder(step_s=0.001, steps=2))

    async def scenario():
        first = await sched.sample(sample("a"))
        second = await sched.sample(sample("a"))
        return first, second

    first, second = run(scenario())
    assert isinstance(first, SampleResult) and isinstance(second, SampleResult)


def test_short_training_units_in_a_row_take_one_turn_of_the_shares_not_one_each():
    """The optimizer steps of six adapters, queued together while sampling keeps waiting, run as
    one training turn (within one slice), not six turns each behind a decode slice."""
    backend, decoder = TimedBackend(pass_s=0.02), FakeDecoder(step_s=0.005, steps=40)
    sched = scheduler(backend, decoder, slice_s=0.05)
    ran = []

    def optimizer_step(model_id):
        def step():
            time.sleep(0.002)
            ran.append(model_id)
            return model_id

        return step

    async def go():
        sampling = asyncio.ensure_future(sched.sample(sample()))
        await asyncio.sleep(0.03)  # the decoder is busy: sampling waits for every turn it can get
        models = list("abcdef")
        assert await asyncio.gather(*(sched.ordered(m, None, optimizer_step(m)) for m in models)) == models
        await sampling

    run(go())
    assert ran == list("abcdef")
    assert runs(list(sched.trace), "train") == (1, 1)
