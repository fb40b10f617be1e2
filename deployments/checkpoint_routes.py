"""The REST routes over training runs and checkpoints (RestClient, cookbook resume checks).

- Listings read the metadata database: each tenant sees its own runs and checkpoints only, and
  another tenant's run or checkpoint answers 404 like an unknown one.
- A delete removes the database record first (nothing lists it any more), then the files.
"""

from typing import Any

from actors import ids
from actors.checkpoint_store import SEGMENTS, CheckpointStore, parse_tinker_path, tinker_path
from actors.metadata.tables import Checkpoint, TrainingRun
from actors.work import LoraSpec
from configs.errors import UserError
from deployments import wire
from deployments.tenancy import Tenancy, Tenant


def checkpoint_wire(row: Checkpoint) -> wire.Checkpoint:
    metadata = {k: str(v) for k, v in row.user_metadata.items()} or None
    return wire.Checkpoint(
        checkpoint_id=f"{row.segment}/{row.name}",
        checkpoint_type=SEGMENTS[row.segment],
        time=row.created_at.isoformat(),
        tinker_path=tinker_path(row.training_run_id, row.segment, row.name),
        size_bytes=row.size_bytes,
        user_metadata=metadata,
    )


def run_wire(run: TrainingRun, checkpoints: list[Checkpoint]) -> wire.TrainingRun:
    """`checkpoints` newest first."""
    training = [c for c in checkpoints if c.segment == "weights"]
    sampler = [c for c in checkpoints if c.segment == "sampler_weights"]
    return wire.TrainingRun(
        training_run_id=run.id,
        base_model=run.base_model,
        model_owner=run.tenant_id,
        lora_rank=LoraSpec(**run.lora).rank,
        last_request_time=max([run.created_at] + [c.created_at for c in checkpoints]).isoformat(),
        last_checkpoint=checkpoint_wire(training[0]) if training else None,
        last_sampler_checkpoint=checkpoint_wire(sampler[0]) if sampler else None,
        user_metadata={k: str(v) for k, v in run.user_metadata.items()} or None,
    )


class CheckpointRoutes:
    def __init__(self, tenancy: Tenancy, store: CheckpointStore):
        self._tenancy = tenancy
        self._registry = tenancy.registry
        self._store = store

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("GET", "/api/v1/training_runs", self.list_training_runs),
            ("GET", "/api/v1/training_runs/{run_id}", self.get_training_run),
            ("GET", "/api/v1/training_runs/{run_id}/checkpoints", self.list_checkpoints),
            ("DELETE", "/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}", self.delete_checkpoint),
            ("GET", "/api/v1/checkpoints", self.list_user_checkpoints),
            ("POST", "/api/v1/weights_info", self.weights_info),
        ]

    async def list_training_runs(self, tenant: Tenant, limit: int = 20, offset: int = 0) -> dict:
        limit, offset = _page(limit, offset)
        runs, total = await self._tenancy.run(self._registry.runs, tenant, offset, limit, True)
        listed = [await self._run_wire(tenant, run) for run in runs]
        cursor = wire.Cursor(offset=offset, limit=limit, total_count=total)
        return wire.TrainingRunsResponse(training_runs=listed, cursor=cursor).model_dump(exclude_none=True)

    async def get_training_run(self, run_id: str, tenant: Tenant) -> dict:
        run = await self._tenancy.run(self._registry.run, tenant, ids.check_id(run_id, "training run id"))
        return (await self._run_wire(tenant, run)).model_dump(exclude_none=True)

    async def list_checkpoints(self, run_id: str, tenant: Tenant) -> dict:
        await self._tenancy.run(self._registry.run, tenant, ids.check_id(run_id, "training run id"))
        rows, _ = await self._tenancy.run(self._registry.checkpoints, tenant, run_id)
        rows.reverse()  # oldest first, as the listing always was
        return wire.CheckpointsListResponse(checkpoints=[checkpoint_wire(r) for r in rows]).model_dump(
            exclude_none=True
        )

    async def delete_checkpoint(self, run_id: str, checkpoint_id: str, tenant: Tenant) -> dict:
        segment, _, name = checkpoint_id.partition("/")
        run_id, segment, name = parse_tinker_path(tinker_path(run_id, segment, name))
        await self._tenancy.run(self._registry.delete_checkpoint, tenant, run_id, segment, name)
        await self._tenancy.run(self._store.delete, tenant, run_id, segment, name)
        return {}

    async def list_user_checkpoints(self, tenant: Tenant, limit: int = 100, offset: int = 0) -> dict:
        limit, offset = _page(limit, offset)
        rows, total = await self._tenancy.run(self._registry.checkpoints, tenant, None, offset, limit)
        cursor = wire.Cursor(offset=offset, limit=limit, total_count=total)
        listed = [checkpoint_wire(r) for r in rows]
        return wire.CheckpointsListResponse(checkpoints=listed, cursor=cursor).model_dump(exclude_none=True)

    async def weights_info(self, body: wire.WeightsInfoRequest, tenant: Tenant) -> dict:
        row = await self._tenancy.run(self._registry.checkpoint, tenant, *parse_tinker_path(body.tinker_path))
        lora = LoraSpec(**row.lora)
        return wire.WeightsInfoResponse(
            base_model=row.base_model,
            lora_rank=lora.rank,
            train_unembed=lora.train_unembed,
            train_mlp=lora.train_mlp,
            train_attn=lora.train_attn,
        ).model_dump()

    async def _run_wire(self, tenant: str, run: TrainingRun) -> wire.TrainingRun:
        rows, _ = await self._tenancy.run(self._registry.checkpoints, tenant, run.id)
        return run_wire(run, rows)


def _page(limit: int, offset: int) -> tuple[int, int]:
    if not (1 <= limit <= 1000 and 0 <= offset <= 10**9):
        raise UserError("limit must be in [1, 1000] and offset in [0, 10^9]")
    return limit, offset
