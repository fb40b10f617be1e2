"""Multi-adapter LoRA layers: one frozen base projection, many adapters, each over its own rows.

- `LoraLinear` wraps a frozen `nn.Linear`. A shared `Routing` (set by the backend before each
  pass) says which batch rows belong to which adapter; the base projection runs once for the
  whole batch and each adapter adds `scaling * B(A(x))` to its rows only.
- An adapter's weights are plain leaf Parameters owned by the backend's adapter table; rows of
  adapters that have no weights on a layer (other scope) pass through unchanged.
- Init follows PEFT: A ~ kaiming_uniform(a=sqrt(5)), B = 0, scaling = alpha / rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
UNEMBED_TARGETS = ("lm_head",)


@dataclass
class Routing:
    """Row ranges of the current batch, in row order: (adapter key, first row, end row)."""

    groups: list[tuple[str, int, int]] = field(default_factory=list)
    num_rows: int = 0

    def set(self, groups: list[tuple[str, int, int]]) -> None:
        self.groups = groups
        self.num_rows = groups[-1][2] if groups else 0


@dataclass
class LoraWeights:
    A: nn.Parameter  # [rank, in_features]
    B: nn.Parameter  # [out_features, rank]
    scaling: float


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, routing: Routing):
        super().__init__()
        self.base = base
        self.routing = routing
        self.adapters: dict[str, LoraWeights] = {}

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (transformers ties lm_head to the embedding through it)."""
        return self.base.weight

    def new_adapter(self, key: str, rank: int, alpha: float, generator: torch.Generator) -> LoraWeights:
        weight = self.base.weight
        A = torch.empty(rank, self.base.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        B = torch.zeros(self.base.out_features, rank, dtype=torch.float32)
        lora = LoraWeights(
            A=nn.Parameter(A.to(weight.device)), B=nn.Parameter(B.to(weight.device)), scaling=alpha / rank
        )
        self.adapters[key] = lora
        return lora

    def delta(self, x: torch.Tensor, lora: LoraWeights) -> torch.Tensor:
        out = F.linear(F.linear(x.to(lora.A.dtype), lora.A), lora.B) * lora.scaling
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        active = [(self.adapters.get(key), start, end) for key, start, end in self.routing.groups]
        if not any(lora is not None for lora, _, _ in active):
            return y
        if len(active) == 1 and active[0][1] == 0 and active[0][2] == x.shape[0]:
            return y + self.delta(x, active[0][0])
        pieces = []
        for lora, start, end in active:
            rows = y[start:end]
            pieces.append(rows if lora is None else rows + self.delta(x[start:end], lora))
        return torch.cat(pieces, dim=0)


def target_scope(module_name: str) -> str | None:
    """'attn', 'mlp' or 'unembed' for a LoRA-able module name, None otherwise."""
    leaf = module_name.rsplit(".", 1)[-1]
    if leaf in ATTN_TARGETS:
        return "attn"
    if leaf in MLP_TARGETS:
        return "mlp"
    if leaf in UNEMBED_TARGETS:
        return "unembed"
    return None


def install_lora_layers(model: nn.Module, routing: Routing) -> dict[str, LoraLinear]:
    """Replace every LoRA-able nn.Linear of `model` by a LoraLinear; returns them by module name."""
    layers: dict[str, LoraLinear] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or target_scope(name) is None:
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoraLinear(module, routing)
        setattr(parent, leaf, layer)
        layers[name] = layer
    return layers
