"""Checkpoint storage: tinker:// paths <-> folders under a root (a local folder or any fsspec URI).

Layout under the root:
    {run}/run.json                             the training run (base model, LoRA config, metadata)
    {run}/weights/{name}/...                   save_weights: adapter + optimizer state
    {run}/sampler_weights/{name}/...           save_weights_for_sampler: a standard PEFT adapter folder
    {run}/.staging-{uuid}/                     a checkpoint being written
- A checkpoint exists only once its `checkpoint.json` marker is written, which happens last, after
  its files were moved into place: no half-written checkpoint is ever listed or loaded, on a
  local disk or an object store (where moves are copies).
- Torch-free: the ingress lists and deletes checkpoints with it; the model actor writes them.
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
from configs.errors import NotFoundError, UserError

SEGMENTS = {"weights": "training", "sampler_weights": "sampler"}
MARKER = "checkpoint.json"
RUN_FILE = "run.json"


@dataclass
class CheckpointRecord:
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
        return f"tinker://{self.training_run_id}/{self.segment}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        return f"{self.segment}/{self.name}"

    @property
    def checkpoint_type(self) -> str:
        return SEGMENTS[self.segment]


@dataclass
class RunRecord:
    training_run_id: str
    base_model: str
    lora: dict[str, Any]
    created: str
    user_metadata: dict[str, Any] = field(default_factory=dict)


def utc_now() -> str:
    return datetime.now(UTC).isoformat()


def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """tinker://{run}/{segment}/{name} -> (run, segment, name); anything else is a UserError."""
    if not path.startswith("tinker://"):
        raise UserError(f"checkpoint paths look like tinker://<run>/weights/<name>, got {path!r}")
    parts = path[len("tinker://") :].split("/")
    if len(parts) != 3 or not all(parts) or parts[1] not in SEGMENTS:
        raise UserError(f"checkpoint paths look like tinker://<run>/(weights|sampler_weights)/<name>, got {path!r}")
    ids.check_id(parts[0], "the training run id of a checkpoint path")
    ids.check_name(parts[2])
    return parts[0], parts[1], parts[2]


class CheckpointStore:
    def __init__(self, root: str):
        self.fs, self.root = fsspec.core.url_to_fs(root if "://" in root else os.path.expanduser(root))

    def _join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def folder(self, run_id: str, segment: str, name: str) -> str:
        return self._join(run_id, segment, name)

    # ---- writing (model actor) ------------------------------------------------------------

    def write(self, record: CheckpointRecord, files: dict[str, bytes]) -> CheckpointRecord:
        """Publish a checkpoint atomically: files first, the marker last. Overwrites a same-named one."""
        ids.check_name(record.name)
        staging = self._join(record.training_run_id, f".staging-{uuid.uuid4().hex}")
        self.fs.makedirs(staging, exist_ok=True)
        for filename, data in files.items():
            with self.fs.open(posixpath.join(staging, filename), "wb") as f:
                f.write(data)
        final = self.folder(record.training_run_id, record.segment, record.name)
        if self.fs.exists(final):
            self._remove(final)
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        self.fs.mv(staging, final, recursive=True)
        record.size_bytes = sum(len(data) for data in files.values())
        self._write_json(posixpath.join(final, MARKER), asdict(record))
        return record

    def write_run(self, run: RunRecord) -> None:
        self.fs.makedirs(self._join(run.training_run_id), exist_ok=True)
        self._write_json(self._join(run.training_run_id, RUN_FILE), asdict(run))

    def read_files(self, tinker_path: str, names: list[str]) -> dict[str, bytes]:
        record = self.record(tinker_path)
        folder = self.folder(record.training_run_id, record.segment, record.name)
        found = {}
        for name in names:
            path = posixpath.join(folder, name)
            if self.fs.exists(path):
                with self.fs.open(path, "rb") as f:
                    found[name] = f.read()
        return found

    # ---- reading and listing (ingress and actor) ----------------------------------------------

    def record(self, tinker_path: str) -> CheckpointRecord:
        run_id, segment, name = parse_tinker_path(tinker_path)
        marker = posixpath.join(self.folder(run_id, segment, name), MARKER)
        if not self.fs.exists(marker):
            raise NotFoundError(f"no checkpoint at {tinker_path}")
        return CheckpointRecord(**self._read_json(marker))

    def run(self, run_id: str) -> RunRecord:
        path = self._join(run_id, RUN_FILE)
        if not self.fs.exists(path):
            raise NotFoundError(f"no training run {run_id!r}")
        return RunRecord(**self._read_json(path))

    def runs(self) -> list[RunRecord]:
        if not self.fs.exists(self.root):
            return []
        runs = []
        for entry in self.fs.ls(self.root, detail=False):
            run_file = posixpath.join(entry, RUN_FILE)
            if self.fs.exists(run_file):
                runs.append(RunRecord(**self._read_json(run_file)))
        return sorted(runs, key=lambda r: r.created)

    def checkpoints(self, run_id: str) -> list[CheckpointRecord]:
        records = []
        for segment in SEGMENTS:
            folder = self._join(run_id, segment)
            if not self.fs.exists(folder):
                continue
            for entry in self.fs.ls(folder, detail=False):
                marker = posixpath.join(entry, MARKER)
                if self.fs.exists(marker):
                    records.append(CheckpointRecord(**self._read_json(marker)))
        return sorted(records, key=lambda r: r.time)

    def delete(self, run_id: str, checkpoint_id: str) -> None:
        segment, _, name = checkpoint_id.partition("/")
        record = self.record(f"tinker://{run_id}/{segment}/{name}")
        self._remove(self.folder(record.training_run_id, segment, name))

    # ---- helpers ----------------------------------------------------------------------------

    def _remove(self, folder: str) -> None:
        """Unpublish (marker first), then delete the files."""
        marker = posixpath.join(folder, MARKER)
        if self.fs.exists(marker):
            self.fs.rm(marker)
        self.fs.rm(folder, recursive=True)

    def _write_json(self, path: str, value: dict) -> None:
        with self.fs.open(path, "w") as f:
            json.dump(value, f, indent=1, sort_keys=True)

    def _read_json(self, path: str) -> dict:
        with self.fs.open(path, "r") as f:
            return json.load(f)
