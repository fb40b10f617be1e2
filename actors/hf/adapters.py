"""The adapter table: which LoRA adapters live in a model actor, their weights and AdamW state.

- A resident adapter's weights sit on the LoRA layers of its scope (attn / mlp / unembed); its
  own AdamW moments live beside them, so an optim_step touches that adapter alone; gradients
  accumulate across forward_backward calls until then.
- At most `resident_capacity` adapters are resident. The least recently used one beyond that is
  offloaded: its buffers (weights, accumulated gradients, AdamW moments) go to host memory (GPU
  models) or to a spill file (CPU models) and come back bit-exact on its next request.
  Offloading never fails a request and never drops optimizer state.
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

from actors.hf.spill import new_spill_dir
from actors.lora import LoraLinear, LoraWeights, init_lora_weights
from actors.work import AdamParams, ModelInfo
from configs.errors import CapacityError, NotFoundError, UserError

_BUFFERS = ("values", "grad", "exp_avg", "exp_avg_sq")


@dataclass
class Adapter:
    """One adapter's parameters, gradients and AdamW moments, each in one flat float32 buffer.

    The A and B Parameters on the LoRA layers are views of `values`, their `.grad` views of
    `grad` (autograd accumulates into it in place), so AdamW runs as a handful of whole-buffer
    ops, element for element the same arithmetic as torch.optim.AdamW's.
    """

    info: ModelInfo
    layout: list[tuple[str, tuple[int, int], tuple[int, int]]]  # module name, A shape, B shape
    buffers: dict[str, torch.Tensor] | None  # values, grad, exp_avg, exp_avg_sq (None while offloaded)
    weights: dict[str, LoraWeights]  # module name -> views of the buffers (empty while offloaded)
    step: int = 0  # AdamW steps taken
    has_grad: bool = False  # a backward has accumulated into `grad` since the last step
    offloaded: dict[str, torch.Tensor] | Path | None = None  # host tensors or a spill file

    def parameters(self) -> list[nn.Parameter]:
        return [p for w in self.weights.values() for p in (w.A, w.B)]

    def optim_step(self, adam: AdamParams) -> dict[str, float]:
        """Apply the accumulated gradients with AdamW (decoupled weight decay), then zero them.
        Without any gradient nothing moves, as torch skips parameters whose grad is None."""
        if not self.has_grad:
            return {"grad_norm:mean": 0.0, "learning_rate:mean": adam.learning_rate}
        values, grad = self.buffers["values"], self.buffers["grad"]
        exp_avg, exp_avg_sq = self.buffers["exp_avg"], self.buffers["exp_avg_sq"]
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in self.parameters()])
        if adam.grad_clip_norm > 0:
            grad.mul_(torch.clamp(adam.grad_clip_norm / (total_norm + 1e-6), max=1.0))
        self.step += 1
        lr, beta1, beta2 = adam.learning_rate, adam.beta1, adam.beta2
        values.mul_(1 - lr * adam.weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**self.step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**self.step) ** 0.5).add_(adam.eps)
        values.addcdiv_(exp_avg, denom, value=-step_size)
        grad.zero_()
        self.has_grad = False
        return {"grad_norm:mean": float(total_norm), "learning_rate:mean": lr}

    def moments(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """parameter key ("<module>.A" / ".B") -> its (exp_avg, exp_avg_sq) views."""
        return {
            key: (self._view("exp_avg", offset, shape), self._view("exp_avg_sq", offset, shape))
            for key, offset, shape in self._slots()
        }

    def _slots(self):
        offset = 0
        for name, a_shape, b_shape in self.layout:
            for which, shape in (("A", a_shape), ("B", b_shape)):
                yield f"{name}.{which}", offset, shape
                offset += shape[0] * shape[1]

    def _view(self, buffer: str, offset: int, shape: tuple[int, int]) -> torch.Tensor:
        return self.buffers[buffer][offset : offset + shape[0] * shape[1]].view(shape)

    def bind(self, layers: dict[str, LoraLinear], scaling: float) -> None:
        """Make Parameters viewing the buffers and put them on the layers."""
        self.weights = {}
        views = {}
        for key, offset, shape in self._slots():
            param = nn.Parameter(self._view("values", offset, shape))
            param.grad = self._view("grad", offset, shape)
            views[key] = param
        for name, _, _ in self.layout:
            self.weights[name] = LoraWeights(A=views[f"{name}.A"], B=views[f"{name}.B"], scaling=scaling)
            layers[name].adapters[self.info.model_id] = self.weights[name]


class AdapterTable:
    def __init__(
        self,
        layers: dict[str, LoraLinear],
        max_rank: int,
        alpha: float,
        resident_capacity: int,
        spill_root: str | None = None,
    ):
        self._layers = layers
        self._max_rank = max_rank
        self._alpha = alpha
        self._resident_capacity = resident_capacity
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

    @property
    def resident_count(self) -> int:
        """A length only: safe to read from another thread while this one changes the table."""
        return len(self._resident)

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
        lora.validate(self._max_rank)
        if info.model_id in self._adapters:
            raise UserError(f"training model {info.model_id!r} already exists")
        targets = {name: layer for name, layer in self._layers.items() if lora.targets(name)}
        layout = [
            (name, (lora.rank, layer.base.in_features), (layer.base.out_features, lora.rank))
            for name, layer in targets.items()
        ]
        size = sum(a[0] * a[1] + b[0] * b[1] for _, a, b in layout)
        device = next(iter(self._layers.values())).base.weight.device
        buffers = {key: torch.zeros(size, dtype=torch.float32, device=device) for key in _BUFFERS}
        adapter = Adapter(info=info, layout=layout, buffers=buffers, weights={})
        adapter.bind(self._layers, self._alpha / lora.rank)
        seed = lora.seed if lora.seed is not None else secrets.randbits(63)
        init = init_lora_weights([(name, a[1], b[0]) for name, a, b in layout], lora.rank, seed)
        with torch.no_grad():  # B stays zero, as PEFT's
            for name, (A, _) in init.items():
                adapter.weights[name].A.copy_(A)
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
        tensors = {key: buffer.cpu() for key, buffer in adapter.buffers.items()}
        for layer in self._layers.values():
            layer.adapters.pop(adapter.info.model_id, None)
        if next(iter(self._layers.values())).base.weight.device.type == "cpu":  # spill to disk
            path = self._spill_path(adapter.info.model_id)
            save_file(tensors, path)
            adapter.offloaded = path
        else:
            adapter.offloaded = tensors
        adapter.buffers, adapter.weights = None, {}
        self._resident.pop(adapter.info.model_id, None)

    def _reload(self, adapter: Adapter) -> None:
        stored = adapter.offloaded
        tensors = load_file(stored) if isinstance(stored, Path) else stored
        device = next(iter(self._layers.values())).base.weight.device
        adapter.buffers = {key: tensors[key].to(device) for key in _BUFFERS}
        adapter.bind(self._layers, self._alpha / adapter.info.lora.rank)
        if isinstance(stored, Path):
            stored.unlink(missing_ok=True)
        adapter.offloaded = None
        self._resident[adapter.info.model_id] = None

    def _spill_path(self, model_id: str) -> Path:
        if self._spill_dir is None:
            self._spill_dir = new_spill_dir(self._spill_root or tempfile.gettempdir(), "adapters")
        return self._spill_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', model_id)}.safetensors"
