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

from actors.metadata.database import Database
from actors.metadata.tables import Request, utc_now
from configs.errors import NotFoundError

MAX_STORED_OUTCOME = 64 * 1024 * 1024


@dataclass(frozen=True)
class LoggedCall:
    """A training model's request as its deployment ran it: enough to run it again, in order."""

    model_id: str
    seq_id: int | None
    verb: str  # the model actor's method
    args: tuple


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
    ) -> None:
        """Record a request; with `logged`, also as an entry of its training model's request log."""
        row = Request(id=request_id, tenant_id=tenant, kind=kind, base_model=base_model, meta=dict(meta))
        if logged is not None:
            row.model_id, row.seq_id, row.verb = logged.model_id, logged.seq_id, logged.verb
            row.payload = pickle.dumps(logged.args, protocol=pickle.HIGHEST_PROTOCOL)
        with self._db.transaction() as session:
            session.add(row)

    def log(self, model_id: str, after_seq: int | None, after: datetime | None) -> list[tuple[str, str, str, tuple]]:
        """(request id, status, verb, args) of a training model's logged requests after its durable
        snapshot (seq_id > after_seq; unsequenced ones submitted after `after`), in run order."""
        query = select(Request).where(Request.model_id == model_id, Request.payload.is_not(None))
        with self._db.transaction() as session:
            rows = list(session.scalars(query))

        def after_snapshot(row: Request) -> bool:
            if after_seq is not None and row.seq_id is not None:
                return row.seq_id > after_seq
            return after is None or row.created_at > after

        rows = [r for r in rows if after_snapshot(r)]
        rows.sort(key=lambda r: (0, r.seq_id, 0.0) if r.seq_id is not None else (1, 0, r.created_at.timestamp()))
        return [(r.id, r.status, r.verb, pickle.loads(r.payload)) for r in rows]

    def trim_log(self, model_id: str, through_seq: int | None = None, through: datetime | None = None) -> int:
        """Drop the payloads a replay no longer needs: a training model's logged requests up to its
        durable snapshot (seq_id <= through_seq; unsequenced ones submitted up to `through`), or,
        with neither, all of them (the model was unloaded). The records stay, for retrieve_future."""
        where = [Request.model_id == model_id, Request.payload.is_not(None)]
        if through_seq is not None or through is not None:
            covered = []
            if through_seq is not None:
                covered.append(Request.seq_id <= through_seq)
            if through is not None:
                covered.append(Request.seq_id.is_(None) & (Request.created_at <= through))
            where.append(or_(*covered))
        with self._db.transaction() as session:
            return session.execute(update(Request).where(*where).values(payload=None)).rowcount

    def add_failed(self, request_id: str, tenant: str, kind: str, error: BaseException) -> None:
        """A request that failed before any deployment saw it (its future is already settled)."""
        row = Request(id=request_id, tenant_id=tenant, kind=kind, status="failed", outcome=pickle.dumps(error))
        row.finished_at = utc_now()
        with self._db.transaction() as session:
            session.add(row)

    def finish(self, request_id: str, outcome: Any) -> bool:
        """Store the outcome (a value, or the exception the work raised); False if it was too large
        to store (or the record is gone)."""
        blob = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        with self._db.transaction() as session:
            row = session.get(Request, request_id)
            if row is None:
                return False
            row.status = "failed" if isinstance(outcome, BaseException) else "done"
            row.finished_at = utc_now()
            if len(blob) <= MAX_STORED_OUTCOME:
                row.outcome = blob
            return len(blob) <= MAX_STORED_OUTCOME

    def get(self, tenant: str, request_id: str) -> Request:
        """The record, if `tenant` owns it and it has not expired (else as unknown as any other id)."""
        with self._db.transaction() as session:
            row = session.get(Request, request_id)
        if row is None or row.tenant_id != tenant or utc_now() - row.created_at > self._ttl:
            raise NotFoundError(f"unknown or expired request_id {request_id!r}")
        return row

    def expire(self) -> int:
        with self._db.transaction() as session:
            old = (Request.created_at < utc_now() - self._ttl) & Request.payload.is_(None)
            return session.execute(delete(Request).where(old)).rowcount


def outcome_of(row: Request) -> tuple[bool, Any]:
    """(stored, value or exception) of a finished record."""
    if row.outcome is None:
        return False, None
    return True, pickle.loads(row.outcome)
