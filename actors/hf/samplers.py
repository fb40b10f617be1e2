"""Sampling sessions of one base model: which weights each samples with.

- A sampler is the base model alone, a frozen snapshot of a training adapter
  (`save_weights_and_get_sampling_client`), or an adapter loaded from a sampler checkpoint.
- Snapshot weights sit on the LoRA layers under the sampler's id while resident. At most
  `capacity` snapshots are resident; the least recently used one is spilled to a file under
  `spill_dir` and reloaded, bit-exact, on its next request, so memory stays bounded however
  many sampling clients a long RL run creates.
- Training models are sampled live (their current weights) under their own id.
"""

from __future__ import annotations

import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from actors.hf.spill import new_spill_dir
from actors.lora import LoraLinear, LoraWeights
from actors.work import SamplerInfo
from configs.errors import NotFoundError


@dataclass
class _Sampler:
    info: SamplerInfo
    scaling: float | None  # None: the base model, no adapter
    spill_file: Path | None = None


class SamplerTable:
    def __init__(self, layers: dict[str, LoraLinear], capacity: int, spill_root: str):
        self._layers = layers
        self._capacity = capacity
        self._spill_dir = new_spill_dir(spill_root, "samplers")
        self._samplers: dict[str, _Sampler] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()  # LRU order of snapshots on the layers

    def __contains__(self, sampler_id: str) -> bool:
        return sampler_id in self._samplers

    def info(self, sampler_id: str) -> SamplerInfo:
        return self._get(sampler_id).info

    def ids(self) -> list[str]:
        return list(self._samplers)

    def add_base(self, info: SamplerInfo) -> None:
        self._samplers[info.sampler_id] = _Sampler(info, scaling=None)

    def add_adapter(self, info: SamplerInfo, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float):
        """Register frozen adapter weights (module name -> (A, B)) under the sampler's id."""
        self._samplers[info.sampler_id] = _Sampler(info, scaling=scaling)
        self._place(info.sampler_id, weights, scaling)

    def routing_key(self, sampler_id: str, keep: set[str] = frozenset()) -> str:
        """The LoRA routing key to sample with ("" for the base model); reloads a spilled snapshot
        (spilling the least recently used others, never those in `keep`)."""
        sampler = self._get(sampler_id)
        if sampler.scaling is None:
            return ""
        if sampler_id in self._resident:
            self._resident.move_to_end(sampler_id)
        else:
            tensors = load_file(sampler.spill_file)
            weights = {name: (tensors[f"{name}.A"], tensors[f"{name}.B"]) for name in _modules(tensors)}
            self._place(sampler_id, weights, sampler.scaling, keep)
        return sampler_id

    def make_resident(self, sampler_ids: list[str]) -> None:
        """Every one of these samplers on the layers at once (decoding together), even beyond
        `capacity` for a while; others are spilled first."""
        keep = set(sampler_ids)
        for sampler_id in sampler_ids:
            self.routing_key(sampler_id, keep)

    def weights(self, sampler_id: str) -> tuple[dict[str, LoraWeights], float] | None:
        """CPU copies of a snapshot's weights and its scaling (None for the base model)."""
        sampler = self._get(sampler_id)
        if sampler.scaling is None:
            return None
        if sampler_id in self._resident:
            pairs = {
                name: (layer.adapters[sampler_id].A, layer.adapters[sampler_id].B)
                for name, layer in self._layers.items()
                if sampler_id in layer.adapters
            }
        else:
            tensors = load_file(sampler.spill_file)
            pairs = {name: (tensors[f"{name}.A"], tensors[f"{name}.B"]) for name in _modules(tensors)}
        copies = {
            name: LoraWeights(A=A.detach().cpu().clone(), B=B.detach().cpu().clone(), scaling=sampler.scaling)
            for name, (A, B) in pairs.items()
        }
        return copies, sampler.scaling

    def remove(self, sampler_id: str) -> None:
        sampler = self._samplers.pop(sampler_id, None)
        if sampler is None:
            return
        self._unplace(sampler_id)
        if sampler.spill_file is not None:
            sampler.spill_file.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self._spill_dir, ignore_errors=True)

    def _get(self, sampler_id: str) -> _Sampler:
        sampler = self._samplers.get(sampler_id)
        if sampler is None:
            raise NotFoundError(f"no sampling session {sampler_id!r} on this base model")
        return sampler

    def _place(
        self,
        sampler_id: str,
        weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
        scaling: float,
        keep: set[str] = frozenset(),
    ) -> None:
        for name, (A, B) in weights.items():
            device = self._layers[name].base.weight.device
            self._layers[name].adapters[sampler_id] = LoraWeights(A=A.to(device), B=B.to(device), scaling=scaling)
        self._resident[sampler_id] = None
        victims = [s for s in self._resident if s != sampler_id and s not in keep]
        while len(self._resident) > self._capacity and victims:
            self._spill(victims.pop(0))

    def _spill(self, sampler_id: str) -> None:
        sampler = self._samplers[sampler_id]
        if sampler.spill_file is None:  # snapshots never change: one file is enough
            tensors = {}
            for name, layer in self._layers.items():
                if sampler_id in layer.adapters:
                    w = layer.adapters[sampler_id]
                    tensors[f"{name}.A"], tensors[f"{name}.B"] = w.A.cpu().contiguous(), w.B.cpu().contiguous()
            sampler.spill_file = self._spill_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', sampler_id)}.safetensors"
            save_file(tensors, sampler.spill_file)
        self._unplace(sampler_id)

    def _unplace(self, sampler_id: str) -> None:
        for layer in self._layers.values():
            layer.adapters.pop(sampler_id, None)
        self._resident.pop(sampler_id, None)


def _modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({key.rsplit(".", 1)[0] for key in tensors})
