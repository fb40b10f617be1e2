"""The futures' records: every submitted request, its owner, the deployment that runs it, and
once finished its outcome (a pickled result or exception).

- The ingress records a request before it hands it to a model deployment, and answers
  `retrieve_future` from here once the outcome is in; so a result survives the ingress replica
  that took the request (Ray objects die with the process that made the call).
- The model deployment writes the outcome when the work is done. Outcomes larger than
  `MAX_STORED_OUTCOME` stay only in that deployment's memory.
- Records older than the futures' TTL are answered as unknown and deleted by `expire`; a
  request-log entry (its payload) lives until its training model's next durable snapshot or its
  unload (`trim_log`), however old, so a replay never misses a step.
- NOTE: outcomes are pickles that only Thinker's own processes write; the database is trusted.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError

from actors.metadata.database import Database
from actors.metadata.tables import Counter, Request, TrainingRun, utc_now
from configs.errors import NotFoundError

MAX_STORED_OUTCOME = 64 * 1024 * 1024


@dataclass(frozen=True)
class LoggedCall:
    """A training model's request as its deployment ran it: enough to run it again, in order."""

    model_id: str | None  # None: not a training model's (a sampling request, run again only while pending)
    seq_id: int | None
    verb: str  # the model actor's method
    args: tuple


REPLAYED_ONLY_WHILE_PENDING = frozenset({"sample"})  # their payloads go when they finish


class FutureRecords:
    def __init__(self, db: Database, ttl_s: float):
        self._db = db
        self._ttl = timedelta(seconds=ttl_s)

    def add(
        self,
        request_id: str,
        tenant: str,
        kind: str,
        base_model: str | None,
        meta: dict[str, Any],
        logged: LoggedCall | None = None,
        sampling_target: str | None = None,
    ) -> None:
        """Record a request; with `logged`, also as an entry of its training model's request log; with
        `sampling_target` (a sample's "<sampler id>#<clone>"), its completion is listed for
        retrieve_futures."""
        row = Request(id=request_id, tenant_id=tenant, kind=kind, base_model=base_model, meta=dict(meta))
        row.sampling_target = sampling_target
        if logged is not None:
            row.model_id, row.seq_id, row.verb = logged.model_id, logged.seq_id, logged.verb
            row.payload = pickle.dumps(logged.args, protocol=pickle.HIGHEST_PROTOCOL)
        with self._db.transaction() as session:
            session.add(row)

    def log(self, model_id: str, after_seq: int | None, after: datetime | None) -> list[tuple[str, str, str, tuple]]:
        """(request id, status, verb, args) of a training model's logged requests after its durable
        snapshot, in submission order: sequenced ones with seq_id > after_seq (submitted after
        `after` when the snapshot has no seq_id); unsequenced ones still holding their payload (the
        snapshot trimmed exactly those it covers)."""
        query = select(Request).where(Request.model_id == model_id, Request.payload.is_not(None))
        with self._db.reading() as session:
            rows = list(session.scalars(query))

        def after_snapshot(row: Request) -> bool:
            if row.seq_id is None:
                return True
            if after_seq is not None:
                return row.seq_id > after_seq
            return after is None or row.created_at > after

        rows = [r for r in rows if after_snapshot(r)]
        rows.sort(key=lambda r: (r.created_at, r.seq_id if r.seq_id is not None else -1))
        return [(r.id, r.status, r.verb, pickle.loads(r.payload)) for r in rows]

    def pending_log(self, base_model: str, verb: str) -> list[tuple[str, tuple]]:
        """(request id, args) of a base model's logged `verb` requests still pending, oldest first."""
        query = select(Request).where(
            Request.base_model == base_model,
            Request.verb == verb,
            Request.status == "pending",
            Request.payload.is_not(None),
        )
        with self._db.reading() as session:
            rows = sorted(session.scalars(query), key=lambda r: r.created_at)
        return [(r.id, pickle.loads(r.payload)) for r in rows]

    def name_snapshot(self, model_id: str, seq_id: int | None, at: datetime, applied: list[str]) -> None:
        """In one transaction: the run's current durable snapshot is the one taken at (seq_id, at),
        and the logged requests it covers lose their payloads (seq_id <= its seq_id, and the
        unsequenced ones the model had applied by then, by id), so none is replayed twice."""
        covered = [Request.id.in_(applied)] if applied else []
        if seq_id is not None:
            covered.append(Request.seq_id <= seq_id)
        with self._db.transaction() as session:
            run = session.get(TrainingRun, model_id)
            if run is not None:
                run.durable_seq, run.durable_at = seq_id, at
            if covered:
                trim = update(Request).where(Request.model_id == model_id, Request.payload.is_not(None), or_(*covered))
                session.execute(trim.values(payload=None))

    def trim_log(self, model_id: str) -> int:
        """Drop all of a training model's request-log payloads (it was unloaded); the records stay."""
        where = [Request.model_id == model_id, Request.payload.is_not(None)]
        with self._db.transaction() as session:
            return session.execute(update(Request).where(*where).values(payload=None)).rowcount

    def add_failed(self, request_id: str, tenant: str, kind: str, error: BaseException) -> None:
        """A request that failed before any deployment saw it (its future is already settled)."""
        self.add_settled(request_id, tenant, kind, error)

    def add_settled(self, request_id: str, tenant: str, kind: str, outcome: Any) -> None:
        """A request the ingress settled itself (a value, or an exception): no deployment runs it."""
        status = "failed" if isinstance(outcome, BaseException) else "done"
        row = Request(id=request_id, tenant_id=tenant, kind=kind, status=status, outcome=pickle.dumps(outcome))
        row.finished_at = utc_now()
        with self._db.transaction() as session:
            session.add(row)

    def finish(self, request_id: str, outcome: Any) -> bool:
        """Store the outcome (a value, or the exception the work raised); False if it was too large
        to store (or the record is gone). A sample with a retrieve_futures target takes the next
        number of that target's counter, last, so completions are numbered in commit order."""
        blob = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        with self._db.transaction() as session:
            row = session.get(Request, request_id, with_for_update=True)
            if row is None:
                return False
            row.status = "failed" if isinstance(outcome, BaseException) else "done"
            row.finished_at = utc_now()
            if row.verb in REPLAYED_ONLY_WHILE_PENDING:
                row.payload = None
            if len(blob) <= MAX_STORED_OUTCOME:
                row.outcome = blob
            if row.sampling_target is not None and row.completion_seq is None:
                session.flush()  # the outcome goes out before the counter's row lock is taken
                row.completion_seq = _take(session, row.sampling_target)
            return len(blob) <= MAX_STORED_OUTCOME

    def pending_samples(self, tenant: str, target: str, before: datetime, limit: int = 64) -> list[Request]:
        """The target's samples still pending that were submitted before `before`, oldest first."""
        query = (
            select(Request)
            .where(Request.sampling_target == target, Request.status == "pending", Request.tenant_id == tenant)
            .where(Request.created_at < before)
            .order_by(Request.created_at)
            .limit(limit)
        )
        with self._db.reading() as session:
            return list(session.scalars(query))

    def completions(self, tenant: str, target: str, after: int, limit: int = 1000) -> list[tuple[int, str, str]]:
        """(completion seq, request id, status) of the target's finished samples after `after`, in order."""
        query = (
            select(Request.completion_seq, Request.id, Request.status)
            .where(Request.sampling_target == target, Request.completion_seq > after, Request.tenant_id == tenant)
            .order_by(Request.completion_seq)
            .limit(limit)
        )
        with self._db.reading() as session:
            return [tuple(r) for r in session.execute(query)]

    def get(self, tenant: str, request_id: str) -> Request:
        """The record, if `tenant` owns it and it has not expired (else as unknown as any other id)."""
        with self._db.reading() as session:
            row = session.get(Request, request_id)
        if row is None or row.tenant_id != tenant or utc_now() - row.created_at > self._ttl:
            raise NotFoundError(f"unknown or expired request_id {request_id!r}")
        return row

    def expire(self) -> int:
        with self._db.transaction() as session:
            old = (Request.created_at < utc_now() - self._ttl) & Request.payload.is_(None)
            return session.execute(delete(Request).where(old)).rowcount


def _take(session, name: str) -> int:
    """The next number of counter `name` (1 for a new one), under its row lock until commit."""
    take = update(Counter).where(Counter.name == name).values(value=Counter.value + 1).returning(Counter.value)
    value = session.execute(take).scalar()
    if value is not None:
        return value
    try:
        with session.begin_nested():
            session.add(Counter(name=name, value=1))
        return 1
    except IntegrityError:  # another transaction made it first: take from it
        return session.execute(take).scalar_one()


def outcome_of(row: Request) -> tuple[bool, Any]:
    """(stored, value or exception) of a finished record."""
    if row.outcome is None:
        return False, None
    return True, pickle.loads(row.outcome)
