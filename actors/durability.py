"""Training state that survives its model deployment: durable snapshots and the request log.

- After an optim_step (each one, or at most one per `snapshot_interval_s`), the model actor copies
  the training model's state (adapter weights and AdamW state) on the compute thread, and `save`
  serializes it (as PEFT files) and writes it under the tenant's storage prefix off that thread
  (one writer thread, so snapshots land in order); the database then names it as the model's
  current snapshot, and older ones and the request-log payloads it covers are dropped.
- Every request of a training model is in the request log (`actors.metadata.futures`). A restarted
  deployment brings each live training model back from its current snapshot and runs again, in
  order, the logged requests after it: those that changed the model's state (to rebuild it
  exactly, gradients accumulated since the step included) and those still pending (so their
  futures complete). The client sees a delay, not an error.
- Snapshot samplers (save_weights_for_sampler without a path) come back too: one made since its
  model's last snapshot is made again by replaying its logged call; at the model's next snapshot
  its weights are written beside it (`.durable-samplers/`), before the log that made it is trimmed.
- Sampling requests still pending are in the log as well, and run again once their samplers are back.
- NOTE: a snapshot the database does not name yet is never read, so a crash between writing it
  and naming it replays from the previous one, which is exact too.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from actors.background import BackgroundWrites
from actors.checkpoint_store import DURABLE_SAMPLERS, CheckpointStore
from actors.metadata.futures import FutureRecords
from actors.metadata.registry import Registry
from actors.metadata.tables import TrainingRun, utc_now
from actors.work import ForwardBackwardWork, OptimStepWork

STATE_CHANGING = frozenset(
    {
        "create_model",
        "create_model_from_state",
        "forward_backward",
        "chat_forward_backward",
        "optim_step",
        "load_weights",
        "unload_model",
    }
)


def snapshot_tag(seq_id: int | None, at: datetime | None) -> str:
    return f"seq-{seq_id}" if seq_id is not None else f"at-{int(at.timestamp() * 1e6)}"


def sampler_tag(sampler_id: str) -> str:
    """A snapshot sampler's folder name (sampler ids hold ':', which folder names may not)."""
    return "s-" + hashlib.sha256(sampler_id.encode()).hexdigest()[:40]


def needs_replay(status: str, verb: str, args: tuple, samplers_to_remake: frozenset[str] = frozenset()) -> bool:
    """Run again after a restart: what is still pending, what changed the model's state, and the
    calls that made snapshot samplers whose weights were not written yet."""
    if status == "pending":
        return True
    if verb == "save_weights_for_sampler":
        return args[2] is None and args[3] in samplers_to_remake  # (model_id, seq_id, name, sampler_id, tenant)
    if verb == "forward_backward" and isinstance(args[0], ForwardBackwardWork) and args[0].forward_only:
        return False
    return verb in STATE_CHANGING


class Durability:
    def __init__(self, store: CheckpointStore, registry: Registry, records: FutureRecords, interval_s: float = 0.0):
        self._store = store
        self._registry = registry
        self._records = records
        self._interval_s = interval_s
        self._last: dict[str, float] = {}  # model id -> when its newest snapshot was taken (monotonic)
        # model id -> (samplers, applied ids) of a snapshot whose write failed: the next one carries them
        self._carried: dict[str, tuple[list, list[str]]] = {}
        # one writer thread: snapshots land in the order they were taken
        self._writes = BackgroundWrites(
            "a durable snapshot", ThreadPoolExecutor(1, thread_name_prefix="thinker-durable")
        )

    def due(self, model_id: str) -> bool:
        """Whether the optim_step about to run should be followed by a snapshot."""
        last = self._last.get(model_id)
        return last is None or time.monotonic() - last >= self._interval_s

    def save(
        self,
        work: OptimStepWork,
        snapshot: Callable[[], dict[str, bytes]],
        samplers: list[tuple[str, Callable[[], dict[str, bytes]]]] = (),
        applied: list[str] = (),
    ) -> None:
        """Serialize and write the snapshot taken right after `work` (an optim_step), and the weights
        of the snapshot samplers the model made since its last one, in the background. `applied`:
        the unsequenced logged requests (ids) the snapshot holds."""
        at = utc_now()
        self._last[work.model_id] = time.monotonic()
        carried_samplers, carried_applied = self._carried.pop(work.model_id, ([], []))
        samplers, applied = carried_samplers + list(samplers), carried_applied + list(applied)
        self._writes.start(self._write, work, at, snapshot, samplers, applied)

    def read(self, run: TrainingRun) -> dict[str, bytes]:
        """The run's current snapshot ({} without one)."""
        if run.durable_seq is None and run.durable_at is None:
            return {}
        return self._store.read_durable(run.tenant_id, run.id, snapshot_tag(run.durable_seq, run.durable_at))

    def read_sampler(self, tenant: str, model_id: str, sampler_id: str) -> dict[str, bytes]:
        """A snapshot sampler's written weights ({} if not written)."""
        return self._store.read_durable(tenant, model_id, sampler_tag(sampler_id), DURABLE_SAMPLERS)

    def _write(self, work: OptimStepWork, at: datetime, snapshot, samplers, applied: list[str]) -> None:
        try:
            self._write_samplers(work.tenant, work.model_id, samplers)  # before the log that made them is trimmed
            tag = snapshot_tag(work.seq_id, at)
            self._store.write_durable(work.tenant, work.model_id, tag, snapshot())
            self._records.name_snapshot(work.model_id, work.seq_id, at, applied)
        except BaseException:  # not named: a restart replays from the previous one; the next snapshot carries these
            self._carried[work.model_id] = (samplers, applied)
            raise
        self._store.drop_durable_except(work.tenant, work.model_id, tag)

    def _write_samplers(self, tenant: str, model_id: str, samplers) -> None:
        for sampler_id, files in samplers:
            self._store.write_durable(tenant, model_id, sampler_tag(sampler_id), files(), DURABLE_SAMPLERS)

    def forget(self, tenant: str, model_id: str, unsaved: list, live_samplers: set[str]) -> asyncio.Future:
        """An unloaded training model: its snapshots and request log go (after any write in progress);
        the snapshot samplers it made that are still live stay (`unsaved`: weights not written yet)."""
        self._last.pop(model_id, None)
        carried, _ = self._carried.pop(model_id, ([], []))
        return self._writes.start(self._forget, tenant, model_id, carried + list(unsaved), live_samplers)

    def _forget(self, tenant: str, model_id: str, unsaved: list, live_samplers: set[str]) -> None:
        self._write_samplers(tenant, model_id, [(s, files) for s, files in unsaved if s in live_samplers])
        keep = frozenset(sampler_tag(s) for s in live_samplers)
        self._store.drop_durable_except(tenant, model_id, None)
        self._store.drop_durable_except(tenant, model_id, keep, DURABLE_SAMPLERS)
        self._records.trim_log(model_id)

    def forget_sampler(self, tenant: str, model_id: str, sampler_id: str) -> asyncio.Future:
        """A removed snapshot sampler: its written weights go."""
        return self._writes.start(self._store.drop_durable, tenant, model_id, sampler_tag(sampler_id), DURABLE_SAMPLERS)
