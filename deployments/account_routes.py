"""Who is calling and what they used: `auth/apikey/me` (CLI `tinker auth login` / `logout`), the
usage routes fed by the tenants' hourly usage counts, and the audit log (AdminClient).

- `GET auth/apikey/me` describes the calling key; `DELETE` revokes that key and no other (in open
  mode too: a revoked key authenticates no more).
- `billing/usage/events`: the tenant's tokens trained and sampled per hour, session and base model,
  for an hour-aligned window of at most 14 days. Thinker prices nothing, so no cost fields.
- `billing/usage/checkpoints/current`: the tenant's stored checkpoints, count and bytes.
- `audit`: the tenant's checkpoint saves (from the metadata database), per day if asked.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi import Request

from configs.errors import AuthenticationError, UserError
from deployments.tenancy import Tenancy, Tenant

MAX_USAGE_WINDOW = timedelta(days=14)
EVENT_KINDS = {"tokens_trained": "training", "tokens_sampled": "sampling_sample"}
AUDIT_TYPES = ("all", "checkpoints", "projects", "teams", "organizations")


class AccountRoutes:
    def __init__(self, tenancy: Tenancy):
        self._tenancy = tenancy
        self._registry = tenancy.registry
        self._tenants = tenancy.tenants

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("GET", "/api/v1/auth/apikey/me", self.who_am_i),
            ("DELETE", "/api/v1/auth/apikey/me", self.log_out),
            ("GET", "/api/v1/billing/usage/events", self.usage_events),
            ("GET", "/api/v1/billing/usage/checkpoints/current", self.checkpoint_usage),
            ("GET", "/api/v1/audit", self.audit),
        ]

    async def who_am_i(self, request: Request, tenant: Tenant) -> dict:
        record = await self._tenancy.run(self._tenants.key_record, _key(request))
        return {
            "key_id": record.id,
            "name": record.name or f"{record.prefix or 'key'}...",
            "note": "",
            "details": {"org_details": {"name": record.tenant_id}, "user_details": {"email": ""}},
        }

    async def log_out(self, request: Request, tenant: Tenant) -> dict:
        await self._tenancy.run(self._tenants.revoke_key, _key(request))
        return {}

    async def usage_events(self, tenant: Tenant, starting_on: datetime, ending_before: datetime) -> dict:
        try:
            start, end = _aware(starting_on), _aware(ending_before)
            end + timedelta(hours=1)
        except OverflowError:
            raise UserError("starting_on / ending_before are out of range") from None
        if start.minute or start.second or start.microsecond or end.minute or end.second or end.microsecond:
            raise UserError("starting_on and ending_before must be whole hours (UTC)")
        if not start < end or end - start > MAX_USAGE_WINDOW or start > datetime.now(UTC):
            raise UserError("the window must start no later than now and span at most 14 days")
        rows = await self._tenancy.run(self._registry.usage_buckets, tenant, start, end)
        sessions = sorted({r.session_id for r in rows if r.session_id})
        metadata = await self._tenancy.run(self._registry.session_metadata, tenant, sessions)
        data = [
            {
                "bucket_start": _iso(r.bucket_start),
                "bucket_end": _iso(r.bucket_start + timedelta(hours=1)),
                "base_model": r.base_model,
                "session_id": r.session_id or None,
                "event_info": {"type": EVENT_KINDS.get(r.kind, r.kind), "token_count": int(r.amount)},
            }
            for r in rows
            if r.kind in EVENT_KINDS
        ]
        described = {
            sid: ({"user_metadata": {k: str(v) for k, v in m.items()}} if m else {}) for sid, m in metadata.items()
        }
        return {"data": data, "sessions": described, "cost_data_through": _iso(datetime.now(UTC))}

    async def checkpoint_usage(self, tenant: Tenant, project_id: str | None = None) -> dict:
        rows = await self._tenancy.run(self._registry.checkpoint_events, tenant, None, None)
        size = sum(r.size_bytes for r in rows)
        return {"data": [{"checkpoint_count": len(rows), "size_bytes": size, "size_gigabytes": size / 1e9}]}

    async def audit(self, tenant: Tenant, event_type: str = "all", day: date | None = None) -> dict:
        if event_type not in AUDIT_TYPES:
            raise UserError(f"event_type must be one of {list(AUDIT_TYPES)}")
        if event_type not in ("all", "checkpoints"):
            return {"entries": []}  # Thinker has no projects, teams or organizations to audit
        start = datetime(day.year, day.month, day.day, tzinfo=UTC) if day is not None else None
        try:
            end = start + timedelta(days=1) if start is not None else None
        except OverflowError:
            raise UserError("day is out of range") from None
        rows = await self._tenancy.run(self._registry.checkpoint_events, tenant, start, end)
        entries = [
            {
                "timestamp": _iso(r.created_at),
                "event": "checkpoint_saved",
                "event_details": {"segment": r.segment, "name": r.name, "size_bytes": r.size_bytes},
                "model_id": r.training_run_id,
                "tinker_path": f"tinker://{r.training_run_id}/{r.segment}/{r.name}",
            }
            for r in rows
        ]
        return {"entries": entries}


def _key(request: Request) -> str:
    key = request.headers.get("x-api-key")
    if not key:
        raise AuthenticationError("auth/apikey/me needs the API key to describe (X-API-Key)")
    return key


def _aware(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _iso(at: datetime) -> str:
    return _aware(at).isoformat().replace("+00:00", "Z")
