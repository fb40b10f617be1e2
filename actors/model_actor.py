"""The model actor: one per base model, hosting many LoRA adapters over one copy of the weights.

- Wrapped as a Serve deployment by `deployments.app` (pinned to `num_gpus` when configured).
  Every training call returns only when its work is done, so the Ray ref of the call *is*
  the request's future.
- Ordering: each training model's requests run in seq_id order (`Sequencer`); a retried
  submission of the same (model_id, seq_id) awaits the first one's result instead of running
  twice.
- NOTE: all backend work runs on one compute thread, in release order, so the backend needs
  no locks; the event loop only queues, orders and answers.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from actors.backend import Backend
from actors.sequencer import Sequencer
from actors.work import (
    CreateModelWork,
    ForwardBackwardResult,
    ForwardBackwardWork,
    ModelDescription,
    ModelInfo,
    OptimStepResult,
    OptimStepWork,
)
from configs.errors import ServerError, ThinkerError
from configs.schema import BaseModelConfig

logger = logging.getLogger(__name__)

DEDUPE_WINDOW = 4096  # (model_id, seq_id) results remembered for retried submissions


@dataclass
class _Job:
    fn: Callable[[], Any]
    future: asyncio.Future


def default_backend(config: BaseModelConfig, cache_dir: str) -> Backend:
    from actors.hf_backend import HFBackend

    return HFBackend(config, cache_dir)


class ModelActor:
    def __init__(
        self,
        config: BaseModelConfig,
        cache_dir: str = "~/.cache/thinker",
        backend_factory: Callable[[BaseModelConfig, str], Backend] = default_backend,
    ):
        for module in config.custom_losses:
            importlib.import_module(module)
        self._config = config
        self._backend = backend_factory(config, cache_dir)
        self._description = self._backend.describe()
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thinker-compute")
        self._sequencer: Sequencer[_Job] = Sequencer(config.seq_gap_timeout_s)
        self._seen: OrderedDict[tuple[str, int], asyncio.Future] = OrderedDict()
        self._queue: asyncio.Queue[_Job] | None = None
        self._gap_changed: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []

    # ---- Tinker verbs -------------------------------------------------------------------

    async def create_model(self, work: CreateModelWork) -> ModelInfo:
        return await self._ordered(work.model_id, 0, partial(self._create_model, work))

    async def forward_backward(self, work: ForwardBackwardWork) -> ForwardBackwardResult:
        return await self._ordered(work.model_id, work.seq_id, partial(self._backend.forward_backward, work))

    async def optim_step(self, work: OptimStepWork) -> OptimStepResult:
        return await self._ordered(work.model_id, work.seq_id, partial(self._backend.optim_step, work))

    async def unload_model(self, model_id: str) -> str:
        await self._ordered(model_id, None, partial(self._backend.unload_model, model_id))
        for job in self._sequencer.forget(model_id):
            self._enqueue(job)
        return model_id

    async def get_info(self, model_id: str) -> ModelInfo:
        return self._backend.get_info(model_id)

    # ---- bookkeeping for the ingress ---------------------------------------------------------

    async def describe(self) -> ModelDescription:
        return self._description

    async def has_model(self, model_id: str) -> bool:
        try:
            self._backend.get_info(model_id)
        except ThinkerError:
            return False
        return True

    async def skip(self, model_id: str, seq_id: int) -> None:
        """The ingress rejected this submission: later seq ids must not wait for it."""
        self._start()
        for job in self._sequencer.skip(model_id, seq_id):
            self._enqueue(job)

    async def release_session(self, session_id: str) -> list[str]:
        """Unload the session's models that live here (its client has finished)."""
        mine = [m for m in self._backend.list_models() if m.startswith(f"{session_id}:")]
        return [await self.unload_model(model_id) for model_id in mine]

    # ---- ordering and execution ------------------------------------------------------------

    def _create_model(self, work: CreateModelWork) -> ModelInfo:
        try:  # a retried create_model (lost response) finds its model already there
            return self._backend.get_info(work.model_id)
        except ThinkerError:
            return self._backend.create_model(work)

    async def _ordered(self, model_id: str, seq_id: int | None, fn: Callable[[], Any]) -> Any:
        self._start()
        key = (model_id, seq_id) if seq_id is not None else None
        if key is not None and key in self._seen:
            return await asyncio.shield(self._seen[key])
        job = _Job(fn, asyncio.get_running_loop().create_future())
        if key is not None:
            self._remember(key, job.future)
        for ready in self._sequencer.submit(model_id, seq_id, job):
            self._enqueue(ready)
        self._gap_changed.set()
        return await asyncio.shield(job.future)

    def _remember(self, key: tuple[str, int], future: asyncio.Future) -> None:
        self._seen[key] = future
        while len(self._seen) > DEDUPE_WINDOW:
            self._seen.popitem(last=False)

    def _enqueue(self, job: _Job) -> None:
        self._queue.put_nowait(job)

    def _start(self) -> None:
        """Start the dispatcher and the gap timer on the replica's event loop (first call)."""
        if self._queue is not None:
            return
        self._queue = asyncio.Queue()
        self._gap_changed = asyncio.Event()
        self._tasks = [asyncio.create_task(self._dispatch()), asyncio.create_task(self._expire_gaps())]

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            try:
                result = await loop.run_in_executor(self._compute, job.fn)
            except ThinkerError as exc:
                job.future.set_exception(exc)
            except Exception as exc:  # a bug or a device fault: never take the actor down
                logger.exception("compute failed")
                job.future.set_exception(ServerError(f"{type(exc).__name__}: {exc}"))
            else:
                job.future.set_result(result)

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
                    "running a request after waiting %.1fs for a missing seq_id", self._config.seq_gap_timeout_s
                )
                self._enqueue(job)
