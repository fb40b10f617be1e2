"""Checkpoint storage: the files of each checkpoint under its tenant's prefix of a root (a local
folder or any fsspec URI). The metadata database is the index; this module only stores.

Layout under the root:
    {tenant}/{run}/weights/{name}/...            save_weights: adapter + optimizer state
    {tenant}/{run}/sampler_weights/{name}/...    save_weights_for_sampler: a standard PEFT adapter folder
    {tenant}/{run}/.staging-{uuid}/              a checkpoint being written
    {tenant}/{run}/.replaced-{uuid}/             the checkpoint a save under the same name replaces
    {tenant}/{run}/.durable/                     the newest snapshot for restoring after a restart
- Every path is built from checked ids (`actors.ids`) and verified to stay inside the tenant's
  prefix, so no id or name can reach outside it.
- A checkpoint exists once its `checkpoint.json` marker is written, last, after its files were
  moved into place; a save under an existing name moves the old folder aside first and deletes
  it only once the new one is in place.
- Torch-free: the ingress deletes checkpoints with it; the model actor writes and reads them.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import fsspec

from actors import ids
from configs.errors import NotFoundError, ServerError, UserError

SEGMENTS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
MARKER = "checkpoint.json"
DURABLE = ".durable"  # {tenant}/{run}/.durable/: the newest snapshot taken after an optim_step
DURABLE_SAMPLERS = ".durable-samplers"  # {tenant}/{run}/.durable-samplers/: its snapshot samplers' weights


@dataclass
class CheckpointRecord:
    """The marker file of a checkpoint: what it holds, for loading it back."""

    training_run_id: str
    segment: str  # "weights" | "sampler_weights"
    name: str
    base_model: str
    lora: dict[str, Any]  # rank, seed, train_attn, train_mlp, train_unembed
    time: str  # ISO-8601, UTC
    size_bytes: int = 0
    has_optimizer: bool = False
    user_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def tinker_path(self) -> str:
        return tinker_path(self.training_run_id, self.segment, self.name)


def utc_now() -> str:
    return datetime.now(UTC).isoformat()


def tinker_path(run_id: str, segment: str, name: str) -> str:
    return f"tinker://{run_id}/{segment}/{name}"


def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """tinker://{run}/{segment}/{name} -> (run, segment, name); anything else is a UserError."""
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise UserError(f"checkpoint paths look like tinker://<run>/weights/<name>, got {path!r:.200}")
    parts = path[len("tinker://") :].split("/")
    if len(parts) != 3 or not all(parts) or parts[1] not in SEGMENTS:
        raise UserError(
            "checkpoint paths look like tinker://<run>/(weights|sampler_weights|external_weights)/<name>, "
            f"got {path!r:.200}"
        )
    ids.check_id(parts[0], "the training run id of a checkpoint path")
    ids.check_name(parts[2])
    return parts[0], parts[1], parts[2]


class CheckpointStore:
    def __init__(self, root: str):
        self.fs, root = fsspec.core.url_to_fs(root if "://" in root else os.path.expanduser(root))
        self.root = posixpath.normpath(root) if root else root

    def folder(self, tenant: str, run_id: str, segment: str, name: str) -> str:
        """Where a checkpoint's files live; always inside the tenant's prefix."""
        if segment not in SEGMENTS:
            raise UserError(f"unknown checkpoint kind {segment!r}")
        return self._inside(tenant, run_id, segment, ids.check_name(name))

    # ---- writing (model actor) ------------------------------------------------------------

    def write(self, tenant: str, record: CheckpointRecord, files: dict[str, bytes]) -> CheckpointRecord:
        """Publish a checkpoint atomically: files first, the marker last. A same-named checkpoint is
        moved aside, replaced, and only then deleted (restored if the replacement fails)."""
        final = self.folder(tenant, record.training_run_id, record.segment, record.name)
        staging = self._stage(tenant, record.training_run_id, files)
        record.size_bytes = sum(len(data) for data in files.values())
        self._write_json(posixpath.join(staging, MARKER), asdict(record))
        replaced = None
        if self.fs.exists(final):
            replaced = self._inside(tenant, record.training_run_id, f".replaced-{uuid.uuid4().hex}")
            self.fs.mv(final, replaced, recursive=True)
        try:
            self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
            self.fs.mv(staging, final, recursive=True)
        except Exception:
            if replaced is not None:
                self.fs.mv(replaced, final, recursive=True)
            raise
        if replaced is not None:
            self.fs.rm(replaced, recursive=True)
        return record

    def write_durable(self, tenant: str, run_id: str, tag: str, files: dict[str, bytes], kind: str = DURABLE) -> None:
        """Write a durable snapshot of a training model (what a restarted deployment restores) as
        `tag`; the database says which tag is current, so a snapshot it does not name yet is unused.
        (kind DURABLE_SAMPLERS: the weights of a snapshot sampler the model made, by sampler tag.)"""
        staging = self._stage(tenant, run_id, files)
        self.fs.makedirs(self._inside(tenant, run_id, kind), exist_ok=True)
        final = self._inside(tenant, run_id, kind, ids.check_name(tag, "snapshot tag"))
        if self.fs.exists(final):
            self.fs.rm(final, recursive=True)
        self.fs.mv(staging, final, recursive=True)

    def drop_durable_except(
        self, tenant: str, run_id: str, keep: str | frozenset[str] | None, kind: str = DURABLE
    ) -> None:
        """Remove a run's durable snapshots but `keep` (a tag or a set of tags; None: all of them)."""
        keep = frozenset([keep]) if isinstance(keep, str) else keep or frozenset()
        folder = self._inside(tenant, run_id, kind)
        for path in self.fs.ls(folder, detail=False) if self.fs.exists(folder) else []:
            if posixpath.basename(path.rstrip("/")) not in keep:
                self.fs.rm(path, recursive=True)

    def drop_durable(self, tenant: str, run_id: str, tag: str, kind: str = DURABLE) -> None:
        folder = self._inside(tenant, run_id, kind, ids.check_name(tag, "snapshot tag"))
        if self.fs.exists(folder):
            self.fs.rm(folder, recursive=True)

    def read_durable(self, tenant: str, run_id: str, tag: str, kind: str = DURABLE) -> dict[str, bytes]:
        folder = self._inside(tenant, run_id, kind, ids.check_name(tag, "snapshot tag"))
        if not self.fs.exists(folder):
            return {}
        files = {}
        for path in self.fs.ls(folder, detail=False):
            with self.fs.open(path, "rb") as f:
                files[posixpath.basename(path.rstrip("/"))] = f.read()
        return files

    # ---- reading and deleting -----------------------------------------------------------------

    def record(self, tenant: str, run_id: str, segment: str, name: str) -> CheckpointRecord:
        marker = posixpath.join(self.folder(tenant, run_id, segment, name), MARKER)
        if not self.fs.exists(marker):
            raise NotFoundError(f"unknown checkpoint {tinker_path(run_id, segment, name)}")
        return CheckpointRecord(**self._read_json(marker))

    def read_files(self, tenant: str, run_id: str, segment: str, name: str, names: list[str]) -> dict[str, bytes]:
        self.record(tenant, run_id, segment, name)  # only a published checkpoint is read
        folder = self.folder(tenant, run_id, segment, name)
        found = {}
        for filename in names:
            path = posixpath.join(folder, filename)
            if self.fs.exists(path):
                with self.fs.open(path, "rb") as f:
                    found[filename] = f.read()
        return found

    def file_names(self, tenant: str, run_id: str, segment: str, name: str) -> list[str]:
        """The files of a published checkpoint (its marker aside), sorted."""
        self.record(tenant, run_id, segment, name)
        folder = self.folder(tenant, run_id, segment, name)
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False)]
        return sorted(n for n in names if n != MARKER)

    def read_file(self, tenant: str, run_id: str, segment: str, name: str, filename: str) -> bytes:
        """One file of a published checkpoint (never its marker, never outside its folder)."""
        if filename == MARKER:
            raise NotFoundError(f"no file {filename!r} in {tinker_path(run_id, segment, name)}")
        path = posixpath.join(self.folder(tenant, run_id, segment, name), ids.check_name(filename, "file name"))
        self.record(tenant, run_id, segment, name)
        if not self.fs.exists(path):
            raise NotFoundError(f"no file {filename!r} in {tinker_path(run_id, segment, name)}")
        with self.fs.open(path, "rb") as f:
            return f.read()

    def copy(self, owner: str, tenant: str, source: tuple[str, str, str], run_id: str) -> CheckpointRecord:
        """A published checkpoint's files (of `owner`) as the same segment and name of `tenant`'s run
        `run_id`; the new record."""
        src_run, segment, name = source
        record = self.record(owner, src_run, segment, name)
        files = {n: self.read_file(owner, src_run, segment, name, n) for n in self.file_names(owner, *source)}
        copied = CheckpointRecord(**{**asdict(record), "training_run_id": run_id, "time": utc_now()})
        return self.write(tenant, copied, files)

    def delete(self, tenant: str, run_id: str, segment: str, name: str) -> None:
        """Unpublish (marker first), then delete the files."""
        folder = self.folder(tenant, run_id, segment, name)
        marker = posixpath.join(folder, MARKER)
        if self.fs.exists(marker):
            self.fs.rm(marker)
        if self.fs.exists(folder):
            self.fs.rm(folder, recursive=True)

    # ---- helpers ----------------------------------------------------------------------------

    def _stage(self, tenant: str, run_id: str, files: dict[str, bytes]) -> str:
        """The files in a fresh staging folder of the run (moved into place by the caller)."""
        staging = self._inside(tenant, run_id, f".staging-{uuid.uuid4().hex}")
        self.fs.makedirs(staging, exist_ok=True)
        for filename, data in files.items():
            with self.fs.open(posixpath.join(staging, ids.check_name(filename, "file name")), "wb") as f:
                f.write(data)
        return staging

    def _inside(self, tenant: str, run_id: str, *rest: str) -> str:
        """root/tenant/run/rest..., refused unless it stays inside root/tenant/run (the tenant and
        run ids are checked here, the rest by the callers)."""
        prefix = posixpath.join(self.root, ids.check_name(tenant, "tenant"), ids.check_id(run_id, "training run id"))
        path = posixpath.normpath(posixpath.join(prefix, *rest))
        if not path.startswith(prefix + "/") or any("/" in part or part in ("", ".", "..") for part in rest):
            raise ServerError(f"refusing a storage path outside the tenant's prefix: {path!r}")
        return path

    def _write_json(self, path: str, value: dict) -> None:
        with self.fs.open(path, "w") as f:
            json.dump(value, f, indent=1, sort_keys=True)

    def _read_json(self, path: str) -> dict:
        with self.fs.open(path, "r") as f:
            return json.load(f)
