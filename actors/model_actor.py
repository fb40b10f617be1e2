"""The model actor: one per base model, hosting many LoRA adapters over one copy of the weights.

- Wrapped as a Serve deployment by `deployments.app` (pinned to `num_gpus` when configured).
  Every call returns only when its work is done, so the Ray ref of the call *is* the future.
- The `Scheduler` orders each training model's requests by seq_id, batches sampling, drops
  retried duplicates and runs everything on one compute thread; `Checkpointing` moves adapters
  between the backend and the checkpoint store.
- NOTE: this module stays torch-free (the ingress imports it through the app); the backend is
  built by `backend_factory` inside the actor process.
- Metrics (`actors.metrics`) are recorded where the facts are: tokens and latencies as each verb
  answers, pass sizes in the scheduler, gauges every second from the first call on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from actors import ids
from actors.backend import Backend
from actors.background import BackgroundWrites
from actors.chat import chat_datum, likelihood_metrics, prompt_tokens
from actors.checkpoint_store import CheckpointStore
from actors.checkpointing import Checkpointing
from actors.durability import Durability, needs_replay
from actors.metadata.database import Database, default_url
from actors.metadata.futures import FutureRecords
from actors.metadata.registry import Registry
from actors.metadata.sequences import SampledSequences
from actors.metrics import ModelMetrics
from actors.outcomes import CURRENT_REQUEST, Outcomes, tracked
from actors.scheduler import Scheduler, SchedulerLimits
from actors.work import (
    ChatForwardBackwardWork,
    CreateModelWork,
    ForwardBackwardResult,
    ForwardBackwardWork,
    GeneratedText,
    GenerateWork,
    LoraSpec,
    ModelDescription,
    ModelInfo,
    OptimStepResult,
    OptimStepWork,
    SampleResult,
    SamplerInfo,
    SampleWork,
)
from configs.errors import NotFoundError, ThinkerError, UserError
from configs.schema import BaseModelConfig, TenantQuotas

logger = logging.getLogger(__name__)


def default_backend(config: BaseModelConfig, cache_dir: str) -> Backend:
    if config.backend == "megatron":
        from actors.megatron.backend import MegatronBackend

        return MegatronBackend(config, cache_dir)
    from actors.hf.backend import HFBackend

    return HFBackend(config, cache_dir)


class ModelActor:
    """One base model's Serve replica: every Tinker verb for its training models and samplers.
    All compute goes through its one `Scheduler` (so a model's requests run in seq_id order and
    the backend is never called from two threads); its limits (max_adapters) hold for every
    backend. The Ray ref of each call is that request's future."""

    def __init__(
        self,
        config: BaseModelConfig,
        cache_dir: str = "~/.cache/thinker",
        checkpoint_root: str = "~/.cache/thinker/checkpoints",
        backend_factory: Callable[[BaseModelConfig, str], Backend] = default_backend,
        database_url: str | None = None,
        quotas: TenantQuotas | None = None,
        future_ttl_s: float = 3600.0,
        durable_training: bool = True,
        snapshot_interval_s: float = 0.0,
    ):
        quotas = quotas or TenantQuotas()
        for module in config.custom_losses:
            importlib.import_module(module)
        self._config = config
        database = Database(database_url or default_url(cache_dir))
        database.migrate()
        self._backend = backend_factory(config, cache_dir)
        store = CheckpointStore(checkpoint_root)
        self._registry = Registry(database)
        self._checkpoints = Checkpointing(self._backend, store, self._registry, config.name, config.max_adapters)
        self._usage_writes = BackgroundWrites("usage")
        self._records = FutureRecords(database, future_ttl_s)
        self._sequences = SampledSequences(database)
        self._next_sequence_expiry = 0.0
        self._outcomes = Outcomes(self._records, future_ttl_s)
        durability = Durability(store, self._registry, self._records, snapshot_interval_s)
        self._durability = durability if durable_training else None
        self._restore: asyncio.Task | None = None
        self._replays: set[asyncio.Task] = set()
        self._unsaved_samplers: dict[str, list[str]] = {}  # model id -> snapshot samplers since its snapshot
        self._remaking: dict[str, asyncio.Task] = {}  # sampler id -> the replay that makes it again
        self._applied: dict[str, list[str]] = {}  # model id -> unsequenced logged requests run since its snapshot
        self._cancelled: set[str] = set()  # sampling requests whose clients gave up on them (cancel_future)
        self._metrics = ModelMetrics(config.name)
        self._gauges: asyncio.Task | None = None  # sets the gauges every second, from the first call on
        limits = SchedulerLimits(
            max_sample_rows=config.max_sample_rows,
            max_pass_tokens=config.max_pass_tokens,
            max_pass_adapters=config.max_resident_adapters,
            cross_adapter_batching=config.cross_adapter_batching,
            batch_window_s=config.batch_window_s,
            gap_timeout_s=config.seq_gap_timeout_s,
            max_queued_per_tenant=quotas.max_queued_requests,
            max_tokens_per_tenant=quotas.max_tokens_in_flight,
            sampling_share=config.sampling_share,
            decode_slice_s=config.decode_slice_s,
            compute_nice=config.compute_thread_nice,
            compute_idle=config.compute_thread_policy == "idle",
            packed_passes=getattr(self._backend, "packed", False),  # HF passes without padding
        )
        backend = self._backend
        self._scheduler = Scheduler(
            backend.forward_backward_batch,
            backend.check_forward_backward,
            backend.sample,
            limits,
            init_compute_thread=backend.init_compute_thread,  # torch's thread settings are per thread
            metrics=self._metrics,
            decoder=getattr(backend, "decoder", None),  # continuous batching, where the backend has it
        )
        self._description = self._backend.describe()
        self._backend.cancelled = self._cancelled.__contains__  # read on the compute thread, each decode step

    def __del__(self):
        """Serve calls this when the replica shuts down: free the backend's rank actors and files."""
        close = getattr(getattr(self, "_backend", None), "close", None)
        if close is not None:
            close()

    # ---- training models --------------------------------------------------------------------

    @tracked
    async def create_model(self, work: CreateModelWork) -> ModelInfo:
        return await self._scheduler.ordered(work.model_id, 0, partial(self._checkpoints.create_model, work))

    @tracked
    async def create_model_from_state(self, work: CreateModelWork, path: str, optimizer: bool) -> ModelInfo:
        """create_training_client_from_state*: a new training model (seq 0) from a checkpoint."""
        fn = partial(self._checkpoints.create_from_state, work, path, optimizer)
        return await self._scheduler.ordered(work.model_id, 0, fn)

    @tracked
    async def forward_backward(self, work: ForwardBackwardWork) -> ForwardBackwardResult:
        start = time.monotonic()
        result = await self._scheduler.forward_backward(work)
        tokens = sum(len(d.tokens) for d in work.data)
        self._count_usage(work.tenant, work.model_id, "tokens_trained", tokens)
        self._metrics.trained(work.tenant, work.forward_only, tokens, time.monotonic() - start)
        return result

    @tracked
    async def optim_step(self, work: OptimStepWork) -> OptimStepResult:
        start = time.monotonic()
        result = await self._optim_step(work)
        self._metrics.stepped(work.tenant, time.monotonic() - start)
        return result

    async def _optim_step(self, work: OptimStepWork) -> OptimStepResult:
        if self._durability is None or not self._durability.due(work.model_id):
            return await self._ordered(work.model_id, work.seq_id, partial(self._backend.optim_step, work))
        fn = partial(self._step_and_snapshot, work, CURRENT_REQUEST.get())
        result, snapshot, samplers, applied = await self._scheduler.ordered(work.model_id, work.seq_id, fn)
        if snapshot is not None:
            self._durability.save(work, snapshot, samplers, applied)
        return result

    @tracked
    async def save_weights(
        self,
        model_id: str,
        seq_id: int | None,
        name: str,
        tenant: str,
        ttl_s: float | None = None,
        user_metadata: dict[str, str] | None = None,
        overwrite: bool = False,
    ) -> str:
        fn = partial(self._checkpoints.save, tenant, model_id, "weights", name, ttl_s, user_metadata, overwrite)
        return await self._scheduler.ordered(model_id, seq_id, fn)

    @tracked
    async def save_weights_external(
        self, model_id: str, seq_id: int | None, name: str, tenant: str, ttl_s: float | None, recipients: tuple
    ) -> dict:
        """A PEFT folder to download (age-encrypted to `recipients` when given): {"path", "size_bytes"}."""
        fn = partial(self._checkpoints.save_external, tenant, model_id, name, ttl_s, tuple(recipients))
        return await self._scheduler.ordered(model_id, seq_id, fn)

    @tracked
    async def save_weights_for_sampler(
        self,
        model_id: str,
        seq_id: int | None,
        name: str | None,
        sampler_id: str | None,
        tenant: str,
        ttl_s: float | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> str:
        """Named: a PEFT folder in storage (returns its path). Else: a snapshot sampler (returns its id)."""
        if name is not None:
            fn = partial(self._checkpoints.save, tenant, model_id, "sampler_weights", name, ttl_s, user_metadata)
        else:
            fn = partial(self._snapshot_sampler, model_id, sampler_id)
        return await self._ordered(model_id, seq_id, fn)

    def _snapshot_sampler(self, model_id: str, sampler_id: str | None) -> str:
        """On the compute thread: the snapshot, and a note to write its weights at the model's next snapshot."""
        made = self._checkpoints.snapshot(model_id, sampler_id)
        if self._durability is not None:
            self._unsaved_samplers.setdefault(model_id, []).append(made)
        return made

    @tracked
    async def load_weights(self, model_id: str, seq_id: int | None, path: str, optimizer: bool, tenant: str) -> str:
        return await self._ordered(model_id, seq_id, partial(self._checkpoints.load, tenant, model_id, path, optimizer))

    @tracked
    async def unload_model(self, model_id: str) -> str:
        unsaved = await self._scheduler.ordered(model_id, None, partial(self._unload, model_id))
        self._scheduler.forget(model_id)
        self._applied.pop(model_id, None)
        if self._durability is not None:
            run = await asyncio.to_thread(self._registry.find_run, model_id)
            if run is not None:  # its snapshots and log go; the snapshot samplers it made and that live stay
                live = {s for s in self._backend.list_samplers() if self._source_of(s) == model_id}
                await asyncio.wait([self._durability.forget(run.tenant_id, model_id, unsaved, live)])
        return model_id

    def _unload(self, model_id: str) -> list:
        """On the compute thread: copies of the snapshot samplers it made whose weights are not written
        yet (they outlive it), then the unload."""
        made = self._unsaved_samplers.pop(model_id, [])
        live = set(self._backend.list_samplers())
        unsaved = [(s, self._backend.sampler_state(s)) for s in dict.fromkeys(made) if s in live]
        self._backend.unload_model(model_id)
        return unsaved

    def _source_of(self, sampler_id: str) -> str | None:
        try:
            return self._backend.sampler_info(sampler_id).source_model_id
        except ThinkerError:
            return None

    async def get_info(self, model_id: str) -> ModelInfo:
        await self._ready()
        info = self._backend.get_info(model_id)
        return dataclasses.replace(info, last_seq_id=self._scheduler.last_seq(model_id))

    # ---- sampling ------------------------------------------------------------------------------

    async def create_sampler(self, sampler_id: str, model_path: str | None, tenant: str) -> SamplerInfo:
        await self._ready()
        if await self.has_sampler(sampler_id):
            return self._backend.sampler_info(sampler_id)
        fn = partial(self._checkpoints.create_sampler, tenant, sampler_id, model_path)
        return await self._scheduler.ordered(sampler_id, None, fn)

    async def sampler_info(self, sampler_id: str) -> SamplerInfo:
        await self._ready()
        await self._sampler_back(sampler_id)
        return self._backend.sampler_info(sampler_id)

    async def _sampler_back(self, sampler_id: str) -> None:
        """After a restart: wait until a snapshot sampler that a replay makes again is back."""
        remaking = self._remaking.get(sampler_id)
        if remaking is not None:
            await asyncio.wait([remaking])
            self._remaking.pop(sampler_id, None)

    @tracked
    async def sample(self, work: SampleWork) -> SampleResult:
        start = time.monotonic()
        await self._sampler_back(work.sampler_id)
        work.request_id = CURRENT_REQUEST.get()
        try:
            result = await self._scheduler.sample(work)
        finally:
            self._cancelled.discard(work.request_id)
        if work.target_prompt_ids is not None:  # answered in the layout it was asked in
            result.target_prompt_layout = work.target_prompt_layout
        request_id = CURRENT_REQUEST.get()
        if work.record_stability and request_id is not None:  # before the answer: training may name them next
            sequences = [(s.tokens, s.logprobs) for s in result.sequences]
            session_id = ids.session_of(work.sampler_id)
            record = self._sequences.record
            await asyncio.to_thread(record, work.tenant, session_id, request_id, work.prompt, sequences)
            if time.monotonic() >= self._next_sequence_expiry:  # records unused for a day go
                self._next_sequence_expiry = time.monotonic() + 600
                self._usage_writes.start(self._sequences.expire)
        tokens = sum(len(s.tokens) for s in result.sequences)
        self._count_usage(work.tenant, work.sampler_id, "tokens_sampled", tokens)
        self._metrics.sampled(work.tenant, tokens, time.monotonic() - start)
        return result

    # ---- the simple JSON routes: chat data, text in and out ------------------------------------

    @tracked
    async def chat_forward_backward(self, work: ChatForwardBackwardWork) -> ForwardBackwardResult:
        start = time.monotonic()
        result = await self._ordered(work.model_id, None, partial(self._chat_forward_backward, work))
        scored = sum(len(output["logprobs"]) for output in result.loss_fn_outputs)
        self._count_usage(work.tenant, work.model_id, "tokens_trained", scored)
        self._metrics.trained(work.tenant, False, scored, time.monotonic() - start)
        return result

    async def generate_text(self, work: GenerateWork) -> GeneratedText:
        await self._ready()
        # NOTE: the tokenizer runs on the compute thread only (fast tokenizers are not re-entrant).
        prompt = await self._scheduler.run_now(partial(self._encode_prompt, work))
        sample = SampleWork(work.sampler_id, None, prompt, work.num_samples, work.params, tenant=work.tenant)
        result = await self.sample(sample)
        return await self._scheduler.run_now(partial(self._decode, result, len(prompt)))

    async def cancel(self, request_id: str) -> bool:
        """cancel_future: a running or queued sample stops (its rows leave the batch at the next
        token) and its future fails with a user error; anything else is left alone."""
        await self._ready()
        if not self._outcomes.running(request_id):
            return False
        self._cancelled.add(request_id)
        return True

    async def loss_functions(self) -> dict[str, str]:
        from losses import available_losses  # here, not at the top: this module stays torch-free

        return available_losses()

    # ---- bookkeeping for the ingress ---------------------------------------------------------

    async def wait_result(self, request_id: str, timeout_s: float) -> tuple[str, Any]:
        """The long-poll behind retrieve_future: ("done" | "failed" | "pending" | "unknown", outcome)."""
        await self._ready()
        return await self._outcomes.wait(request_id, timeout_s)

    # ---- durability: a restarted deployment brings its training models back -----------------------

    async def _ready(self) -> None:
        """The first call after a (re)start restores the training models before anything else runs."""
        if self._restore is None:
            self._gauges = asyncio.ensure_future(self._metrics.watch(self._gauge_values))
            self._restore = asyncio.ensure_future(self._restore_training_models())
        await asyncio.shield(self._restore)

    async def _restore_training_models(self) -> None:
        """Every live training model of this base model from its durable snapshot, its samplers, then
        the logged requests after that snapshot, submitted again in order (the pending ones' futures
        complete), and last the pending sampling requests, once the samplers they need are back."""
        if self._durability is None:
            return
        logs = []
        for run in await asyncio.to_thread(self._registry.live_runs_of, self._config.name):
            try:  # one model that cannot come back must not keep the others (or the deployment) down
                files = await asyncio.to_thread(self._durability.read, run)
                if files:
                    work = CreateModelWork(run.id, LoraSpec(**run.lora), dict(run.user_metadata), run.tenant_id)
                    await self._scheduler.run_now(partial(self._load_snapshot, work, files))
                after = (run.durable_seq, run.durable_at) if files else (None, None)
                if files and run.durable_seq is not None:  # a client attaching numbers after it
                    self._scheduler.note_seq(run.id, run.durable_seq)
                logs += await asyncio.to_thread(self._records.log, run.id, *after)
                self._metrics.restored(run.tenant_id)
            except Exception:
                logger.exception("training model %s could not be restored", run.id)
        to_remake = await self._restore_samplers()
        replays = [(rid, verb, args) for rid, status, verb, args in logs if needs_replay(status, verb, args, to_remake)]
        tasks = [self._replay(request_id, verb, args) for request_id, verb, args in replays]
        for task, (_, verb, args) in zip(tasks, replays):
            if verb == "save_weights_for_sampler" and args[3] in to_remake:
                self._remaking[args[3]] = task
        remade = list(self._remaking.values())
        samples = await asyncio.to_thread(self._records.pending_log, self._config.name, "sample")
        for request_id, args in samples:  # tracked now (so their futures read as pending), run later
            self._replay(request_id, "sample", args, after=remade)
        if replays or samples:
            logger.warning("restored training models; running %d logged requests again", len(replays) + len(samples))
        for _ in range(3):  # let every replay reach the scheduler before anything new does
            await asyncio.sleep(0)

    async def _restore_samplers(self) -> frozenset[str]:
        """Every live sampler of this base model that can be made now (from a checkpoint, the base
        model, or its written snapshot weights); the ids of those only their logged call can make."""
        to_remake = set()
        for sampler in await asyncio.to_thread(self._registry.live_samplers_of, self._config.name):
            if sampler.source_model_id is None:
                make = partial(self._checkpoints.create_sampler, sampler.tenant_id, sampler.id, sampler.model_path)
            else:
                read = self._durability.read_sampler
                try:
                    files = await asyncio.to_thread(read, sampler.tenant_id, sampler.source_model_id, sampler.id)
                except Exception:
                    logger.exception("the weights of sampling session %s could not be read", sampler.id)
                    continue
                if not files:
                    to_remake.add(sampler.id)
                    continue
                info = SamplerInfo(sampler.id, self._config.name, source_model_id=sampler.source_model_id)
                make = partial(self._backend.create_sampler, info, files)
            try:
                await self._scheduler.ordered(sampler.id, None, make)
            except ThinkerError as exc:  # e.g. its checkpoint was deleted since: it is gone, like it
                logger.warning("sampling session %s could not be made again: %s", sampler.id, exc)
        return frozenset(to_remake)

    def _replay(self, request_id: str, verb: str, args: tuple, after: list[asyncio.Task] = ()) -> asyncio.Task:
        """Run a logged request again under its request id, once the `after` replays are done."""
        method = getattr(type(self), verb).__wrapped__  # past the @tracked gate, which waits for the restore

        async def run():
            CURRENT_REQUEST.set(request_id)  # this task's own context
            if after:
                await asyncio.wait(after)
            return await method(self, *args)

        task = asyncio.ensure_future(self._outcomes.track(request_id, run()))
        self._replays.add(task)
        task.add_done_callback(self._replayed)
        return task

    def _replayed(self, task: asyncio.Task) -> None:
        self._replays.discard(task)
        if not task.cancelled():
            task.exception()  # its outcome is recorded; a failure here is the request's own

    def _load_snapshot(self, work: CreateModelWork, files: dict[str, bytes]) -> None:
        self._checkpoints.create_model(work)
        self._backend.load_state(work.model_id, files, with_optimizer=True)

    def _step_and_snapshot(self, work: OptimStepWork, request_id: str | None) -> tuple:
        """On the compute thread: the step, then a copy of the state right after it and of the snapshot
        samplers made since the last one (serialized and written off this thread), and the ids of
        the unsequenced logged requests that state holds."""
        result = self._backend.optim_step(work)
        if work.seq_id is None and request_id is not None:
            self._applied.setdefault(work.model_id, []).append(request_id)
        try:  # the step is done: a snapshot that cannot be taken must not fail it (the log still covers it)
            live = set(self._backend.list_samplers())
            made = self._unsaved_samplers.get(work.model_id, [])
            samplers = [(s, self._backend.sampler_state(s)) for s in dict.fromkeys(made) if s in live]
            snapshot = self._backend.snapshot_state(work.model_id)
        except Exception:
            logger.exception("no durable snapshot of %s after this step (its request log covers it)", work.model_id)
            return result, None, [], []
        self._unsaved_samplers.pop(work.model_id, None)
        return result, snapshot, samplers, self._applied.pop(work.model_id, [])

    async def _ordered(self, model_id: str, seq_id: int | None, fn: Callable[[], Any]) -> Any:
        """`scheduler.ordered`, noting an unsequenced logged request once it ran (on the compute
        thread, so the next snapshot knows exactly which ones it holds)."""
        request_id = CURRENT_REQUEST.get()
        if seq_id is not None or request_id is None or self._durability is None:
            return await self._scheduler.ordered(model_id, seq_id, fn)

        def noted() -> Any:
            result = fn()
            self._applied.setdefault(model_id, []).append(request_id)
            return result

        return await self._scheduler.ordered(model_id, seq_id, noted)

    async def describe(self) -> ModelDescription:
        return self._description

    async def status(self) -> dict[str, Any]:
        """What `thinker status` shows of this base model (an operator's view, through Ray)."""
        await self._ready()
        gauges = self._gauge_values()
        return {
            "base_model": self._config.name,
            "resident": gauges["thinker_adapters_resident"],
            "offloaded": gauges["thinker_adapters_offloaded"],
            "queued": gauges["thinker_queue_depth"],
            "running": gauges["thinker_pending_futures"],
        }

    async def tokenizer_files(self) -> dict[str, bytes]:
        """The base model's tokenizer files, for a client that lacks the model's folder (a notebook
        on the Ray client): small files only, never weights."""
        tokenizer = getattr(self._backend, "tokenizer", None)
        if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
            raise UserError(f"base model {self._description.name!r} has no tokenizer to hand out")
        return await asyncio.to_thread(_tokenizer_files, tokenizer)

    async def has_model(self, model_id: str) -> bool:
        await self._ready()
        return model_id in self._backend.list_models()

    async def has_sampler(self, sampler_id: str) -> bool:
        await self._ready()
        await self._sampler_back(sampler_id)
        return sampler_id in self._backend.list_samplers()

    async def list_models(self) -> list[ModelInfo]:
        await self._ready()
        return [self._backend.get_info(m) for m in self._backend.list_models()]

    async def skip(self, model_id: str, seq_id: int) -> None:
        """The ingress rejected this submission: later seq ids must not wait for it."""
        await self._ready()
        self._scheduler.skip(model_id, seq_id)

    async def release_session(self, session_id: str) -> list[str]:
        """Unload the session's models and samplers that live here (its client has finished)."""
        await self._ready()
        models = [m for m in self._backend.list_models() if ids.session_of(m) == session_id]
        released = []
        for model_id in models:
            try:
                released.append(await self.unload_model(model_id))
            except NotFoundError:  # a release running beside this one (an expiry sweep, the client's finish) was first
                pass
        for sampler_id in [s for s in self._backend.list_samplers() if ids.session_of(s) == session_id]:
            source = self._source_of(sampler_id)
            try:
                await self._scheduler.ordered(sampler_id, None, partial(self._backend.remove_sampler, sampler_id))
            except NotFoundError:
                continue
            released.append(sampler_id)
            run = await asyncio.to_thread(self._registry.find_run, source) if source else None
            if self._durability is not None and run is not None:
                await asyncio.wait([self._durability.forget_sampler(run.tenant_id, source, sampler_id)])
        return released

    # ---- usage and metrics ---------------------------------------------------------------------

    def _gauge_values(self) -> dict[str, float]:
        """The gauges, read on the event loop (the backend's counts are safe to read while it computes)."""
        resident, offloaded = self._backend.adapter_counts()
        return {
            "thinker_queue_depth": self._scheduler.waiting,
            "thinker_pending_futures": self._outcomes.pending,
            "thinker_adapters_resident": resident,
            "thinker_adapters_offloaded": offloaded,
        }

    def _count_usage(self, tenant: str, owned_id: str, kind: str, amount: int) -> None:
        """Add to the tenant's usage in the database; the answer does not wait for it."""
        record = self._registry.add_usage
        self._usage_writes.start(record, tenant, ids.session_of(owned_id), self._config.name, kind, amount)

    # ---- compute-thread helpers ------------------------------------------------------------------

    def _chat_forward_backward(self, work: ChatForwardBackwardWork) -> ForwardBackwardResult:
        if work.create_with is not None:
            self._checkpoints.create_model(CreateModelWork(work.model_id, work.create_with, tenant=work.tenant))
        if not work.conversations:
            raise UserError("data must hold at least one conversation")
        inputs = work.loss_fn_inputs or [{} for _ in work.conversations]
        if len(inputs) != len(work.conversations):
            raise UserError(f"loss_fn_inputs cover {len(inputs)} conversations, data has {len(work.conversations)}")
        tokenizer = self._backend.tokenizer
        data = [chat_datum(tokenizer, c, work.loss_fn, i) for c, i in zip(work.conversations, inputs)]
        result = self._backend.forward_backward(
            ForwardBackwardWork(work.model_id, None, data, work.loss_fn, work.loss_fn_config, tenant=work.tenant)
        )
        result.metrics.update(likelihood_metrics(data, [o["logprobs"] for o in result.loss_fn_outputs]))
        return result

    def _encode_prompt(self, work: GenerateWork) -> np.ndarray:
        if work.messages is not None:
            return prompt_tokens(self._backend.tokenizer, work.messages)
        if self._backend.tokenizer is None:
            raise UserError("this base model has no tokenizer, so it cannot take text prompts")
        return np.asarray(self._backend.tokenizer(work.prompt or "", add_special_tokens=False)["input_ids"], np.int64)

    def _decode(self, result: SampleResult, prompt_length: int) -> GeneratedText:
        tokenizer = self._backend.tokenizer
        return GeneratedText(
            texts=[tokenizer.decode(s.tokens.tolist(), skip_special_tokens=True) for s in result.sequences],
            tokens=[s.tokens.tolist() for s in result.sequences],
            logprobs=[s.logprobs.tolist() for s in result.sequences],
            stop_reasons=[s.stop_reason for s in result.sequences],
            prompt_tokens=prompt_length,
        )


def _tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """What `save_pretrained` writes of a tokenizer (its files only, whatever lies beside them)."""
    with tempfile.TemporaryDirectory(prefix="thinker-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return {f.name: f.read_bytes() for f in sorted(Path(folder).iterdir()) if f.is_file()}
