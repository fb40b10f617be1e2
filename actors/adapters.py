"""The adapter table: which LoRA adapters live in a model actor, their weights and AdamW state.

- A resident adapter's weights sit on the LoRA layers of its scope (attn / mlp / unembed) and
  are listed here for its own torch AdamW, so an optim_step touches that adapter alone;
  gradients accumulate on its parameters across forward_backward calls until then.
- At most `resident_capacity` adapters are resident. The least recently used one beyond that is
  offloaded: weights, accumulated gradients and AdamW moments go to host memory (GPU models) or
  to a spill file (CPU models), and come back bit-exact on its next request. Offloading never
  fails a request and never drops optimizer state.
"""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from actors.lora import LoraLinear, LoraWeights, target_scope
from actors.work import AdamParams, LoraSpec, ModelInfo
from configs.errors import CapacityError, NotFoundError, UserError

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


@dataclass
class Adapter:
    info: ModelInfo
    weights: dict[str, LoraWeights]  # LoRA module name -> weights (empty while offloaded)
    optimizer: torch.optim.AdamW | None  # None while offloaded
    offloaded: dict[str, torch.Tensor] | Path | None = None  # host tensors or a spill file

    def parameters(self) -> list[nn.Parameter]:
        return [p for w in self.weights.values() for p in (w.A, w.B)]

    def optim_step(self, adam: AdamParams) -> dict[str, float]:
        """Apply the accumulated gradients with AdamW (decoupled weight decay), then zero them."""
        params = [p for p in self.parameters() if p.grad is not None]
        grad_norm = _grad_norm(params, adam.grad_clip_norm)
        for group in self.optimizer.param_groups:
            group.update(
                lr=adam.learning_rate,
                betas=(adam.beta1, adam.beta2),
                eps=adam.eps,
                weight_decay=adam.weight_decay,
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm:mean": grad_norm, "learning_rate:mean": adam.learning_rate}


def _grad_norm(params: list[nn.Parameter], clip_norm: float) -> float:
    """Global L2 norm of the gradients (before clipping); clips them in place when clip_norm > 0."""
    if not params:
        return 0.0
    if clip_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, clip_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


def validate_lora(lora: LoraSpec, max_rank: int) -> None:
    if not 1 <= lora.rank <= max_rank:
        raise UserError(f"LoRA rank must be between 1 and {max_rank}, got {lora.rank}")
    if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
        raise UserError("at least one of train_attn, train_mlp, train_unembed must be true")


class AdapterTable:
    def __init__(
        self,
        layers: dict[str, LoraLinear],
        capacity: int,
        max_rank: int,
        alpha: float,
        resident_capacity: int | None = None,
        spill_root: str | None = None,
    ):
        self._layers = layers
        self._capacity = capacity
        self._max_rank = max_rank
        self._alpha = alpha
        self._resident_capacity = resident_capacity or capacity
        self._spill_root = spill_root
        self._spill_dir: Path | None = None
        self._adapters: dict[str, Adapter] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()  # least recently used first

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def ids(self) -> list[str]:
        return list(self._adapters)

    def resident_ids(self) -> list[str]:
        return list(self._resident)

    def info(self, model_id: str) -> ModelInfo:
        return self._lookup(model_id).info

    def get(self, model_id: str) -> Adapter:
        """The adapter, resident (brought back if it was offloaded)."""
        self.make_resident([model_id])
        return self._adapters[model_id]

    def make_resident(self, model_ids: list[str]) -> None:
        """Bring these adapters in (offloading the least recently used others as needed)."""
        for model_id in model_ids:
            self._lookup(model_id)
        if len(set(model_ids)) > self._resident_capacity:
            raise CapacityError(
                f"{len(set(model_ids))} adapters cannot be resident at once (max {self._resident_capacity})"
            )
        for model_id in model_ids:
            if model_id not in self._resident:
                self._reload(self._adapters[model_id])
            self._resident.move_to_end(model_id)
        for victim in [m for m in self._resident if m not in model_ids]:
            if len(self._resident) <= self._resident_capacity:
                break
            self._offload(self._adapters[victim])

    def create(self, info: ModelInfo) -> Adapter:
        lora = info.lora
        validate_lora(lora, self._max_rank)
        if info.model_id in self._adapters:
            raise UserError(f"training model {info.model_id!r} already exists")
        if len(self._adapters) >= self._capacity:
            raise CapacityError(
                f"this base model already holds {self._capacity} adapters (max_adapters); unload one first"
            )
        scopes = {
            s for s, on in (("attn", lora.train_attn), ("mlp", lora.train_mlp), ("unembed", lora.train_unembed)) if on
        }
        seed = lora.seed if lora.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)
        weights = {
            name: layer.new_adapter(info.model_id, lora.rank, self._alpha, generator)
            for name, layer in self._layers.items()
            if target_scope(name) in scopes
        }
        adapter = Adapter(info=info, weights=weights, optimizer=torch.optim.AdamW(_params(weights)))
        self._adapters[info.model_id] = adapter
        self._resident[info.model_id] = None
        self.make_resident([info.model_id])
        return adapter

    def remove(self, model_id: str) -> None:
        adapter = self._lookup(model_id)
        for layer in self._layers.values():
            layer.adapters.pop(model_id, None)
        if isinstance(adapter.offloaded, Path):
            adapter.offloaded.unlink(missing_ok=True)
        self._resident.pop(model_id, None)
        del self._adapters[model_id]

    def close(self) -> None:
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)

    # ---- offloading -----------------------------------------------------------------------------

    def _lookup(self, model_id: str) -> Adapter:
        adapter = self._adapters.get(model_id)
        if adapter is None:
            raise NotFoundError(f"no training model {model_id!r} on this base model")
        return adapter

    def _offload(self, adapter: Adapter) -> None:
        tensors = {}
        for name, w in adapter.weights.items():
            for which, param in (("A", w.A), ("B", w.B)):
                key = f"{name}.{which}"
                tensors[key] = param.detach().cpu()
                if param.grad is not None:
                    tensors[f"{key}.grad"] = param.grad.cpu()
                for state_key, value in adapter.optimizer.state.get(param, {}).items():
                    tensors[f"{key}.{state_key}"] = (
                        torch.as_tensor(value).cpu().reshape(-1 if state_key == "step" else value.shape)
                    )
        for layer in self._layers.values():
            layer.adapters.pop(adapter.info.model_id, None)
        device = next(iter(self._layers.values())).base.weight.device
        if device.type == "cpu":  # host memory is where it already is: spill to disk instead
            path = self._spill_path(adapter.info.model_id)
            save_file({k: v.contiguous() for k, v in tensors.items()}, path)
            adapter.offloaded = path
        else:
            adapter.offloaded = tensors
        adapter.weights, adapter.optimizer = {}, None
        self._resident.pop(adapter.info.model_id, None)

    def _reload(self, adapter: Adapter) -> None:
        stored = adapter.offloaded
        tensors = load_file(stored) if isinstance(stored, Path) else stored
        scaling = self._alpha / adapter.info.lora.rank
        weights: dict[str, LoraWeights] = {}
        state = {}
        for name in sorted({key.rsplit(".", 1)[0] for key in tensors if key.endswith((".A", ".B"))}):
            device = self._layers[name].base.weight.device
            params = {}
            for which in ("A", "B"):
                key = f"{name}.{which}"
                param = nn.Parameter(tensors[key].to(device))
                if f"{key}.grad" in tensors:
                    param.grad = tensors[f"{key}.grad"].to(device)
                if f"{key}.step" in tensors:
                    state[param] = {s: _state_tensor(tensors[f"{key}.{s}"], s, device) for s in _STATE_KEYS}
                params[which] = param
            weights[name] = LoraWeights(A=params["A"], B=params["B"], scaling=scaling)
            self._layers[name].adapters[adapter.info.model_id] = weights[name]
        optimizer = torch.optim.AdamW(_params(weights))
        optimizer.state.update(state)
        adapter.weights, adapter.optimizer = weights, optimizer
        if isinstance(stored, Path):
            stored.unlink(missing_ok=True)
        adapter.offloaded = None
        self._resident[adapter.info.model_id] = None

    def _spill_path(self, model_id: str) -> Path:
        if self._spill_dir is None:
            root = Path(self._spill_root or tempfile.gettempdir()).expanduser()
            root.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(tempfile.mkdtemp(prefix="adapters-", dir=root))
        return self._spill_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', model_id)}.safetensors"


def _params(weights: dict[str, LoraWeights]) -> list[nn.Parameter]:
    return [p for w in weights.values() for p in (w.A, w.B)]


def _state_tensor(value: torch.Tensor, key: str, device: torch.device) -> torch.Tensor:
    """AdamW keeps `step` as a CPU scalar tensor (unless capturable); moments live with the param."""
    return value.reshape(()).clone() if key == "step" else value.to(device)
