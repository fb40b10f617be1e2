"""The REST routes over stored training runs and checkpoints (RestClient, cookbook resume checks).

They read the checkpoint store directly (no model actor involved), in a worker thread so the
event loop never waits on storage.
"""

import asyncio

from actors.checkpoint_store import CheckpointRecord, CheckpointStore, RunRecord, parse_tinker_path
from deployments import wire


def checkpoint_wire(record: CheckpointRecord) -> wire.Checkpoint:
    metadata = {k: str(v) for k, v in record.user_metadata.items()} or None
    return wire.Checkpoint(
        checkpoint_id=record.checkpoint_id,
        checkpoint_type=record.checkpoint_type,
        time=record.time,
        tinker_path=record.tinker_path,
        size_bytes=record.size_bytes,
        user_metadata=metadata,
    )


def run_wire(run: RunRecord, checkpoints: list[CheckpointRecord]) -> wire.TrainingRun:
    training = [c for c in checkpoints if c.segment == "weights"]
    sampler = [c for c in checkpoints if c.segment == "sampler_weights"]
    return wire.TrainingRun(
        training_run_id=run.training_run_id,
        base_model=run.base_model,
        lora_rank=run.lora["rank"],
        last_request_time=max([run.created] + [c.time for c in checkpoints]),
        last_checkpoint=checkpoint_wire(training[-1]) if training else None,
        last_sampler_checkpoint=checkpoint_wire(sampler[-1]) if sampler else None,
        user_metadata={k: str(v) for k, v in run.user_metadata.items()} or None,
    )


class CheckpointRoutes:
    def __init__(self, store: CheckpointStore):
        self._store = store

    def routes(self):
        return [
            ("GET", "/api/v1/training_runs", self.list_training_runs),
            ("GET", "/api/v1/training_runs/{run_id}", self.get_training_run),
            ("GET", "/api/v1/training_runs/{run_id}/checkpoints", self.list_checkpoints),
            ("DELETE", "/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}", self.delete_checkpoint),
            ("GET", "/api/v1/checkpoints", self.list_user_checkpoints),
            ("POST", "/api/v1/weights_info", self.weights_info),
        ]

    async def list_training_runs(self, limit: int = 20, offset: int = 0) -> dict:
        runs = await asyncio.to_thread(self._store.runs)
        runs.reverse()  # newest first
        page = runs[offset : offset + limit]
        listed = [run_wire(r, await asyncio.to_thread(self._store.checkpoints, r.training_run_id)) for r in page]
        cursor = wire.Cursor(offset=offset, limit=limit, total_count=len(runs))
        return wire.TrainingRunsResponse(training_runs=listed, cursor=cursor).model_dump(exclude_none=True)

    async def get_training_run(self, run_id: str) -> dict:
        run = await asyncio.to_thread(self._store.run, run_id)
        checkpoints = await asyncio.to_thread(self._store.checkpoints, run_id)
        return run_wire(run, checkpoints).model_dump(exclude_none=True)

    async def list_checkpoints(self, run_id: str) -> dict:
        await asyncio.to_thread(self._store.run, run_id)  # 404 for an unknown run
        records = await asyncio.to_thread(self._store.checkpoints, run_id)
        return wire.CheckpointsListResponse(checkpoints=[checkpoint_wire(r) for r in records]).model_dump(
            exclude_none=True
        )

    async def delete_checkpoint(self, run_id: str, checkpoint_id: str) -> dict:
        await asyncio.to_thread(self._store.delete, run_id, checkpoint_id)
        return {}

    async def list_user_checkpoints(self, limit: int = 100, offset: int = 0) -> dict:
        def everything() -> list[CheckpointRecord]:
            return [c for run in self._store.runs() for c in self._store.checkpoints(run.training_run_id)]

        records = sorted(await asyncio.to_thread(everything), key=lambda c: c.time, reverse=True)
        cursor = wire.Cursor(offset=offset, limit=limit, total_count=len(records))
        listed = [checkpoint_wire(r) for r in records[offset : offset + limit]]
        return wire.CheckpointsListResponse(checkpoints=listed, cursor=cursor).model_dump(exclude_none=True)

    async def weights_info(self, body: wire.WeightsInfoRequest) -> dict:
        parse_tinker_path(body.tinker_path)
        record = await asyncio.to_thread(self._store.record, body.tinker_path)
        lora = record.lora
        return wire.WeightsInfoResponse(
            base_model=record.base_model,
            lora_rank=lora["rank"],
            train_unembed=lora["train_unembed"],
            train_mlp=lora["train_mlp"],
            train_attn=lora["train_attn"],
        ).model_dump()
