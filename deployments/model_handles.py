"""Which model deployment serves an id: base model names, training model ids, sampler ids.

- A training model or sampler is found through its record in the metadata database, which also
  says who owns it: another tenant's id is a 404, worded as for an id that does not exist.
- Model descriptions (vocab, context length, tokenizer) are fetched once per replica.
- `states` never waits on a model that is loading, cannot be placed or failed: a model that does
  not describe itself within a moment is reported "loading" (with what Serve says of its
  deployment, e.g. replicas it cannot schedule) or "failed", so capabilities and health answer
  at once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from actors import ids
from actors.work import ModelDescription
from configs.errors import NotFoundError
from deployments.tenancy import Tenancy

SERVE_MESSAGE_WAIT_S = 1.0


class ModelHandles:
    def __init__(self, handles: dict[str, Any], tenancy: Tenancy):
        self._handles = handles  # base model name -> DeploymentHandle of its ModelActor
        self._tenancy = tenancy
        self._descriptions: dict[str, ModelDescription] = {}
        self._describing: dict[str, asyncio.Task] = {}  # one call in flight per model, however many ask

    @property
    def names(self) -> list[str]:
        return list(self._handles)

    def all(self) -> list[Any]:
        return list(self._handles.values())

    def base(self, base_model: str) -> Any:
        handle = self._handles.get(base_model)
        if handle is None:
            raise NotFoundError(f"unknown base model {base_model!r:.200}; this server has {sorted(self._handles)}")
        return handle

    async def of_model(self, tenant: str, model_id: str) -> Any:
        """The deployment of a live training model `tenant` owns."""
        return self.base(await self.base_of_model(tenant, model_id))

    async def of_sampler(self, tenant: str, sampler_id: str) -> Any:
        """The deployment that samples `sampler_id`: a base model name, or a sampler `tenant` owns."""
        return self.base(await self.base_of_sampler(tenant, sampler_id))

    async def base_of_model(self, tenant: str, model_id: str) -> str:
        registry = self._tenancy.registry
        run = await self._tenancy.run(registry.live_run, tenant, ids.check_id(model_id, "model_id"))
        return run.base_model

    async def base_of_sampler(self, tenant: str, sampler_id: str) -> str:
        if sampler_id in self._handles:
            return sampler_id
        registry = self._tenancy.registry
        sampler = await self._tenancy.run(registry.sampler, tenant, ids.check_id(sampler_id, "sampling_session_id"))
        return sampler.base_model

    async def describe(self, base_model: str) -> ModelDescription:
        if base_model in self._descriptions:
            return self._descriptions[base_model]
        task = self._describing.get(base_model)
        if task is None:
            task = self._describing[base_model] = asyncio.ensure_future(self._describe(base_model))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if no one waits
        return await asyncio.shield(task)  # a caller that stops waiting leaves the call to the others

    async def _describe(self, base_model: str) -> ModelDescription:
        try:
            self._descriptions[base_model] = await self.base(base_model).describe.remote()
            return self._descriptions[base_model]
        finally:
            self._describing.pop(base_model, None)  # a failed call is made again by the next caller

    async def states(self, wait_s: float, detail: bool = True) -> list[ModelState]:
        """Every base model's state, waiting at most `wait_s` for the ones not described yet; with
        `detail`, what Serve says of a model still loading (asked for at most SERVE_MESSAGE_WAIT_S)."""

        async def state(name: str) -> ModelState:
            try:
                return ModelState(name, "ready", await asyncio.wait_for(self.describe(name), wait_s))
            except TimeoutError:
                message = None
                if detail:
                    asking = asyncio.to_thread(_serve_message, self._handles[name])
                    try:
                        message = await asyncio.wait_for(asking, SERVE_MESSAGE_WAIT_S)
                    except TimeoutError:
                        pass
                return ModelState(name, "loading", None, message)
            except Exception as exc:  # its replica failed to start (Serve retries it)
                return ModelState(name, "failed", None, f"{type(exc).__name__}: {str(exc)[:300]}")

        return list(await asyncio.gather(*(state(n) for n in self.names)))


@dataclass(frozen=True)
class ModelState:
    name: str
    state: str  # ready | loading | failed
    description: ModelDescription | None = None
    detail: str | None = None


def _serve_message(handle: Any) -> str | None:
    """What Serve says of the deployment behind `handle` (e.g. replicas it cannot schedule), if anything."""
    try:
        from ray import serve

        app = serve.status().applications.get(handle.app_name)
        deployment = app.deployments.get(handle.deployment_name) if app is not None else None
        return (deployment.message or None) if deployment is not None else None
    except Exception:  # no Serve controller to ask (tests of the routes alone)
        return None
