"""The sessions REST routes (RestClient: list_sessions, get_session, search_sessions, ...).

- A session is its tenant's: another tenant's reads as unknown (404), and no listing or search
  shows it (`access_scope=accessible` and the search's `accessible` owner see the same as `owned`:
  Thinker has no sharing between tenants).
- A session's status: `active` until its client finishes it, then `client_finished` with the
  first reason it gave (success, errored, interrupted); `cancelled` if the server expired it (no
  heartbeat for `session_expiry_s`). Thinker never fails a session on its own, so `failed`
  matches nothing.
- `trace_export` answers `failed`: Thinker records no Perfetto traces.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from sqlalchemy import and_, false, or_, select

from actors import ids
from actors.metadata.registry import EXPIRED
from actors.metadata.tables import Session
from configs.errors import UserError
from deployments import wire
from deployments.tenancy import Tenancy, Tenant

DEFAULT_PROJECT = "default"  # the project of a session created without one (SessionSummary requires one)
MAX_METADATA_SCAN = 10_000  # sessions a user_metadata search looks through (newest first)


def _text(value: Any) -> Any:
    """Lone surrogates (valid JSON, not valid UTF-8) replaced, so no database rejects the text."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode()
    if isinstance(value, list):
        return [_text(v) for v in value]
    if isinstance(value, dict):
        return {_text(k): _text(v) for k, v in value.items()}
    return value


class SearchCursor(wire.WireIn):
    last_created_at: datetime
    last_session_id: str = Field(max_length=256)

    @field_validator("last_created_at")
    @classmethod
    def _aware(cls, at: datetime) -> datetime:
        return at.replace(tzinfo=UTC) if at.tzinfo is None else at


class SearchOwner(wire.WireIn):
    type: Literal["own", "accessible", "user"] = "own"
    owner_urns: list[str] | None = Field(None, max_length=10)


class StatusQuery(wire.WireIn):
    type: Literal["active", "cancelled", "failed", "client_finished"]
    reasons: list[Literal["success", "errored", "interrupted"]] | None = None


class SearchRequest(wire.WireIn):
    session_id: str | None = Field(None, max_length=256)
    project_ids: list[str] | None = Field(None, max_length=100)
    user_metadata: dict[str, str] = Field(default_factory=dict, max_length=32)
    display_name: str | None = Field(None, max_length=256)
    owner: SearchOwner = Field(default_factory=SearchOwner)
    statuses: list[StatusQuery] | None = Field(None, max_length=10)
    limit: int = Field(50, ge=1, le=200)
    cursor: SearchCursor | None = None

    @model_validator(mode="before")
    @classmethod
    def _clean_text(cls, values: Any) -> Any:
        return _text(values)


class ProjectRequest(wire.WireIn):
    project_id: str = Field(min_length=1, max_length=128)


class FinishRequest(wire.WireIn):
    reason: dict[str, Any] | None = None
    detail: str | None = None

    def reason_type(self) -> str | None:
        kind = (self.reason or {}).get("type")
        return kind if kind in ("success", "errored", "interrupted") else None


class SessionRoutes:
    def __init__(self, tenancy: Tenancy):
        self._tenancy = tenancy
        self._registry = tenancy.registry

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("GET", "/api/v1/sessions", self.list_sessions),
            ("POST", "/api/v1/sessions/search", self.search),
            ("GET", "/api/v1/sessions/{session_id}", self.get_session),
            ("PUT", "/api/v1/sessions/{session_id}/project", self.set_project),
            ("GET", "/api/v1/sessions/{session_id}/trace_export", self.trace_export),
        ]

    async def list_sessions(
        self, tenant: Tenant, limit: int = 20, offset: int = 0, access_scope: str = "owned"
    ) -> dict:
        if not (1 <= limit <= 1000 and 0 <= offset <= 10**9) or access_scope not in ("owned", "accessible"):
            raise UserError("limit must be in [1, 1000], offset in [0, 10^9], access_scope owned or accessible")
        rows = await self._tenancy.run(self._registry.sessions, tenant, offset, limit)
        return {"sessions": [row.id for row in rows]}

    async def get_session(self, session_id: str, tenant: Tenant, access_scope: str = "owned") -> dict:
        ids.check_id(session_id, "session_id")
        row, runs, samplers = await self._tenancy.run(self._registry.session_contents, tenant, session_id)
        answer = {"training_run_ids": runs, "sampler_ids": samplers}
        if row.user_metadata:
            answer["user_metadata"] = {str(k): str(v) for k, v in row.user_metadata.items()}
        if row.display_name:
            answer["display_name"] = row.display_name
        return answer

    async def set_project(self, session_id: str, body: ProjectRequest, tenant: Tenant) -> dict:
        ids.check_id(session_id, "session_id")
        await self._tenancy.run(self._registry.set_session_project, tenant, session_id, body.project_id)
        return {}

    async def trace_export(self, session_id: str, tenant: Tenant) -> dict:
        await self._tenancy.run(self._registry.session, tenant, ids.check_id(session_id, "session_id"))
        return {"status": "failed", "error": "this server (Thinker) does not record Perfetto traces of sessions"}

    async def search(self, body: SearchRequest, tenant: Tenant) -> dict:
        query = _search_query(body, tenant)
        if query is None:
            return {"sessions": [], "next_cursor": None}
        rows = await self._tenancy.run(self._registry.search_sessions, tenant, query)
        wanted = body.user_metadata.items()
        rows = [r for r in rows if all(k in r.user_metadata and str(r.user_metadata[k]) == v for k, v in wanted)]
        page, more = rows[: body.limit], len(rows) > body.limit
        totals = await self._tenancy.run(self._registry.checkpoint_totals, tenant, [r.id for r in page])
        sessions = [_summary(row, totals.get(row.id, (0, 0))) for row in page]
        cursor = None
        if more:
            cursor = {"last_created_at": page[-1].created_at.isoformat(), "last_session_id": page[-1].id}
        return {"sessions": sessions, "next_cursor": cursor}


def _search_query(body: SearchRequest, tenant: str):
    """The search as SQL, newest first (None: it can match nothing)."""
    if body.owner.type == "user" and tenant not in (body.owner.owner_urns or []):
        return None
    query = select(Session)
    named = []
    if body.session_id is not None:
        named.append(Session.id == body.session_id)
    if body.display_name:
        words = body.display_name.lower().split()
        named.append(and_(*(Session.display_name.ilike(f"%{_escape(w)}%", escape="\\") for w in words)))
    if named:
        query = query.where(or_(*named))  # session_id and display_name: either
    if body.project_ids is not None:
        projects = list(body.project_ids)
        unset = Session.project_id.is_(None) if DEFAULT_PROJECT in projects else false()
        query = query.where(or_(Session.project_id.in_(projects), unset))
    if body.statuses is not None:
        query = query.where(or_(*(_status_clause(s) for s in body.statuses)))
    if body.cursor is not None:
        at, last = body.cursor.last_created_at, body.cursor.last_session_id
        query = query.where(or_(Session.created_at < at, and_(Session.created_at == at, Session.id < last)))
    limit = body.limit + 1 if not body.user_metadata else MAX_METADATA_SCAN  # metadata is matched after
    return query.order_by(Session.created_at.desc(), Session.id.desc()).limit(limit)


def _status_clause(status: StatusQuery):
    if status.type == "active":
        return Session.finished_at.is_(None)
    if status.type == "client_finished":
        finished = and_(Session.finished_at.is_not(None), Session.finish_reason.is_distinct_from(EXPIRED))
        return and_(finished, Session.finish_reason.in_(status.reasons)) if status.reasons else finished
    if status.type == "cancelled":
        return Session.finish_reason == EXPIRED
    return false()  # failed: Thinker never fails a session on its own


def _summary(row: Session, totals: tuple[int, int]) -> dict:
    status: dict[str, Any] = {"type": "active"}
    if row.finish_reason == EXPIRED:
        status = {"type": "cancelled", "detail": row.finish_detail}
    elif row.finished_at is not None:
        status = {"type": "client_finished", "reason": {"type": row.finish_reason or "success"}}
        if row.finish_detail:
            status["detail"] = row.finish_detail
    summary = {
        "session_id": row.id,
        "created_at": row.created_at.isoformat(),
        "owner": row.tenant_id,
        "project_id": row.project_id or DEFAULT_PROJECT,
        "status": status,
        "checkpoints_count": totals[0],
        "checkpoint_storage_bytes": totals[1],
    }
    if row.display_name:
        summary["display_name"] = row.display_name
    if row.user_metadata:
        summary["user_metadata"] = {str(k): str(v) for k, v in row.user_metadata.items()}
    return summary


def _escape(word: str) -> str:
    return word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
