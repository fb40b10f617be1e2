"""The model actor's scheduler: what runs next on its single compute thread.

- Training requests are released in each model's seq_id order (`Sequencer`, with gap timeouts
  and holes filled by `skip`).
- forward / forward_backward requests of different adapters pending together run as one
  base-model pass (`PassPlanner` decides which), packed by padded tokens up to `max_pass_tokens`.
  A request bigger than its share is split into micro-batches across passes, so one tenant's
  huge batch cannot starve the others; its result is merged when its last part is done.
- Any other training request (optim_step, save, load, ...) is a barrier for its own model:
  it runs alone, after that model's earlier requests and before its later ones.
- Sampling: with a `decoder` (continuous batching, `actors.decoding`), requests join its running
  batch and the scheduler runs it in slices of decode steps (`decode_slice_s`); without one,
  requests pending together (up to `max_rows` sequences) run as one batched generation.
- Training work and sampling share the compute thread by weighted time shares (`actors.shares`,
  `sampling_share`): while both wait, each gets its share, to within one pass or one slice.
  Short training units waiting in a row (the optimizer steps of many adapters after their pass)
  run together for up to one slice: one turn of the shares, not one turn each.
- Barriers and sampling requests of one id keep their submission order (`actors.id_order`): a
  barrier waits for the id's earlier samples, a sample for its earlier barriers (it is parked
  meanwhile); training work of other models goes on past a waiting barrier.
- Per tenant, at most `max_queued_per_tenant` forward / sampling requests and
  `max_tokens_per_tenant` of their tokens are queued or running; more of that tenant's work waits
  in its own backlog (in order, with the later requests of the models it holds back) and is
  admitted as earlier work finishes. Nothing is refused for it, and other tenants pass it by.
- A retried submission (same (model, seq_id) or (sampler, seq_id)) awaits the first one's
  result instead of running twice.
- NOTE: every job runs on the one compute thread, so the backend needs no locks; the event loop
  only queues, orders and answers. Unexpected exceptions become ServerError; the loop never dies.
- With `metrics`, each pass's size is recorded; `waiting` is the queue depth the model actor reports.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from actors.id_order import IdOrder
from actors.metrics import ModelMetrics
from actors.passes import PassPlanner, merge_results, run_train_pass
from actors.sequencer import Sequencer
from actors.shares import TimeShares
from actors.work import ForwardBackwardResult, ForwardBackwardWork, SampleResult, SampleWork
from configs.errors import ServerError, ThinkerError, UserError

logger = logging.getLogger(__name__)

DEDUPE_WINDOW = 4096  # results remembered for retried submissions


@dataclass
class _Job:
    future: asyncio.Future
    model_id: str | None = None
    fn: Callable[[], Any] | None = None  # a unit of compute (a barrier for its model)
    sample: SampleWork | None = None  # or a sampling request, batched with its neighbours
    train: ForwardBackwardWork | None = None  # or a forward/forward_backward, batched across adapters
    ticket: int | None = None  # its place among its id's barriers and samples (actors.id_order)
    started: bool = False  # a sampling job handed to the decoder or the static batch
    done_datums: int = 0  # datums already run in earlier micro-batches
    parts: list[ForwardBackwardResult] = field(default_factory=list)

    @property
    def tenant(self) -> str | None:
        work = self.train or self.sample
        return work.tenant if work is not None else None

    @property
    def tokens(self) -> int:
        if self.train is not None:
            return sum(int(d.tokens.shape[0]) for d in self.train.data)
        if self.sample is not None:
            return int(len(self.sample.prompt)) * self.sample.num_samples
        return 0


@dataclass(frozen=True)
class SchedulerLimits:
    max_sample_rows: int
    max_pass_tokens: int
    max_pass_adapters: int
    cross_adapter_batching: bool
    batch_window_s: float
    gap_timeout_s: float
    max_queued_per_tenant: int = 1_000_000
    max_tokens_per_tenant: int = 1 << 62
    sampling_share: float = 0.5
    decode_slice_s: float = 0.05
    compute_nice: int = 0  # the compute thread's (and its torch workers') nice increment
    compute_idle: bool = False  # the compute thread (and its torch workers) under SCHED_IDLE instead
    packed_passes: bool = False  # the backend's passes cost their real tokens (no padding)


class Scheduler:
    """Orders, batches and de-duplicates a model actor's work, and runs it on one compute thread.
    Each training model's requests run in seq_id order; a retried (model, seq_id) runs once; a
    failing job fails only its own future; the dispatch loop never dies."""

    def __init__(
        self,
        train_batch: Callable[[list[ForwardBackwardWork]], list[ForwardBackwardResult | Exception]],
        check_train: Callable[[ForwardBackwardWork], None],
        sample_batch: Callable[[list[SampleWork]], list[SampleResult | Exception]],
        limits: SchedulerLimits,
        init_compute_thread: Callable[[], None] | None = None,
        metrics: ModelMetrics | None = None,
        decoder: Any = None,
    ):
        self._train_batch = train_batch
        self._check_train = check_train
        self._sample_batch = sample_batch
        self._limits = limits
        self._planner = PassPlanner(
            limits.max_pass_tokens, limits.max_pass_adapters, limits.cross_adapter_batching, limits.packed_passes
        )
        self._compute = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="thinker-compute",
            initializer=partial(_init_compute_thread, limits.compute_nice, limits.compute_idle, init_compute_thread),
        )
        self._sequencer: Sequencer[_Job] = Sequencer(limits.gap_timeout_s)
        self._seen: OrderedDict[tuple[str, int], asyncio.Future] = OrderedDict()
        self._jobs: deque[_Job] = deque()  # training work and barriers, in order
        self._samples: deque[_Job] = deque()  # sampling requests for a static batch (no decoder)
        self._decoder = decoder  # actors.decoding.DecodeEngine, or None
        self._order = IdOrder()
        self._parked: list[_Job] = []  # sampling jobs waiting for an earlier barrier of their sampler
        self._sampling = 0  # sampling jobs started and not settled
        self._shares = TimeShares({"train": 1 - limits.sampling_share, "sample": limits.sampling_share})
        self.trace: deque[tuple[str, float]] = deque(maxlen=10_000)  # (kind, seconds) of each unit run
        self._last_done: dict[str, float] = {}  # model id -> when its last request finished
        self._last_seq: dict[str, int] = {}  # model id -> the highest seq_id submitted or skipped
        self._admitted: dict[str, list[int]] = {}  # tenant -> [requests, tokens] queued or running
        self._backlog: dict[str, deque[_Job]] = {}  # tenant -> its jobs waiting for room in its quota
        self._held: dict[str, str] = {}  # model id -> tenant, while that model has jobs in a backlog
        self._job_added: asyncio.Event | None = None
        self._gap_changed: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._metrics = metrics
        self._open = 0  # requests submitted (retries aside) and not settled
        self._running = 0  # of those, the ones on the compute thread now

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet running: queued, or held for seq order or a tenant's quota."""
        return self._open - self._running

    # ---- submitting ------------------------------------------------------------------------------

    async def ordered(self, model_id: str, seq_id: int | None, fn: Callable[[], Any]) -> Any:
        """Run fn alone, in model_id's seq_id order (seq_id None: in arrival order); its result."""
        return await self._submit(model_id, seq_id, _Job(self._new_future(), model_id=model_id, fn=fn))

    async def forward_backward(self, work: ForwardBackwardWork) -> ForwardBackwardResult:
        """A forward(_backward) in seq_id order, in a pass with whatever else is pending."""
        return await self._submit(
            work.model_id, work.seq_id, _Job(self._new_future(), model_id=work.model_id, train=work)
        )

    async def sample(self, work: SampleWork) -> SampleResult:
        self._start()
        # NOTE: a base model's name is every tenant's sampler id: the tenant belongs in the key
        key = (f"sample:{work.tenant}:{work.sampler_id}", work.seq_id) if work.seq_id is not None else None
        if key is not None and key in self._seen:
            return await asyncio.shield(self._seen[key])
        job = _Job(self._new_future(), sample=work)
        job.ticket = self._order.sample(work.sampler_id)
        self._remember(key, job.future)
        self._open += 1
        self._enqueue(job)
        return await asyncio.shield(job.future)

    async def run_now(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the compute thread, outside the queues (for quick reads such as tokenizing)."""
        outcome = await _run(asyncio.get_running_loop(), self._compute, fn)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def skip(self, model_id: str, seq_id: int) -> None:
        """`seq_id` will never arrive (the ingress rejected it): later ones must not wait for it."""
        self._start()
        self.note_seq(model_id, seq_id)
        for job in self._sequencer.skip(model_id, seq_id):
            self._enqueue(job)

    def forget(self, model_id: str) -> None:
        """The model is gone: release whatever still waits for it (it will fail on its own)."""
        self._last_done.pop(model_id, None)
        self._last_seq.pop(model_id, None)
        for job in self._sequencer.forget(model_id):
            self._enqueue(job)

    def _new_future(self) -> asyncio.Future:
        self._start()
        return asyncio.get_running_loop().create_future()

    async def _submit(self, model_id: str, seq_id: int | None, job: _Job) -> Any:
        key = (model_id, seq_id) if seq_id is not None else None
        if key is not None and key in self._seen:
            return await asyncio.shield(self._seen[key])
        self._remember(key, job.future)
        self._open += 1
        if job.fn is not None and model_id is not None:
            job.ticket = self._order.barrier(model_id)
        if seq_id is not None:
            self.note_seq(model_id, seq_id)
        for ready in self._sequencer.submit(model_id, seq_id, job):
            self._enqueue(ready)
        self._gap_changed.set()
        return await asyncio.shield(job.future)

    def last_seq(self, model_id: str) -> int | None:
        """The highest seq_id this actor has been sent for `model_id` (a client attaching to the model
        numbers its requests after it: a reused seq_id would be answered as a retried duplicate)."""
        return self._last_seq.get(model_id)

    def note_seq(self, model_id: str, seq_id: int) -> None:
        """`seq_id` was sent for `model_id` (also one a restored snapshot already holds)."""
        self._last_seq[model_id] = max(seq_id, self._last_seq.get(model_id, seq_id))

    def _remember(self, key: tuple[str, int] | None, future: asyncio.Future) -> None:
        if key is None:
            return
        self._seen[key] = future
        while len(self._seen) > DEDUPE_WINDOW:
            self._seen.popitem(last=False)

    def _enqueue(self, job: _Job) -> None:
        """Into the queue, or into its tenant's backlog while that tenant is over its quota (or
        earlier work of the same model waits there: a model's requests keep their order)."""
        tenant = job.tenant or self._held.get(job.model_id)
        if tenant is not None and (self._backlog.get(tenant) or not self._has_room(tenant, job)):
            self._backlog.setdefault(tenant, deque()).append(job)
            if job.model_id is not None:
                self._held[job.model_id] = tenant
            return
        self._admit(job)

    def _has_room(self, tenant: str, job: _Job) -> bool:
        if job.tenant is None:  # a barrier (optim_step, save, ...): it only keeps its place
            return True
        requests, tokens = self._admitted.get(tenant, (0, 0))
        if requests == 0:
            return True  # one request always runs, however large
        return (
            requests < self._limits.max_queued_per_tenant and tokens + job.tokens <= self._limits.max_tokens_per_tenant
        )

    def _admit(self, job: _Job) -> None:
        if job.tenant is not None:
            load = self._admitted.setdefault(job.tenant, [0, 0])
            load[0] += 1
            load[1] += job.tokens
        if job.sample is None:
            self._jobs.append(job)
        elif self._order.sample_may_start(job.sample.sampler_id, job.ticket):
            self._start_sampling(job)
        else:
            self._parked.append(job)
        self._job_added.set()

    def _start_sampling(self, job: _Job) -> None:
        job.started = True
        self._sampling += 1
        if self._decoder is not None:
            self._decoder.submit(job.sample, job)
        else:
            self._samples.append(job)

    def _unpark(self) -> None:
        """Parked sampling jobs whose earlier barriers are all done go on, in their order."""
        parked, self._parked = self._parked, []
        for job in parked:
            if self._order.sample_may_start(job.sample.sampler_id, job.ticket):
                self._start_sampling(job)
            else:
                self._parked.append(job)

    def _release(self, job: _Job) -> None:
        """A job finished: give its tenant's room to the next jobs of its backlog."""
        tenant = job.tenant
        if tenant is None:
            return
        load = self._admitted[tenant]
        load[0] -= 1
        load[1] -= job.tokens
        if load[0] == 0:
            del self._admitted[tenant]
        backlog = self._backlog.get(tenant)
        while backlog and self._has_room(tenant, backlog[0]):
            self._admit(backlog.popleft())
        if not backlog:
            self._backlog.pop(tenant, None)
            self._held = {m: t for m, t in self._held.items() if t != tenant}
        else:
            waiting = {j.model_id for j in backlog}
            self._held = {m: t for m, t in self._held.items() if t != tenant or m in waiting}

    def _start(self) -> None:
        """Start the dispatcher and the gap timer on the running event loop (first call)."""
        if self._job_added is not None:
            return
        self._job_added = asyncio.Event()
        self._gap_changed = asyncio.Event()
        self._tasks = [asyncio.create_task(self._dispatch()), asyncio.create_task(self._expire_gaps())]

    # ---- the loop ------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self._dispatch_one(loop)
            except Exception:  # a bug here must not stop every later request of this actor
                logger.exception("the scheduler's dispatch failed; going on")
                await asyncio.sleep(0.1)

    async def _dispatch_one(self, loop: asyncio.AbstractEventLoop) -> None:
        training = self._next_training()
        ready = [kind for kind, has in (("train", training is not None), ("sample", self._sample_ready())) if has]
        if not ready:
            self._job_added.clear()
            await self._job_added.wait()
            return
        kind = self._shares.pick(ready)
        start = time.monotonic()
        if kind == "sample":
            await self._run_sampling(loop)
        else:
            await self._run_training(loop, training)
        elapsed = time.monotonic() - start
        self._shares.charge(kind, elapsed)
        self.trace.append((kind, elapsed))

    def _next_training(self) -> _Job | None:
        """The first training job that may run: each model's jobs in order, and a barrier only
        once the samples of its id submitted before it are done."""
        blocked: set[str] = set()
        for job in self._jobs:
            if job.model_id in blocked:
                continue
            if job.ticket is not None and not self._order.barrier_may_run(job.model_id, job.ticket):
                blocked.add(job.model_id)
                continue
            return job
        return None

    def _sample_ready(self) -> bool:
        return bool(self._samples) or (self._decoder is not None and self._decoder.busy)

    async def _run_training(self, loop: asyncio.AbstractEventLoop, first: _Job) -> None:
        if first.train is not None:
            if not self._sample_ready():  # the wait would idle the thread: sampling could use it
                await self._wait_for_other_tenants()
            await self._run_train_pass(loop, first)
            return
        # A run of short units (optimizer steps, saves, loads: the steps of many adapters come
        # in a row after their pass) for up to one slice: one turn of the shares, not one each,
        # so that training's round trips do not wait out a decode slice per adapter.
        deadline = time.monotonic() + self._limits.decode_slice_s
        job: _Job | None = first
        while job is not None and job.train is None:
            self._jobs.remove(job)
            self._settle(job, await self._on_compute_thread(loop, job.fn, 1))
            if time.monotonic() >= deadline:
                return
            job = self._next_training()

    async def _wait_for_other_tenants(self) -> None:
        """Hold a pass briefly for tenants in the middle of a round trip: their last request just
        finished (their client is about to send the next) and nothing of theirs is queued."""
        window = self._limits.batch_window_s
        if window <= 0 or not self._limits.cross_adapter_batching:
            return
        while True:
            now = time.monotonic()
            queued = {job.model_id for job in self._jobs}
            expected = [t + window for m, t in self._last_done.items() if now - t < window and m not in queued]
            if not expected:
                return
            self._job_added.clear()
            try:
                await asyncio.wait_for(self._job_added.wait(), max(expected) - now)
            except TimeoutError:
                return

    async def _run_train_pass(self, loop: asyncio.AbstractEventLoop, first: _Job) -> None:
        for job in [job for job in self._jobs if job.train is not None and not job.train.data]:
            self._finish(job, UserError("forward_backward needs at least one datum"))
        if first not in self._jobs:
            return
        parts = self._planner.plan(list(self._jobs))
        if not parts:  # NOTE: never loop on a request no pass can advance: it fails, alone
            self._finish(first, ServerError("this request could not be planned into a pass"))
            return
        runner = partial(run_train_pass, parts, self._train_batch, self._check_train)
        outcome = await self._on_compute_thread(loop, runner, len(parts))
        if self._metrics is not None:
            tokens = sum(int(d.tokens.shape[0]) for p in parts for d in p.job.train.data[p.start : p.end])
            self._metrics.pass_size("train", tokens, len({p.job.model_id for p in parts}))
        outcomes = outcome if isinstance(outcome, list) else [outcome] * len(parts)
        for part, result in zip(parts, outcomes):
            job = part.job
            if isinstance(result, BaseException):
                self._finish(job, result)
                continue
            job.parts.append(result)
            job.done_datums = part.end
            if job.done_datums == len(job.train.data):
                self._finish(job, merge_results(job.parts))

    async def _run_sampling(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._decoder is None:
            await self._run_sample_batch(loop)
            return
        run = partial(self._decoder.run, self._limits.decode_slice_s)
        outcome = await self._on_compute_thread(loop, run, self._sampling)
        if isinstance(outcome, BaseException):  # the engine keeps its requests; they fail on their own
            return
        self._record_sampling([(job, result) for job, result in outcome])
        for job, result in outcome:
            self._settle(job, result)

    async def _run_sample_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, rows = [], 0
        for job in list(self._samples):
            if not batch or rows + job.sample.num_samples <= self._limits.max_sample_rows:
                self._samples.remove(job)
                batch.append(job)
                rows += job.sample.num_samples
        run_batch = partial(self._sample_batch, [job.sample for job in batch])
        outcome = await self._on_compute_thread(loop, run_batch, len(batch))
        outcomes = outcome if isinstance(outcome, list) else [outcome] * len(batch)
        self._record_sampling(list(zip(batch, outcomes)))
        for job, result in zip(batch, outcomes):
            self._settle(job, result)

    def _record_sampling(self, finished: list[tuple[_Job, Any]]) -> None:
        if self._metrics is None or not finished:
            return
        tokens = sum(job.tokens for job, _ in finished)
        tokens += sum(len(s.tokens) for _, r in finished if isinstance(r, SampleResult) for s in r.sequences)
        self._metrics.pass_size("sample", tokens, len({job.sample.sampler_id for job, _ in finished}))

    async def _on_compute_thread(self, loop: asyncio.AbstractEventLoop, fn: Callable[[], Any], jobs: int) -> Any:
        """`_run`, counting its `jobs` as running (not waiting) meanwhile."""
        self._running = jobs
        try:
            return await _run(loop, self._compute, fn)
        finally:
            self._running = 0

    def _finish(self, job: _Job, outcome: Any) -> None:
        if job in self._jobs:
            self._jobs.remove(job)
        self._settle(job, outcome)

    def _settle(self, job: _Job, outcome: Any) -> None:
        if job.future.done():  # settled already (NOTE: releasing twice would corrupt the tenant's load)
            return
        if job.model_id is not None:
            self._last_done[job.model_id] = time.monotonic()
        self._open -= 1
        if job.sample is not None:
            self._order.sample_done(job.sample.sampler_id, job.ticket)
            self._sampling -= job.started
        elif job.ticket is not None:
            self._order.barrier_done(job.model_id, job.ticket)
            self._unpark()
        _settle(job, outcome)
        self._release(job)

    async def _expire_gaps(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            deadline = self._sequencer.next_deadline()
            self._gap_changed.clear()
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                await asyncio.wait_for(self._gap_changed.wait(), timeout)
            except TimeoutError:
                pass
            for job in self._sequencer.expire():
                logger.warning(
                    "running a request after %.1fs without its seq_id predecessor", self._limits.gap_timeout_s
                )
                self._enqueue(job)


def _settle(job: _Job, outcome: Any) -> None:
    if job.future.done():
        return
    if isinstance(outcome, BaseException):
        if not isinstance(outcome, ThinkerError):
            outcome = ServerError(f"{type(outcome).__name__}: {outcome}")
        job.future.set_exception(outcome)
    else:
        job.future.set_result(outcome)


def _init_compute_thread(nice: int, idle: bool, then: Callable[[], None] | None) -> None:
    """Lower the compute thread's CPU priority first, so the torch worker threads it starts inherit
    it (Linux applies a scheduling policy and a nice value per thread, and a new thread takes its
    creator's): on a CPU node the event loops (heartbeats, health, answering finished futures) then
    preempt the compute instead of queueing behind it. `idle`: SCHED_IDLE, the compute runs when no
    other thread wants the core; else `nice` more than the caller."""
    if sys.platform == "linux" and (idle or nice > 0):
        try:
            if idle:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            else:
                os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
        except OSError as exc:
            logger.warning("could not lower the compute thread's priority: %s", exc)
    if then is not None:
        then()


async def _run(loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor, fn: Callable[[], Any]) -> Any:
    """fn's result, or the exception it raised (unexpected ones become ServerError)."""
    try:
        return await loop.run_in_executor(executor, fn)
    except ThinkerError as exc:
        return exc
    except Exception as exc:  # a bug or a device fault: never take the actor down
        logger.exception("compute failed")
        return ServerError(f"{type(exc).__name__}: {exc}")
