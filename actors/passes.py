"""Planning base-model passes: which pending forward(_backward) requests run together.

- Only requests not held back by an earlier barrier of their own model (optim_step, save, ...)
  may join; without cross-adapter batching, only the first request's adapter does.
- Filled up to the pass budget in tokens: padded tokens (rows x longest row), or real tokens
  (the sum of the rows' lengths) for a backend whose passes are packed without padding. First every waiting
  tenant gets up to an equal share (however many adapters it holds), then the rest of the budget
  goes in queue order; a request that does not fit is split by datums into micro-batches (its
  first datum always runs).
- Micro-batch results are merged like the SDK merges chunks: outputs in datum order, `:sum`
  metrics added, `:mean` weighted by datums, `:min` / `:max` kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from actors.work import ForwardBackwardResult, ForwardBackwardWork
from configs.errors import ThinkerError


@dataclass
class TrainPart:
    job: Any  # the scheduler's job: has .model_id, .train (the work) and .done_datums
    start: int  # datum range of job.train.data in this pass
    end: int


class PassPlanner:
    def __init__(self, max_tokens: int, max_adapters: int, cross_adapter: bool, packed: bool = False):
        self._max_tokens = max_tokens
        self._max_adapters = max_adapters
        self._cross_adapter = cross_adapter
        self._packed = packed  # the pass costs its real tokens, not rows x its longest row

    def plan(self, jobs: list[Any]) -> list[TrainPart]:
        """The parts of the next pass; `jobs[0]` must be a forward(_backward) job."""
        candidates = self._candidates(jobs)
        tenants = list(dict.fromkeys(job.train.tenant for job in candidates))
        share = max(1, self._max_tokens // len(tenants))
        ends = {id(job): job.done_datums for job in candidates}
        state = {"rows": 0, "width": 0, "tokens": 0, "per_tenant": dict.fromkeys(tenants, 0)}
        for fair in (True, False):
            for job in candidates:
                self._extend(job, ends, state, share if fair else None)
        return [TrainPart(job, job.done_datums, ends[id(job)]) for job in candidates if ends[id(job)] > job.done_datums]

    def _candidates(self, jobs: list[Any]) -> list[Any]:
        blocked: set[str] = set()
        found = []
        for job in jobs:
            if job.train is None:
                if job.model_id is not None:
                    blocked.add(job.model_id)
            elif job.model_id not in blocked:
                found.append(job)
        if not self._cross_adapter:
            found = [job for job in found if job.model_id == found[0].model_id]
        allowed = list(dict.fromkeys(job.model_id for job in found))[: self._max_adapters]
        return [job for job in found if job.model_id in allowed]

    def _extend(self, job: Any, ends: dict[int, int], state: dict, share: int | None) -> None:
        data = job.train.data
        while ends[id(job)] < len(data):
            length = int(data[ends[id(job)]].tokens.shape[0])
            width = max(state["width"], length)
            cost = state["tokens"] + length if self._packed else (state["rows"] + 1) * width
            fair = share is None or state["per_tenant"][job.train.tenant] + length <= share
            if state["rows"] and not (cost <= self._max_tokens and fair):
                return
            state["rows"], state["width"], state["tokens"] = state["rows"] + 1, width, state["tokens"] + length
            state["per_tenant"][job.train.tenant] += length
            ends[id(job)] += 1


def run_train_pass(
    parts: list[TrainPart],
    train_batch: Callable[[list[ForwardBackwardWork]], list[Any]],
    check: Callable[[ForwardBackwardWork], None],
) -> list[Any]:
    """One pass on the compute thread; a request split into micro-batches is validated whole
    before its first one runs, so a bad datum later in it never leaves half its gradient behind."""
    outcomes: list[Any] = [None] * len(parts)
    works, indices = [], []
    for i, part in enumerate(parts):
        work = part.job.train
        if part.start == 0 and part.end < len(work.data):
            try:
                check(work)
            except ThinkerError as exc:
                outcomes[i] = exc
                continue
        works.append(replace(work, data=work.data[part.start : part.end]))
        indices.append(i)
    for i, result in zip(indices, train_batch(works) if works else []):
        outcomes[i] = result
    return outcomes


def merge_results(parts: list[ForwardBackwardResult]) -> ForwardBackwardResult:
    if len(parts) == 1:
        return parts[0]
    outputs = [o for part in parts for o in part.loss_fn_outputs]
    counts = [len(part.loss_fn_outputs) for part in parts]
    metrics: dict[str, float] = {}
    for key in parts[0].metrics:
        values = [part.metrics[key] for part in parts if key in part.metrics]
        reduction = key.rsplit(":", 1)[-1]
        if reduction == "sum":
            metrics[key] = sum(values)
        elif reduction == "mean":
            weights = [c for part, c in zip(parts, counts) if key in part.metrics]
            metrics[key] = sum(v * w for v, w in zip(values, weights)) / max(sum(weights), 1)
        elif reduction in ("min", "max"):
            metrics[key] = min(values) if reduction == "min" else max(values)
        else:
            metrics[key] = values[0]
    return ForwardBackwardResult(loss_fn_outputs=outputs, metrics=metrics)
