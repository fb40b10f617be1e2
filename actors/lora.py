"""Multi-adapter LoRA layers: one frozen base projection, many adapters, each over its own rows.

- `LoraLinear` wraps a frozen `nn.Linear`. A shared `Routing`, set by the backend before each
  pass, names each batch row's adapter. The base projection runs once for the whole batch.
- One adapter for every row: `y + s * B(A(x))`, exactly PEFT's computation.
- Several adapters: a grouped matmul. Rows are gathered into [groups, rows per group] (padded
  with a zero row), each group is multiplied by its own stacked A and B (ranks zero-padded to
  the largest; zero rows and columns change nothing and get zero gradient), and the result is
  gathered back per row. Two `bmm`s per layer, whatever the number of adapters.
- Adapters marked frozen for a pass (forward-only requests) contribute without taking gradients.
- Init follows PEFT: A ~ kaiming_uniform(a=sqrt(5)), B = 0, scaling = alpha / rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from actors.work import target_scope


@dataclass
class Routing:
    """Which adapter key each row of the current batch uses ("" = none), and which are frozen."""

    keys: list[str] = field(default_factory=list)  # the distinct keys, in first-row order
    single: str | None = None  # set when every row uses the same key (the fast path)
    in_order: bool = False  # rows come grouped, in equal groups: the grouped layout is the batch
    frozen: frozenset[str] = frozenset()
    _groups: list[list[int]] = field(default_factory=list)
    _indices: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _rows: dict[torch.device, list[tuple[str, torch.Tensor]]] = field(default_factory=dict)

    def set(self, row_keys: list[str], frozen: frozenset[str] = frozenset()) -> None:
        groups: dict[str, list[int]] = {}
        for row, key in enumerate(row_keys):
            groups.setdefault(key, []).append(row)
        self.keys = list(groups)
        self._groups = list(groups.values())
        self.single = self.keys[0] if len(self.keys) == 1 else None
        sizes = {len(g) for g in self._groups}
        self.in_order = len(sizes) == 1 and [r for g in self._groups for r in g] == list(range(len(row_keys)))
        self.frozen = frozen
        self._indices, self._rows = {}, {}

    def rows(self, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """(key, its row indices) for every key of the batch, in `keys` order (built once per batch)."""
        if device not in self._rows:
            self._rows[device] = [
                (key, torch.tensor(rows, device=device)) for key, rows in zip(self.keys, self._groups)
            ]
        return self._rows[device]

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """gather [groups, max rows] (pad: the zero row, index = number of rows) and, per row,
        its position in the flattened [groups * max rows] layout."""
        if device not in self._indices:
            num_rows = sum(len(g) for g in self._groups)
            width = max(len(g) for g in self._groups)
            gather = torch.full((len(self._groups), width), num_rows, dtype=torch.long)
            scatter = torch.empty(num_rows, dtype=torch.long)
            for i, rows in enumerate(self._groups):
                gather[i, : len(rows)] = torch.tensor(rows)
                scatter[rows] = torch.arange(len(rows)) + i * width
            self._indices[device] = (gather.to(device), scatter.to(device))
        return self._indices[device]


@dataclass
class LoraWeights:
    A: torch.Tensor  # [rank, in_features] (a Parameter for training models)
    B: torch.Tensor  # [out_features, rank]
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        routing = self.routing
        if routing.single is not None:
            lora = self.adapters.get(routing.single)
            if lora is None:
                return y
            A, B = self._weights(routing.single, lora)
            return y + (F.linear(F.linear(x.to(A.dtype), A), B) * lora.scaling).to(y.dtype)
        loras = [self.adapters.get(key) for key in routing.keys]
        if all(lora is None for lora in loras):
            return y
        return y + self._grouped_delta(x, loras).to(y.dtype)

    def _weights(self, key: str, lora: LoraWeights) -> tuple[torch.Tensor, torch.Tensor]:
        if key in self.routing.frozen:
            return lora.A.detach(), lora.B.detach()
        return lora.A, lora.B

    def _grouped_delta(self, x: torch.Tensor, loras: list[LoraWeights | None]) -> torch.Tensor:
        rank = max(lora.A.shape[0] for lora in loras if lora is not None)
        A_stack, B_stack = [], []
        for key, lora in zip(self.routing.keys, loras):
            if lora is None:
                A_stack.append(x.new_zeros(rank, self.base.in_features, dtype=torch.float32))
                B_stack.append(x.new_zeros(self.base.out_features, rank, dtype=torch.float32))
                continue
            A, B = self._weights(key, lora)
            pad = rank - A.shape[0]
            A_stack.append(F.pad(A, (0, 0, 0, pad)) if pad else A)
            B_stack.append((F.pad(B, (0, pad)) if pad else B) * lora.scaling)  # scale the small side
        gather, scatter = self.routing.indices(x.device)
        groups, width = gather.shape
        rest = x.shape[1:-1]
        x32 = x.to(torch.float32)
        if self.routing.in_order:  # rows already grouped, no padding: reshape instead of copying
            grouped = x32.reshape(groups, -1, self.base.in_features)
        else:
            grouped = torch.cat([x32, x32.new_zeros(1, *x.shape[1:])])[gather].reshape(
                groups, -1, self.base.in_features
            )
        hidden = torch.bmm(grouped, torch.stack(A_stack).transpose(1, 2))  # [groups, width * tokens, rank]
        delta = torch.bmm(hidden, torch.stack(B_stack).transpose(1, 2)).reshape(groups * width, *rest, -1)
        return delta if self.routing.in_order else delta[scatter]


def init_lora_weights(
    modules: list[tuple[str, int, int]], rank: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's init of a new adapter: for each (HF module name, in_features, out_features), in the
    given order from one generator seeded with `seed`, A ~ kaiming_uniform(a=sqrt(5)) [rank, in]
    and B = 0 [out, rank]; float32 on the CPU. Both backends call this with the modules in HF
    order, so the same seed gives the same adapter in either."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, in_features, out_features in modules:
        A = torch.empty(rank, in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        weights[name] = (A, torch.zeros(out_features, rank))
    return weights


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
