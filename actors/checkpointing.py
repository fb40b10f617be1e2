"""Checkpoints of one model actor: between its backend's PEFT files and the checkpoint store.

- Every method runs on the compute thread, in the order the scheduler gives it, so a save sees
  exactly the weights of the requests before it.
- Files live under the owning tenant's prefix (`CheckpointStore`); a checkpoint is recorded in
  the metadata database (the listings' index) once its files are in place.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta

from actors import ids
from actors.age_files import encrypt_files, parse_recipients
from actors.backend import Backend
from actors.checkpoint_store import CheckpointRecord, CheckpointStore, parse_tinker_path, utc_now
from actors.metadata.registry import Registry
from actors.metadata.tables import Checkpoint
from actors.metadata.tables import utc_now as utc_now_dt
from actors.work import CreateModelWork, LoraSpec, ModelInfo, SamplerInfo
from configs.errors import LimitExceededError, ThinkerError, UserError

ADAPTER_FILES = ["adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors"]


class Checkpointing:
    def __init__(
        self, backend: Backend, store: CheckpointStore, registry: Registry, base_model: str, max_adapters: int
    ):
        self._backend = backend
        self._store = store
        self._registry = registry
        self._base_model = base_model
        self._max_adapters = max_adapters

    def create_model(self, work: CreateModelWork) -> ModelInfo:
        """A new training model; a retried create finds it already there. Both backends' one limit
        on adapters is checked here. (Its training run was recorded by the ingress.)"""
        models = self._backend.list_models()
        if work.model_id in models:
            return self._backend.get_info(work.model_id)
        if len(models) >= self._max_adapters:
            raise LimitExceededError(
                f"base model {self._base_model!r} already holds {len(models)} training models, its limit "
                f"(max_adapters = {self._max_adapters}); unload one first"
            )
        return self._backend.create_model(work)

    def create_from_state(self, work: CreateModelWork, path: str, optimizer: bool) -> ModelInfo:
        """create_training_client_from_state: a new training model holding a checkpoint of the same tenant."""
        if work.model_id in self._backend.list_models():
            return self._backend.get_info(work.model_id)
        record = self._record(work.tenant, path)
        lora = LoraSpec(**record.lora)
        metadata = work.user_metadata or record.user_metadata
        info = self.create_model(CreateModelWork(work.model_id, lora, metadata, work.tenant))
        try:
            self._backend.load_state(work.model_id, self._files(work.tenant, path), optimizer)
        except ThinkerError:
            self._backend.unload_model(work.model_id)
            raise
        return info

    def save(
        self,
        tenant: str,
        model_id: str,
        segment: str,
        name: str,
        ttl_s: float | None = None,
        user_metadata: dict[str, str] | None = None,
        overwrite: bool = False,
    ) -> str:
        """save_weights ("weights": adapter + AdamW state) or save_weights_for_sampler ("sampler_weights"),
        gone after `ttl_s` seconds when given; its tinker:// path. A same-named checkpoint is replaced
        either way (never a conflict). Its user_metadata: the given one; else, with `overwrite`,
        none; else the training model's."""
        if user_metadata is None and overwrite:
            user_metadata = {}
        return self._save(tenant, model_id, segment, name, ttl_s, (), user_metadata).tinker_path

    def save_external(self, tenant: str, model_id: str, name: str, ttl_s: float | None, recipients: tuple) -> dict:
        """save_weights_external: a PEFT folder to download, every file age-encrypted to `recipients`
        (stored as <file>.age) when given. {"path", "size_bytes"}."""
        record = self._save(tenant, model_id, "external_weights", name, ttl_s, recipients)
        return {"path": record.tinker_path, "size_bytes": record.size_bytes}

    def _save(
        self,
        tenant: str,
        model_id: str,
        segment: str,
        name: str,
        ttl_s: float | None,
        recipients: tuple[str, ...] = (),
        user_metadata: dict[str, str] | None = None,
    ) -> CheckpointRecord:
        ids.check_name(name)
        info = self._backend.get_info(model_id)
        metadata = dict(info.user_metadata) if user_metadata is None else dict(user_metadata)
        training = segment == "weights"
        parsed = parse_recipients(list(recipients)) if recipients else []
        files = self._backend.save_state(model_id, with_optimizer=training)
        if parsed:
            files = encrypt_files(files, parsed)
        record = CheckpointRecord(
            training_run_id=model_id,
            segment=segment,
            name=name,
            base_model=info.base_model,
            lora=asdict(info.lora),
            time=utc_now(),
            has_optimizer=training,
            user_metadata=metadata,
        )
        record = self._store.write(tenant, record, files)
        row = Checkpoint(
            training_run_id=model_id,
            segment=segment,
            name=name,
            base_model=info.base_model,
            lora=record.lora,
            size_bytes=record.size_bytes,
            has_optimizer=training,
            user_metadata=metadata,
            expires_at=utc_now_dt() + timedelta(seconds=ttl_s) if ttl_s is not None else None,
            encrypted=bool(parsed),
        )
        self._registry.add_checkpoint(tenant, row)
        return record

    def load(self, tenant: str, model_id: str, path: str, optimizer: bool) -> str:
        self._record(tenant, path)
        self._backend.load_state(model_id, self._files(tenant, path), optimizer)
        return path

    def snapshot(self, model_id: str, sampler_id: str | None) -> str:
        if sampler_id is None:
            raise UserError("save_weights_for_sampler needs a path or a sampling_session_seq_id")
        info = SamplerInfo(sampler_id, self._base_model, source_model_id=model_id)
        self._backend.snapshot_sampler(model_id, info)
        return sampler_id

    def create_sampler(self, tenant: str, sampler_id: str, model_path: str | None) -> SamplerInfo:
        info = SamplerInfo(sampler_id, self._base_model, model_path=model_path)
        if model_path is None:
            return self._backend.create_sampler(info, None)
        self._record(tenant, model_path)
        return self._backend.create_sampler(info, self._files(tenant, model_path))

    def _record(self, tenant: str, path: str) -> CheckpointRecord:
        run_id, segment, name = parse_tinker_path(path)
        if segment == "external_weights":
            raise UserError(f"{path} is an export for download (external_weights); load a weights/ checkpoint")
        owner = self._owner(tenant, path)
        record = self._store.record(owner, run_id, segment, name)
        if record.base_model != self._base_model:
            raise UserError(f"{path} was trained on {record.base_model!r}, not {self._base_model!r}")
        return record

    def _owner(self, tenant: str, path: str) -> str:
        """Whose storage holds a checkpoint `tenant` may load: its own, or a published one's owner
        (unknown, another tenant's unpublished, or expired: 404)."""
        return self._registry.readable_checkpoint(tenant, *parse_tinker_path(path)).tenant_id

    def _files(self, tenant: str, path: str) -> dict[str, bytes]:
        return self._store.read_files(self._owner(tenant, path), *parse_tinker_path(path), ADAPTER_FILES)
