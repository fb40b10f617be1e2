"""The adapter table: which LoRA adapters live in a model actor, their weights and AdamW state.

- An adapter's weights sit on the LoRA layers of its scope (attn / mlp / unembed) and are also
  listed here for its optimizer; nothing else ever holds them.
- Each adapter has its own torch AdamW, so an optim_step touches that adapter alone;
  gradients accumulate on its parameters across forward_backward calls until then.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from torch import nn

from actors.lora import LoraLinear, LoraWeights, target_scope
from actors.work import AdamParams, LoraSpec, ModelInfo
from configs.errors import CapacityError, NotFoundError, UserError


@dataclass
class Adapter:
    info: ModelInfo
    weights: dict[str, LoraWeights]  # LoRA module name -> weights
    optimizer: torch.optim.AdamW

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
    def __init__(self, layers: dict[str, LoraLinear], capacity: int, max_rank: int, alpha: float):
        self._layers = layers
        self._capacity = capacity
        self._max_rank = max_rank
        self._alpha = alpha
        self._adapters: dict[str, Adapter] = {}

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def ids(self) -> list[str]:
        return list(self._adapters)

    def get(self, model_id: str) -> Adapter:
        adapter = self._adapters.get(model_id)
        if adapter is None:
            raise NotFoundError(f"no training model {model_id!r} on this base model")
        return adapter

    def create(self, info: ModelInfo) -> Adapter:
        lora = info.lora
        validate_lora(lora, self._max_rank)
        if info.model_id in self._adapters:
            raise UserError(f"training model {info.model_id!r} already exists")
        if len(self._adapters) >= self._capacity:
            raise CapacityError(
                f"this base model already hosts {self._capacity} adapters (max_adapters); unload one first"
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
        optimizer = torch.optim.AdamW([p for w in weights.values() for p in (w.A, w.B)])
        adapter = Adapter(info=info, weights=weights, optimizer=optimizer)
        self._adapters[info.model_id] = adapter
        return adapter

    def remove(self, model_id: str) -> None:
        self.get(model_id)
        for layer in self._layers.values():
            layer.adapters.pop(model_id, None)
        del self._adapters[model_id]
