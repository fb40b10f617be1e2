"""Multi-adapter LoRA layers: one frozen base projection, many adapters, each over its own rows.

- `LoraLinear` wraps a frozen `nn.Linear`. A shared `Routing`, set by the backend before each
  pass, names each unit's adapter: a batch row, or a token of a packed [1, N] pass (whose rows
  are token ranges). The base projection runs once for the whole batch.
- One adapter for every unit: `y + s * B(A(x))`, exactly PEFT's computation.
- Several adapters: a grouped matmul. Units are gathered into [groups, units per group] (padded
  with a zero unit), each group is multiplied by its own stacked A and B (ranks zero-padded to
  the largest; zero rows and columns change nothing and get zero gradient), and the result is
  gathered back per unit. Two `bmm`s per layer, whatever the number of adapters.
- Unless the groups are so uneven that padding would be most of the grouped layout (a long
  prompt of one adapter beside a decode token each of others'): then each adapter's units go
  through two matmuls of their own, written into the delta at their places; no padding.
- Adapters marked frozen for a pass (forward-only requests) contribute without taking gradients.
- Init follows PEFT: A ~ kaiming_uniform(a=sqrt(5)), B = 0, scaling = alpha / rank.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from actors.work import target_scope

UNEVEN = 2  # padded layout over this many times the units: each adapter apart instead


@dataclass
class GroupedLayout:
    """Units gathered per adapter: `gather` [groups, width] (pad: the zero unit, index = number of
    units) and `scatter`, each unit's position in the flattened [groups * width] layout."""

    gather: torch.Tensor
    scatter: torch.Tensor
    in_order: bool  # units come grouped, in equal groups: the grouped layout is the batch itself

    @staticmethod
    def of(group_U: torch.Tensor, groups: int, device: torch.device) -> GroupedLayout:
        units = int(group_U.shape[0])
        counts_G = torch.bincount(group_U, minlength=groups)
        width = int(counts_G.max())
        order_U = torch.argsort(group_U, stable=True)
        sorted_U = group_U[order_U]
        slot_U = torch.arange(units) - (torch.cumsum(counts_G, 0) - counts_G)[sorted_U]
        gather = torch.full((groups, width), units, dtype=torch.long)
        gather[sorted_U, slot_U] = order_U
        scatter = torch.empty(units, dtype=torch.long)
        scatter[order_U] = sorted_U * width + slot_U
        in_order = bool((counts_G == width).all()) and bool((order_U == torch.arange(units)).all())
        return GroupedLayout(gather.to(device), scatter.to(device), in_order)


@dataclass
class Routing:
    """Which adapter key each unit of the current batch uses ("" = none), and which are frozen.

    A unit is a batch row, or, in a packed pass (`row_tokens` given), one token of the [1, N]
    sequence: LoRA layers then see their input as [units, tokens per unit, features]."""

    keys: list[str] = field(default_factory=list)  # the distinct keys, in first-row order
    single: str | None = None  # set when every row uses the same key (the fast path)
    frozen: frozenset[str] = frozenset()
    _group_U: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # key index per unit
    _layouts: dict[torch.device, GroupedLayout] = field(default_factory=dict)
    _rows: dict[torch.device, list[tuple[str, torch.Tensor]]] = field(default_factory=dict)

    def set(
        self, row_keys: list[str], frozen: frozenset[str] = frozenset(), row_tokens: list[int] | None = None
    ) -> None:
        """Route rows to adapters; with `row_tokens`, the rows are consecutive token ranges of one sequence."""
        index = {}
        group_R = torch.tensor([index.setdefault(key, len(index)) for key in row_keys], dtype=torch.long)
        self.keys = list(index)
        self.single = self.keys[0] if len(self.keys) == 1 else None
        self.frozen = frozen
        self._group_U = group_R if row_tokens is None else group_R.repeat_interleave(torch.tensor(row_tokens))
        self._layouts, self._rows = {}, {}

    @property
    def num_units(self) -> int:
        return int(self._group_U.shape[0])

    @contextmanager
    def narrow(self, units_S: torch.Tensor):
        """Route only these units (e.g. the scored tokens a slice of the LM head sees) inside the block.

        NOTE: a checkpointed function that calls LoRA layers on a subset must enter this itself, so
        that its recomputation in backward sees the same routing."""
        if self.single is not None:
            yield
            return
        saved = self._group_U, self._layouts, self._rows
        self._group_U, self._layouts, self._rows = self._group_U[units_S.cpu()], {}, {}
        try:
            yield
        finally:
            self._group_U, self._layouts, self._rows = saved

    def rows(self, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """(key, its unit indices) for every key of the batch, in `keys` order (built once per batch)."""
        if device not in self._rows:
            self._rows[device] = [
                (key, torch.nonzero(self._group_U == g)[:, 0].to(device)) for g, key in enumerate(self.keys)
            ]
        return self._rows[device]

    def layout(self, device: torch.device) -> GroupedLayout:
        if device not in self._layouts:
            self._layouts[device] = GroupedLayout.of(self._group_U, len(self.keys), device)
        return self._layouts[device]


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
        layout = self.routing.layout(x.device)
        # [units, tokens per unit, in]: rows of a padded batch, or single tokens of a packed pass
        x_U = x.to(torch.float32).reshape(self.routing.num_units, -1, self.base.in_features)
        if layout.gather.numel() > UNEVEN * self.routing.num_units:
            return self._delta_per_adapter(x_U, loras).reshape(*x.shape[:-1], -1)
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
        groups, width = layout.gather.shape
        if layout.in_order:  # units already grouped, no padding: reshape instead of copying
            grouped = x_U.reshape(groups, -1, self.base.in_features)
        else:
            grouped = torch.cat([x_U, x_U.new_zeros(1, *x_U.shape[1:])])[layout.gather].reshape(
                groups, -1, self.base.in_features
            )
        hidden = torch.bmm(grouped, torch.stack(A_stack).transpose(1, 2))  # [groups, width * tokens, rank]
        delta = torch.bmm(hidden, torch.stack(B_stack).transpose(1, 2)).reshape(groups * width, x_U.shape[1], -1)
        return (delta if layout.in_order else delta[layout.scatter]).reshape(*x.shape[:-1], -1)

    def _delta_per_adapter(self, x_U: torch.Tensor, loras: list[LoraWeights | None]) -> torch.Tensor:
        """The grouped delta without padding: two matmuls per adapter over its own units."""
        delta = x_U.new_zeros(*x_U.shape[:2], self.base.out_features)
        for (key, units), lora in zip(self.routing.rows(x_U.device), loras):
            if lora is not None:
                A, B = self._weights(key, lora)
                delta.index_copy_(0, units, F.linear(F.linear(x_U[units], A), B) * lora.scaling)
        return delta


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
