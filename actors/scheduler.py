"""The model actor's scheduler: what runs next on its single compute thread.

- Training requests are released in each model's seq_id order (`Sequencer`, with gap timeouts
  and holes filled by `skip`), then run one at a time in release order.
- Sampling requests need no order: those waiting together (up to `max_rows` sequences) run as
  one batched generation.
- A retried submission (same key: (model, seq_id) or (sampler, seq_id)) awaits the first one's
  result instead of running twice.
- NOTE: every job runs on the one compute thread, so the backend needs no locks; the event loop
  only queues, orders and answers. Unexpected exceptions become ServerError; the loop never dies.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from actors.sequencer import Sequencer
from actors.work import SampleResult, SampleWork
from configs.errors import ServerError, ThinkerError

logger = logging.getLogger(__name__)

DEDUPE_WINDOW = 4096  # results remembered for retried submissions


@dataclass
class _Job:
    future: asyncio.Future
    fn: Callable[[], Any] | None = None  # one unit of compute
    sample: SampleWork | None = None  # or a sampling request, batched with its neighbours


class Scheduler:
    def __init__(
        self,
        sample_batch: Callable[[list[SampleWork]], list[SampleResult | Exception]],
        max_rows: int,
        gap_timeout_s: float,
    ):
        self._sample_batch = sample_batch
        self._max_rows = max_rows
        self._gap_timeout_s = gap_timeout_s
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thinker-compute")
        self._sequencer: Sequencer[_Job] = Sequencer(gap_timeout_s)
        self._seen: OrderedDict[tuple[str, int], asyncio.Future] = OrderedDict()
        self._jobs: deque[_Job] = deque()
        self._job_added: asyncio.Event | None = None
        self._gap_changed: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []

    async def ordered(self, model_id: str, seq_id: int | None, fn: Callable[[], Any]) -> Any:
        """Run fn in model_id's seq_id order (seq_id None: in arrival order); its result."""
        self._start()
        key = (model_id, seq_id) if seq_id is not None else None
        if key is not None and key in self._seen:
            return await asyncio.shield(self._seen[key])
        job = _Job(asyncio.get_running_loop().create_future(), fn=fn)
        self._remember(key, job.future)
        for ready in self._sequencer.submit(model_id, seq_id, job):
            self._enqueue(ready)
        self._gap_changed.set()
        return await asyncio.shield(job.future)

    async def sample(self, work: SampleWork) -> SampleResult:
        self._start()
        key = (f"sample:{work.sampler_id}", work.seq_id) if work.seq_id is not None else None
        if key is not None and key in self._seen:
            return await asyncio.shield(self._seen[key])
        job = _Job(asyncio.get_running_loop().create_future(), sample=work)
        self._remember(key, job.future)
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
        for job in self._sequencer.skip(model_id, seq_id):
            self._enqueue(job)

    def forget(self, model_id: str) -> None:
        """The model is gone: release whatever still waits for it (it will fail on its own)."""
        for job in self._sequencer.forget(model_id):
            self._enqueue(job)

    # ---- the loop ------------------------------------------------------------------------------

    def _remember(self, key: tuple[str, int] | None, future: asyncio.Future) -> None:
        if key is None:
            return
        self._seen[key] = future
        while len(self._seen) > DEDUPE_WINDOW:
            self._seen.popitem(last=False)

    def _enqueue(self, job: _Job) -> None:
        self._jobs.append(job)
        self._job_added.set()

    def _start(self) -> None:
        """Start the dispatcher and the gap timer on the running event loop (first call)."""
        if self._job_added is not None:
            return
        self._job_added = asyncio.Event()
        self._gap_changed = asyncio.Event()
        self._tasks = [asyncio.create_task(self._dispatch()), asyncio.create_task(self._expire_gaps())]

    def _next_batch(self) -> list[_Job]:
        """The oldest job; a sampling job takes every sampling job waiting with it (up to the row cap)."""
        first = self._jobs.popleft()
        if first.sample is None:
            return [first]
        batch, rows = [first], first.sample.num_samples
        for job in list(self._jobs):
            if job.sample is not None and rows + job.sample.num_samples <= self._max_rows:
                self._jobs.remove(job)
                batch.append(job)
                rows += job.sample.num_samples
        return batch

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._jobs:
                self._job_added.clear()
                await self._job_added.wait()
                continue
            batch = self._next_batch()
            if batch[0].sample is None:
                outcomes = [await _run(loop, self._compute, batch[0].fn)]
            else:
                works = [job.sample for job in batch]
                outcome = await _run(loop, self._compute, partial(self._sample_batch, works))
                outcomes = outcome if isinstance(outcome, list) else [outcome] * len(batch)
            for job, outcome in zip(batch, outcomes):
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

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
                logger.warning("running a request after %.1fs without its seq_id predecessor", self._gap_timeout_s)
                self._enqueue(job)


async def _run(loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor, fn: Callable[[], Any]) -> Any:
    """fn's result, or the exception it raised (unexpected ones become ServerError)."""
    try:
        return await loop.run_in_executor(executor, fn)
    except ThinkerError as exc:
        return exc
    except Exception as exc:  # a bug or a device fault: never take the actor down
        logger.exception("compute failed")
        return ServerError(f"{type(exc).__name__}: {exc}")
