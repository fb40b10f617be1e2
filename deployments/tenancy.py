"""The ingress side of tenants: who is asking (X-API-Key) and what they own.

- The ingress middleware authenticates every request but the health checks and the API docs, and
  puts the tenant id on `request.state`; routes receive it as a `Tenant` parameter.
- Ownership questions go to the metadata `Registry`, run in a thread (the database calls are
  synchronous), so an answer never blocks the event loop.
- Another tenant's id is answered exactly like an unknown one (404).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from actors.metadata.database import Database, default_url
from actors.metadata.registry import Registry
from actors.metadata.tenants import Tenants
from actors.work import LoraSpec
from configs.errors import LimitExceededError
from configs.schema import ThinkerConfig

logger = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/healthz", "/api/v1/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect"})
PUBLIC_PREFIXES = ("/api/v1/checkpoint_files/",)  # signed download links: the link is the authorisation
T = TypeVar("T")


def request_tenant(request: Request) -> str:
    return request.state.tenant


Tenant = Annotated[str, Depends(request_tenant)]  # a route parameter: the caller's tenant id


class Tenancy:
    def __init__(self, config: ThinkerConfig):
        self.database = Database(config.database_url or default_url(config.cache_dir))
        self.database.migrate()
        self.tenants = Tenants(self.database, config.auth.mode)
        self.registry = Registry(self.database)
        self.quotas = config.quotas
        self.mode = config.auth.mode

    async def authenticate(self, api_key: str | None) -> str:
        return await self.run(self.tenants.authenticate, api_key)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """A registry call, off the event loop."""
        return await asyncio.to_thread(fn, *args)

    async def record_run(
        self, tenant: str, run_id: str, session_id: str | None, base_model: str, lora: LoraSpec, metadata: dict
    ) -> None:
        """Record a training run (its owner) before its adapter exists; a new one counts against
        the tenant's quota, a retry of the tenant's own does not."""
        if not await self.run(self.registry.run_exists, tenant, run_id):
            await self.check_adapter_quota(tenant)
        await self.run(self.registry.add_run, tenant, run_id, session_id, base_model, lora, metadata)

    async def check_adapter_quota(self, tenant: str) -> None:
        live = await self.run(self.registry.live_runs, tenant)
        _check_quota(len(live), self.quotas.max_adapters, "training models", "max_adapters", "unload one first")

    async def check_sampler_quota(self, tenant: str) -> None:
        live = await self.run(self.registry.live_samplers, tenant)
        _check_quota(len(live), self.quotas.max_samplers, "sampling sessions", "max_samplers", "finish a session")

    def warn_if_exposed(self, host: str | None) -> None:
        """A loud warning when open mode (any key is a tenant) listens beyond this machine."""
        if self.mode != "open" or host is None or _is_loopback(host):
            return
        logger.warning(
            "=" * 72 + "\nThinker is listening on %s with auth.mode: open: ANYONE who can reach this address can "
            "train, sample and store checkpoints here. Set auth.mode: keys and issue keys with "
            "`thinker keys create --tenant NAME`.\n" + "=" * 72,
            host,
        )


def _check_quota(live: int, limit: int, what: str, field: str, remedy: str) -> None:
    if live >= limit:
        raise LimitExceededError(
            f"this tenant already holds {live} {what}, its limit (quotas.{field} = {limit}); {remedy}"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
