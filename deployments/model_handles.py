"""Which model deployment serves an id: base model names, training model ids, sampler ids.

- The ingress learns an id's base model when it creates the model or sampler; on another replica
  (or after a restart) it asks every model deployment once and remembers the answer.
- Model descriptions (vocab, context length, tokenizer) are fetched once per replica.
"""

from __future__ import annotations

import asyncio
from typing import Any

from actors import ids
from actors.work import ModelDescription
from configs.errors import NotFoundError


class ModelHandles:
    def __init__(self, handles: dict[str, Any]):
        self._handles = handles  # base model name -> DeploymentHandle of its ModelActor
        self._base_of: dict[str, str] = {}  # training model / sampler id -> base model name
        self._descriptions: dict[str, ModelDescription] = {}

    @property
    def names(self) -> list[str]:
        return list(self._handles)

    def all(self) -> list[Any]:
        return list(self._handles.values())

    def base(self, base_model: str) -> Any:
        handle = self._handles.get(base_model)
        if handle is None:
            raise NotFoundError(f"unknown base model {base_model!r}; this server has {sorted(self._handles)}")
        return handle

    def remember(self, owned_id: str, base_model: str) -> None:
        self._base_of[owned_id] = base_model

    def forget(self, owned_id: str) -> None:
        self._base_of.pop(owned_id, None)

    async def model_exists(self, model_id: str) -> bool:
        """Asks every base model (no cache): training model ids are unique across all of them."""
        ids.check_id(model_id, "model_id")
        return any(await asyncio.gather(*(h.has_model.remote(model_id) for h in self._handles.values())))

    async def of_model(self, model_id: str) -> Any:
        return await self._owner(model_id, "has_model", "model_id")

    async def of_sampler(self, sampler_id: str) -> Any:
        if sampler_id in self._handles:  # a base model name samples the base model
            return self._handles[sampler_id]
        return await self._owner(sampler_id, "has_sampler", "sampling session")

    async def base_name_of_model(self, model_id: str) -> str:
        await self.of_model(model_id)
        return self._base_of[model_id]

    async def _owner(self, owned_id: str, question: str, what: str) -> Any:
        ids.check_id(owned_id, what)
        base = self._base_of.get(owned_id)
        if base is None:
            names = self.names
            answers = await asyncio.gather(*(getattr(self._handles[n], question).remote(owned_id) for n in names))
            base = next((n for n, yes in zip(names, answers) if yes), None)
            if base is None:
                raise NotFoundError(f"unknown {what} {owned_id!r}")
            self._base_of[owned_id] = base
        return self._handles[base]

    async def describe(self, base_model: str) -> ModelDescription:
        if base_model not in self._descriptions:
            self._descriptions[base_model] = await self.base(base_model).describe.remote()
        return self._descriptions[base_model]

    async def describe_all(self) -> list[ModelDescription]:
        return list(await asyncio.gather(*(self.describe(n) for n in self.names)))
