"""Sampled sequences recorded for `stable_reinforce`, and the provenance spans that name them.

- A sample taken with `record_stability_info` records, per returned sequence id
  (`<request id>:<index>`), the request's prompt, the sampled tokens and the sampler's own
  log-probs of them, owned by the tenant and the session that sampled (`record`).
- A `stable_reinforce` request names, on every datum, where its tokens came from: runs that tile
  the model input and the targets, each `prompt_tokens` or `sampled_tokens` of a sequence id at an
  offset. `resolve` checks every claim against the records (the tokens must be the recorded ones)
  and fills in the loss's server-side inputs: `sampler_logprobs` (the recorded log-probs on sampled
  target positions) and `sampled_mask`. Unknown, foreign or expired ids, runs that do not tile,
  tokens that differ and nonzero advantages outside sampled runs are user errors.
- A record lives a day from its last use (each training request that uses it restarts the day).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import numpy as np
from sqlalchemy import delete, select, update

from actors.metadata.database import Database
from actors.metadata.tables import SampledSequenceRecord, utc_now
from actors.work import Datum
from configs.errors import UserError

KEEP_FOR = timedelta(days=1)
SERVER_INPUTS = ("sampler_logprobs", "sampled_mask")
MAX_SPANS = 4096  # runs per datum field
MAX_SEQUENCES = 4096  # distinct sequence ids one request may name


@dataclass(frozen=True)
class Span:
    """One run of a provenance tiling: positions [offset, offset + length) of a sequence's prompt
    ("prompt") or sampled tokens ("sampled")."""

    kind: str
    sequence_id: str
    offset: int
    length: int


@dataclass(frozen=True)
class _Recorded:
    prompt: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray

    def of(self, kind: str) -> np.ndarray:
        return self.prompt if kind == "prompt" else self.tokens


class SampledSequences:
    def __init__(self, db: Database):
        self._db = db

    def record(
        self,
        tenant: str,
        session_id: str | None,
        request_id: str,
        prompt: np.ndarray,
        sequences: list[tuple[np.ndarray, np.ndarray]],
    ) -> list[str]:
        """Record each (tokens, logprobs) of one sampling request; their sequence ids."""
        now = utc_now()
        prompt_bytes = np.asarray(prompt, dtype="<i4").tobytes()
        rows = [
            SampledSequenceRecord(
                id=f"{request_id}:{i}",
                tenant_id=tenant,
                session_id=session_id,
                prompt=prompt_bytes,
                tokens=np.asarray(tokens, dtype="<i4").tobytes(),
                logprobs=np.asarray(logprobs, dtype="<f4").tobytes(),
                last_used_at=now,
            )
            for i, (tokens, logprobs) in enumerate(sequences)
        ]
        with self._db.transaction() as session:
            for row in rows:
                session.merge(row)  # a replayed request records the same ids again
        return [row.id for row in rows]

    def resolve(self, tenant: str, session_id: str | None, data: list[Datum], spans: list) -> None:
        """Check every datum's provenance against the records and add the server-side loss inputs
        to it (in place). `spans[i]` is datum i's (input runs, target runs)."""
        for i, datum in enumerate(data):
            reserved = [k for k in SERVER_INPUTS if k in datum.loss_fn_inputs]
            if reserved:
                raise UserError(f"datum {i}: loss_fn_inputs {reserved} are filled in by the server; do not send them")
            if spans[i] is None or not spans[i][0] or not spans[i][1]:
                raise UserError(
                    f"datum {i}: stable_reinforce needs provenance spans on every datum (model_input_spans and "
                    "loss_fn_input_spans: Datum.with_provenance over sequences sampled with record_stability_info=True)"
                )
        wanted = {s.sequence_id for pair in spans for runs in pair for s in runs}
        if len(wanted) > MAX_SEQUENCES:
            raise UserError(f"the request names {len(wanted)} sampled sequences, over the limit of {MAX_SEQUENCES}")
        for sequence_id in wanted:
            if not isinstance(sequence_id, str) or not 0 < len(sequence_id) <= 160:
                raise UserError("a provenance span's sequence_id must be 1 to 160 characters")
        records = self._load(tenant, session_id, wanted)
        for i, (datum, (input_runs, target_runs)) in enumerate(zip(data, spans)):
            targets = datum.loss_fn_inputs.get("target_tokens")
            if targets is None or targets.ndim != 1:
                raise UserError(f"datum {i}: stable_reinforce needs 1-D target_tokens")
            _check_runs(i, "model_input_spans", input_runs, datum.tokens, records, None)
            logprobs = np.zeros(len(targets), np.float32)
            sampled = np.zeros(len(targets), np.float32)
            _check_runs(i, "loss_fn_input_spans", target_runs, targets, records, (logprobs, sampled))
            advantages = datum.loss_fn_inputs.get("advantages")
            if advantages is not None and advantages.shape == sampled.shape and np.any(advantages[sampled == 0] != 0):
                first = int(np.flatnonzero((advantages != 0) & (sampled == 0))[0])
                raise UserError(
                    f"datum {i}: advantage at target position {first} is nonzero but that position is not a sampled "
                    "token (stable_reinforce trains sampled tokens only)"
                )
            datum.loss_fn_inputs["sampler_logprobs"] = logprobs
            datum.loss_fn_inputs["sampled_mask"] = sampled
        with self._db.transaction() as session:
            session.execute(
                update(SampledSequenceRecord)
                .where(SampledSequenceRecord.id.in_(list(wanted)))
                .values(last_used_at=utc_now())
            )

    def expire(self) -> int:
        with self._db.transaction() as session:
            old = SampledSequenceRecord.last_used_at < utc_now() - KEEP_FOR
            return session.execute(delete(SampledSequenceRecord).where(old)).rowcount

    def _load(self, tenant: str, session_id: str | None, wanted: set[str]) -> dict[str, _Recorded]:
        query = select(SampledSequenceRecord).where(SampledSequenceRecord.id.in_(list(wanted)))
        with self._db.reading() as session:
            rows = {row.id: row for row in session.scalars(query)}
        fresh_after = utc_now() - KEEP_FOR
        records = {}
        for sequence_id in sorted(wanted):
            row = rows.get(sequence_id)
            usable = (
                row is not None
                and row.tenant_id == tenant
                and (row.session_id is None or row.session_id == session_id)
                and row.last_used_at >= fresh_after
            )
            if not usable:  # another tenant's or session's id reads as unknown, like an expired one
                raise UserError(
                    f"unknown sequence id {sequence_id[:160]!r}: a provenance span must name a sequence this session "
                    "sampled with record_stability_info=True in the last day"
                )
            records[sequence_id] = _Recorded(
                np.frombuffer(row.prompt, "<i4"), np.frombuffer(row.tokens, "<i4"), np.frombuffer(row.logprobs, "<f4")
            )
        return records


def _check_runs(
    datum: int,
    field: str,
    runs: list[Span],
    values: np.ndarray,
    records: dict[str, _Recorded],
    fill: tuple[np.ndarray, np.ndarray] | None,
) -> None:
    """The runs tile `values` and each claims the recorded tokens; with `fill`, sampled runs write
    the recorded log-probs and a 1 into (logprobs, sampled) at their positions."""
    if len(runs) > MAX_SPANS:
        raise UserError(f"datum {datum}: {field} has {len(runs)} runs, over the limit of {MAX_SPANS}")
    total = sum(run.length for run in runs)
    if total != len(values):
        raise UserError(f"datum {datum}: {field} cover {total} positions but the field has {len(values)}")
    position = 0
    for run in runs:
        if run.offset < 0 or run.length < 0:
            raise UserError(f"datum {datum}: {field} has a run with a negative offset or length")
        source = records[run.sequence_id].of(run.kind)
        end = run.offset + run.length
        if end > len(source):
            raise UserError(
                f"datum {datum}: {field} claims {run.kind} positions {run.offset}..{end - 1} of {run.sequence_id!r}, "
                f"which has {len(source)}"
            )
        if not np.array_equal(values[position : position + run.length], source[run.offset : end]):
            raise UserError(
                f"datum {datum}: {field} claims positions {position}..{position + run.length - 1} are {run.kind} "
                f"tokens {run.offset}..{end - 1} of {run.sequence_id!r}, but the tokens differ"
            )
        if fill is not None and run.kind == "sampled":
            logprobs, sampled = fill
            logprobs[position : position + run.length] = records[run.sequence_id].logprobs[run.offset : end]
            sampled[position : position + run.length] = 1.0
        position += run.length
