"""Who owns what: sessions, training runs, samplers and checkpoints, per tenant; usage counts.

- Every lookup takes the caller's tenant: a row another tenant owns is a NotFoundError, worded
  exactly as for a row that does not exist, so ids of other tenants cannot be probed.
- A training run or sampler is recorded before the model actor creates it (no adapter without an
  owner); a checkpoint is recorded after its files are in place.
- The REST listings (training runs, checkpoints) read from here, not from the storage folders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from actors import ids
from actors.metadata.database import Database
from actors.metadata.tables import Checkpoint, Sampler, Session, TrainingRun, Usage, utc_now
from actors.work import LoraSpec
from configs.errors import NotFoundError, SessionFinishedError, UserError

EXPIRED = "expired"  # the finish reason of a session the server ended (no heartbeat for session_expiry_s)

MAX_CLONES = 10**9 - 1  # a clone numbers its samples' seq_ids from clone * 1e9


class Registry:
    def __init__(self, db: Database):
        self._db = db

    # ---- sessions -------------------------------------------------------------------------------

    def create_session(
        self,
        tenant: str,
        sdk_version: str | None,
        tags: Sequence[str],
        user_metadata: dict[str, Any],
        project_id: str | None = None,
        display_name: str | None = None,
    ) -> str:
        session_id = ids.new_session_id()
        row = Session(
            id=session_id,
            tenant_id=tenant,
            sdk_version=_clean(sdk_version, 64),
            tags={"tags": list(tags)},
            user_metadata=dict(user_metadata),
            project_id=_clean(project_id, 128),
            display_name=_clean(display_name, 256),
        )
        with self._db.transaction() as session:
            session.add(row)
        return session_id

    def session(self, tenant: str, session_id: str) -> Session:
        with self._db.reading() as session:
            return _owned(session.get(Session, session_id), tenant, f"unknown session {session_id!r}")

    def open_session(self, tenant: str, session_id: str) -> Session:
        """The session, if the tenant owns it and it is not finished (SessionFinishedError, a 410:
        a finished session takes no new models or samplers)."""
        row = self.session(tenant, session_id)
        if row.finished_at is not None:
            raise SessionFinishedError(finished_message(row))
        return row

    def touch_session(self, tenant: str, session_id: str) -> Session:
        """A sign of life: an open session's last_seen_at is now (read first, so an unknown,
        another tenant's or a finished session costs no write). The session, finished or not."""
        row = self.session(tenant, session_id)
        if row.finished_at is None:
            with self._db.transaction() as session:
                now = utc_now()
                seen = update(Session).where(Session.id == session_id, Session.finished_at.is_(None))
                if session.execute(seen.values(last_seen_at=now)).rowcount:
                    row.last_seen_at = now
                else:  # finished meanwhile
                    row = session.get(Session, session_id)
        return row

    def expire_idle_sessions(self, before: datetime, batch: int = 100, batches: int = 10) -> int:
        """Finish (reason `expired`) the open sessions with no sign of life since `before`, oldest
        first, up to `batches` x `batch` of them; how many. Each is claimed by a conditional update,
        so two sweeps never both expire one session."""
        idle = (Session.finished_at.is_(None), Session.last_seen_at < before)
        detail = "no heartbeat from its client for longer than the server's session_expiry_s"
        expired = 0
        for _ in range(batches):
            query = select(Session.id).where(*idle).order_by(Session.last_seen_at).limit(batch)
            with self._db.reading() as session:
                candidates = list(session.scalars(query))
            for session_id in candidates:
                claim = update(Session).where(Session.id == session_id, *idle)
                with self._db.transaction() as session:
                    done = claim.values(finished_at=utc_now(), finish_reason=EXPIRED, finish_detail=detail)
                    expired += session.execute(done).rowcount
            if len(candidates) < batch:
                break
        return expired

    def sessions_to_release(self, limit: int = 100) -> list[tuple[str, str]]:
        """(tenant, session id) of expired sessions whose models and samplers are not released
        yet (also those a sweep could not finish), oldest first."""
        query = (
            select(Session.tenant_id, Session.id)
            .where(Session.finish_reason == EXPIRED, Session.released_at.is_(None))
            .order_by(Session.finished_at)
            .limit(limit)
        )
        with self._db.reading() as session:
            return [(tenant, session_id) for tenant, session_id in session.execute(query)]

    def mark_released(self, session_id: str) -> None:
        with self._db.transaction() as session:
            session.execute(update(Session).where(Session.id == session_id).values(released_at=utc_now()))

    def finish_session(
        self, tenant: str, session_id: str, reason: str | None = None, detail: str | None = None
    ) -> None:
        """The client finished; the first reason given stays."""
        with self._db.transaction() as session:
            row = _owned(session.get(Session, session_id), tenant, f"unknown session {session_id!r}")
            row.finished_at = row.finished_at or utc_now()
            if row.finish_reason is None and reason is not None:
                row.finish_reason, row.finish_detail = reason, _clean(detail, 1024)

    def sessions(self, tenant: str, offset: int = 0, limit: int = 20) -> list[Session]:
        """The tenant's sessions, newest first."""
        query = select(Session).where(Session.tenant_id == tenant)
        query = query.order_by(Session.created_at.desc(), Session.id.desc()).offset(offset).limit(limit)
        with self._db.reading() as session:
            return list(session.scalars(query))

    def search_sessions(self, tenant: str, query) -> list[Session]:
        """The tenant's sessions that `query` (a SQLAlchemy select of Session, filtered) names."""
        with self._db.reading() as session:
            return list(session.scalars(query.where(Session.tenant_id == tenant)))

    def session_contents(self, tenant: str, session_id: str) -> tuple[Session, list[str], list[str]]:
        """A session, its training runs' ids and its samplers' ids."""
        with self._db.reading() as session:
            row = _owned(session.get(Session, session_id), tenant, f"unknown session {session_id!r}")
            runs = session.scalars(select(TrainingRun.id).where(TrainingRun.session_id == session_id))
            samplers = session.scalars(select(Sampler.id).where(Sampler.session_id == session_id))
            return row, sorted(runs), sorted(samplers)

    def checkpoint_totals(self, tenant: str, session_ids: list[str]) -> dict[str, tuple[int, int]]:
        """session id -> (live checkpoints, their bytes) over the session's runs."""
        query = (
            select(TrainingRun.session_id, func.count(Checkpoint.id), func.coalesce(func.sum(Checkpoint.size_bytes), 0))
            .join(TrainingRun, TrainingRun.id == Checkpoint.training_run_id)
            .where(Checkpoint.tenant_id == tenant, TrainingRun.session_id.in_(session_ids), _unexpired())
            .group_by(TrainingRun.session_id)
        )
        with self._db.reading() as session:
            return {sid: (int(n), int(size)) for sid, n, size in session.execute(query)}

    def set_session_project(self, tenant: str, session_id: str, project_id: str) -> None:
        with self._db.transaction() as session:
            row = _owned(session.get(Session, session_id), tenant, f"unknown session {session_id!r}")
            if row.project_id not in (None, project_id):
                raise UserError(f"session {session_id!r} is in project {row.project_id!r}; it cannot be moved out")
            row.project_id = _clean(project_id, 128)

    # ---- training runs --------------------------------------------------------------------------

    def add_run(
        self,
        tenant: str,
        run_id: str,
        session_id: str | None,
        base_model: str,
        lora: LoraSpec,
        user_metadata: dict[str, Any],
    ) -> bool:
        """Record a training run owned by `tenant`; False if this tenant already has it (a retry).
        A name another tenant holds is a UserError that says only that it is taken."""
        row = TrainingRun(
            id=run_id,
            tenant_id=tenant,
            session_id=session_id,
            base_model=base_model,
            lora=asdict(lora),
            user_metadata=dict(user_metadata),
        )
        try:
            with self._db.transaction() as session:
                session.add(row)
            return True
        except IntegrityError:
            with self._db.reading() as session:
                existing = session.get(TrainingRun, run_id)
            if existing is not None and existing.tenant_id == tenant:
                if existing.unloaded_at is not None:
                    raise UserError(f"training model {run_id!r} was unloaded; create a new one") from None
                return False
            raise UserError(f"model_id {run_id!r} is taken; choose another") from None

    def run_exists(self, tenant: str, run_id: str) -> bool:
        with self._db.reading() as session:
            row = session.get(TrainingRun, run_id)
            return row is not None and row.tenant_id == tenant

    def run(self, tenant: str, run_id: str) -> TrainingRun:
        with self._db.reading() as session:
            return _owned(session.get(TrainingRun, run_id), tenant, f"unknown model_id {run_id!r}")

    def find_run(self, run_id: str) -> TrainingRun | None:
        """Any tenant's run (for the model deployment's own bookkeeping, never for answering a client)."""
        with self._db.reading() as session:
            return session.get(TrainingRun, run_id)

    def live_run(self, tenant: str, run_id: str) -> TrainingRun:
        """The run, if its adapter has not been unloaded."""
        row = self.run(tenant, run_id)
        if row.unloaded_at is not None:
            raise NotFoundError(f"unknown model_id {run_id!r}")
        return row

    def runs(
        self, tenant: str, offset: int = 0, limit: int = 100, newest_first: bool = False
    ) -> tuple[list[TrainingRun], int]:
        """A page of the tenant's training runs, and how many there are in all."""
        query = select(TrainingRun).where(TrainingRun.tenant_id == tenant)
        order = (TrainingRun.created_at, TrainingRun.id)
        if newest_first:
            order = tuple(column.desc() for column in order)
        with self._db.reading() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery()))
            rows = session.scalars(query.order_by(*order).offset(offset).limit(limit))
            return list(rows), int(total or 0)

    def live_runs(self, tenant: str, session_id: str | None = None) -> list[str]:
        query = select(TrainingRun.id).where(TrainingRun.tenant_id == tenant, TrainingRun.unloaded_at.is_(None))
        if session_id is not None:
            query = query.where(TrainingRun.session_id == session_id)
        with self._db.reading() as session:
            return list(session.scalars(query))

    def live_runs_of(self, base_model: str) -> list[TrainingRun]:
        """Every tenant's live training runs on a base model: what its restarted deployment restores."""
        query = select(TrainingRun).where(TrainingRun.base_model == base_model, TrainingRun.unloaded_at.is_(None))
        with self._db.reading() as session:
            return list(session.scalars(query.order_by(TrainingRun.created_at)))

    def unload_run(self, run_id: str) -> None:
        with self._db.transaction() as session:
            row = session.get(TrainingRun, run_id)
            if row is not None and row.unloaded_at is None:
                row.unloaded_at = utc_now()

    def forget_run(self, run_id: str) -> None:
        """Drop a run whose creation failed before its adapter existed (nothing of it is stored)."""
        with self._db.transaction() as session:
            row = session.get(TrainingRun, run_id)
            has_checkpoints = session.scalar(select(func.count()).where(Checkpoint.training_run_id == run_id))
            if row is not None and not has_checkpoints:
                session.delete(row)

    # ---- samplers -------------------------------------------------------------------------------

    def add_sampler(
        self,
        tenant: str,
        sampler_id: str,
        session_id: str | None,
        base_model: str,
        model_path: str | None,
        source_model_id: str | None = None,
    ) -> None:
        row = Sampler(
            id=sampler_id,
            tenant_id=tenant,
            session_id=session_id,
            base_model=base_model,
            model_path=model_path,
            source_model_id=source_model_id,
        )
        try:
            with self._db.transaction() as session:
                session.add(row)
        except IntegrityError:
            self.sampler(tenant, sampler_id)  # a retry of the same tenant's; anyone else's is unknown to them

    def join_sampler(self, tenant: str, sampler_id: str) -> int:
        """The next clone number of the tenant's sampling session (the original client is 0)."""
        self.sampler(tenant, sampler_id)
        take = update(Sampler).where(Sampler.id == sampler_id, Sampler.clones < MAX_CLONES)
        with self._db.transaction() as session:
            counter = session.execute(take.values(clones=Sampler.clones + 1).returning(Sampler.clones)).scalar()
        if counter is None:
            raise UserError(f"sampling session {sampler_id!r} has handed out all {MAX_CLONES} clone numbers")
        return counter

    def sampler(self, tenant: str, sampler_id: str) -> Sampler:
        with self._db.reading() as session:
            row = _owned(session.get(Sampler, sampler_id), tenant, f"unknown sampling session {sampler_id!r}")
            if row.removed_at is not None:
                raise NotFoundError(f"unknown sampling session {sampler_id!r}")
            return row

    def live_samplers(self, tenant: str, session_id: str | None = None) -> list[str]:
        query = select(Sampler.id).where(Sampler.tenant_id == tenant, Sampler.removed_at.is_(None))
        if session_id is not None:
            query = query.where(Sampler.session_id == session_id)
        with self._db.reading() as session:
            return list(session.scalars(query))

    def live_samplers_of(self, base_model: str) -> list[Sampler]:
        """Every tenant's live sampling sessions on a base model (for a restarted deployment)."""
        query = select(Sampler).where(Sampler.base_model == base_model, Sampler.removed_at.is_(None))
        with self._db.reading() as session:
            return list(session.scalars(query))

    def remove_sampler(self, sampler_id: str) -> None:
        with self._db.transaction() as session:
            row = session.get(Sampler, sampler_id)
            if row is not None and row.removed_at is None:
                row.removed_at = utc_now()

    # ---- checkpoints ----------------------------------------------------------------------------

    def add_checkpoint(self, tenant: str, row: Checkpoint) -> Checkpoint:
        """Record (or replace, for a save under the same name) a checkpoint whose files are in place."""
        row.tenant_id = tenant
        with self._db.transaction() as session:
            old = _checkpoint_row(session, row.training_run_id, row.segment, row.name, live_only=False)
            if old is not None:
                session.delete(old)
                session.flush()
            session.add(row)
        return row

    def checkpoint(self, tenant: str, run_id: str, segment: str, name: str) -> Checkpoint:
        with self._db.reading() as session:
            row = _checkpoint_row(session, run_id, segment, name)
            return _owned(row, tenant, f"unknown checkpoint tinker://{run_id}/{segment}/{name}")

    def find_checkpoint(self, run_id: str, segment: str, name: str) -> Checkpoint | None:
        """Any tenant's live checkpoint: for the operator's command line, the expiry sweep and signed
        links (whose signature is the authorisation); never to answer a client's lookup by name."""
        with self._db.reading() as session:
            return _checkpoint_row(session, run_id, segment, name)

    def checkpoints(self, tenant: str, run_id: str | None = None, offset: int = 0, limit: int = 1000):
        """The tenant's checkpoints (of one run, or all), newest first, and how many there are."""
        query = select(Checkpoint).where(Checkpoint.tenant_id == tenant, _unexpired())
        if run_id is not None:
            query = query.where(Checkpoint.training_run_id == run_id)
        with self._db.reading() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery()))
            order = (Checkpoint.created_at.desc(), Checkpoint.id.desc())
            rows = session.scalars(query.order_by(*order).offset(offset).limit(limit))
            return list(rows), int(total or 0)

    def delete_checkpoint(self, tenant: str, run_id: str, segment: str, name: str) -> None:
        with self._db.transaction() as session:
            row = _checkpoint_row(session, run_id, segment, name)
            session.delete(_owned(row, tenant, f"unknown checkpoint tinker://{run_id}/{segment}/{name}"))

    def readable_checkpoint(self, tenant: str, run_id: str, segment: str, name: str) -> Checkpoint:
        """A checkpoint `tenant` may load: its own, or one its owner published (else unknown)."""
        with self._db.reading() as session:
            row = _checkpoint_row(session, run_id, segment, name)
            if row is not None and row.public:
                return row
            return _owned(row, tenant, f"unknown checkpoint tinker://{run_id}/{segment}/{name}")

    def accessible_run(self, tenant: str, run_id: str) -> tuple[TrainingRun, list[Checkpoint]]:
        """A run `tenant` may see with access_scope=accessible: its own (all checkpoints, newest
        first), or another tenant's with published checkpoints (those only). Else unknown."""
        with self._db.reading() as session:
            run = session.get(TrainingRun, run_id)
            if run is not None and run.tenant_id != tenant:
                query = select(Checkpoint).where(Checkpoint.training_run_id == run_id, Checkpoint.public, _unexpired())
                public = list(session.scalars(query.order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())))
                if public:
                    return run, public
        run = self.run(tenant, run_id)
        return run, self.checkpoints(tenant, run_id)[0]

    def set_checkpoint_public(self, tenant: str, run_id: str, segment: str, name: str, public: bool) -> None:
        """Publish or unpublish (the owner only; idempotent)."""
        with self._db.transaction() as session:
            row = _checkpoint_row(session, run_id, segment, name)
            _owned(row, tenant, f"unknown checkpoint tinker://{run_id}/{segment}/{name}").public = public

    def set_checkpoint_expiry(
        self, tenant: str, run_id: str, segment: str, name: str, expires_at: datetime | None
    ) -> None:
        with self._db.transaction() as session:
            row = _checkpoint_row(session, run_id, segment, name)
            _owned(row, tenant, f"unknown checkpoint tinker://{run_id}/{segment}/{name}").expires_at = expires_at

    def take_expired_checkpoints(self, limit: int = 100) -> list[tuple[str, str, str, str]]:
        """Remove up to `limit` expired checkpoints' records; (tenant, run, segment, name) of each,
        for their files to go next."""
        query = select(Checkpoint).where(Checkpoint.expires_at <= utc_now()).limit(limit)
        with self._db.transaction() as session:
            rows = list(session.scalars(query))
            for row in rows:
                session.delete(row)
            return [(r.tenant_id, r.training_run_id, r.segment, r.name) for r in rows]

    # ---- usage ----------------------------------------------------------------------------------

    def add_usage(self, tenant: str, session_id: str | None, base_model: str, kind: str, amount: int) -> None:
        """Count `amount` of `kind` (tokens_trained, tokens_sampled) in the current hour's bucket."""
        if amount <= 0:
            return
        now = utc_now()
        bucket = now.replace(minute=0, second=0, microsecond=0)
        values = dict(
            tenant_id=tenant, session_id=session_id or "", base_model=base_model, kind=kind, bucket_start=bucket
        )
        insert = postgresql.insert if self._db.dialect == "postgresql" else sqlite.insert
        statement = insert(Usage).values(**values, amount=amount)
        statement = statement.on_conflict_do_update(
            index_elements=["tenant_id", "session_id", "base_model", "kind", "bucket_start"],
            set_={"amount": Usage.amount + statement.excluded.amount},
        )
        with self._db.transaction() as session:
            session.execute(statement)

    def usage(self, tenant: str, since: datetime | None = None) -> dict[str, int]:
        """Totals per kind since `since` (default: 30 days), plus the bytes of stored checkpoints."""
        since = since or utc_now() - timedelta(days=30)
        with self._db.reading() as session:
            totals = session.execute(
                select(Usage.kind, func.sum(Usage.amount))
                .where(Usage.tenant_id == tenant, Usage.bucket_start >= since)
                .group_by(Usage.kind)
            ).all()
            stored = session.scalar(select(func.sum(Checkpoint.size_bytes)).where(Checkpoint.tenant_id == tenant))
        usage = {"tokens_trained": 0, "tokens_sampled": 0}
        usage.update({kind: int(amount) for kind, amount in totals})
        usage["checkpoint_bytes"] = int(stored or 0)
        return usage

    def usage_buckets(self, tenant: str, start: datetime, end: datetime) -> list[Usage]:
        """The tenant's hourly usage rows with start <= bucket_start < end."""
        query = (
            select(Usage)
            .where(Usage.tenant_id == tenant, Usage.bucket_start >= start, Usage.bucket_start < end)
            .order_by(Usage.bucket_start, Usage.id)
        )
        with self._db.reading() as session:
            return list(session.scalars(query))

    def session_metadata(self, tenant: str, session_ids: list[str]) -> dict[str, dict[str, Any]]:
        query = select(Session.id, Session.user_metadata).where(
            Session.tenant_id == tenant, Session.id.in_(session_ids)
        )
        with self._db.reading() as session:
            return {sid: dict(metadata or {}) for sid, metadata in session.execute(query)}

    def checkpoint_events(self, tenant: str, start: datetime | None, end: datetime | None) -> list[Checkpoint]:
        """The tenant's live checkpoints saved in [start, end) (all when None), oldest first."""
        query = select(Checkpoint).where(Checkpoint.tenant_id == tenant, _unexpired())
        if start is not None:
            query = query.where(Checkpoint.created_at >= start, Checkpoint.created_at < end)
        with self._db.reading() as session:
            return list(session.scalars(query.order_by(Checkpoint.created_at, Checkpoint.id)))


def finished_message(row: Session) -> str:
    how = "expired: no heartbeat from its client" if row.finish_reason == EXPIRED else "finished by its client"
    return f"session {row.id!r} is {how}; start a new session"


def _clean(text: str | None, length: int) -> str | None:
    """A client's free text for a column: cut to length, lone surrogates replaced; None if empty."""
    return (text or "")[:length].encode("utf-8", "replace").decode() or None


def _checkpoint_row(session, run_id: str, segment: str, name: str, live_only: bool = True) -> Checkpoint | None:
    """The checkpoint's record; an expired one reads as absent unless `live_only` is off."""
    query = select(Checkpoint).where(
        Checkpoint.training_run_id == run_id, Checkpoint.segment == segment, Checkpoint.name == name
    )
    if live_only:
        query = query.where(_unexpired())
    return session.scalars(query).one_or_none()


def _unexpired():
    return or_(Checkpoint.expires_at.is_(None), Checkpoint.expires_at > utc_now())


def _owned(row, tenant: str, missing: str):
    """The row if `tenant` owns it; else the same NotFoundError as for a row that does not exist."""
    if row is None or row.tenant_id != tenant:
        raise NotFoundError(missing)
    return row
