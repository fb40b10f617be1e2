"""Tensor-parallel LoRA on megatron-core's parallel linears, module for module Hugging Face's.

megatron fuses q/k/v into `linear_qkv` and gate/up into `linear_fc1`; an adapter still holds one
LoRA per HF module (q_proj, k_proj, ...), so a checkpoint is a plain PEFT adapter and the
arithmetic is exactly the HF backend's.
- Column-parallel bases (linear_qkv, linear_fc1, output_layer): A is replicated [r, in] and B is
  sharded by output rows [out/tp, r]; `copy_to_tensor_model_parallel_region(x A^T)` makes A's
  gradient the sum over TP ranks. The pieces' outputs are laid out as the fused weight is.
- Row-parallel bases (linear_proj = o_proj, linear_fc2 = down_proj): A is sharded by input
  columns [r, in/tp] and B is replicated [out, r]; `reduce_from_tensor_model_parallel_region`
  sums the partial x A^T over TP ranks.
- One pass may hold several adapters: each adds its delta on its own rows (batch dim 1 of
  megatron's [s, b, h]); frozen adapters (samplers, forward-only requests) take no gradient.
- Gradients enter each wrapped linear contiguous: megatron hands the output layer a transposed
  [s, b, vocab] gradient, and its frozen-weight backward matmul on that layout measured 4-17x
  slower on CPU than on a contiguous copy (worst for small micro-batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from actors.lora import LoraWeights, Routing


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on a contiguous gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(t) if t.requires_grad else t


@dataclass(frozen=True)
class Piece:
    """One HF module inside a megatron linear."""

    hf_name: str  # e.g. model.layers.3.self_attn.q_proj
    out_features: int  # full HF sizes
    in_features: int


class MegatronLoraLinear(nn.Module):
    def __init__(self, base: nn.Module, pieces: list[Piece], column: bool, layout: str, routing: Routing, heads=None):
        super().__init__()
        self.base = base
        self.pieces = pieces
        self.column = column  # column-parallel (else row-parallel)
        self.layout = layout  # "qkv", "concat" or "single"
        self.heads = heads  # (query heads, query groups, head dim) for "qkv"
        self.routing = routing
        self.adapters: dict[str, dict[str, LoraWeights]] = {}

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (GPTModel reads the output layer's to tie it with the embedding)."""
        return self.base.weight

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        if self.routing.single is not None:
            delta = self._adapter_delta(self.routing.single, x)
            return _contiguous_grad(out if delta is None else out + delta.to(out.dtype)), bias
        for key, rows in self.routing.rows(x.device):  # several adapters: each on its rows (dim 1)
            delta = self._adapter_delta(key, x.index_select(1, rows))
            if delta is not None:
                out = out.index_add(1, rows, delta.to(out.dtype))
        return _contiguous_grad(out), bias

    def _adapter_delta(self, key: str, x: torch.Tensor) -> torch.Tensor | None:
        loras = self.adapters.get(key)
        if not loras:
            return None
        frozen = key in self.routing.frozen
        return self._arrange([self._delta(x, loras[p.hf_name], frozen) for p in self.pieces])

    def _delta(self, x: torch.Tensor, lora: LoraWeights, frozen: bool) -> torch.Tensor:
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        A, B = (lora.A.detach(), lora.B.detach()) if frozen else (lora.A, lora.B)
        hidden = F.linear(x.to(A.dtype), A)
        if self.column:
            hidden = copy_to_tensor_model_parallel_region(hidden)
        else:
            hidden = reduce_from_tensor_model_parallel_region(hidden)
        return F.linear(hidden, B) * lora.scaling

    def _arrange(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        if self.layout == "single":
            return deltas[0]
        if self.layout == "concat":
            return torch.cat(deltas, dim=-1)
        q, k, v = deltas  # per local query group: its query heads, its K head, its V head
        heads, groups, head_dim = self.heads
        lead = q.shape[:-1]
        local_groups = k.shape[-1] // head_dim
        q = q.reshape(*lead, local_groups, heads // groups * head_dim)
        k = k.reshape(*lead, local_groups, head_dim)
        v = v.reshape(*lead, local_groups, head_dim)
        return torch.cat([q, k, v], dim=-1).reshape(*lead, -1)

    # ---- adapter weights: local shards <-> full HF tensors ------------------------------------

    def add(self, key: str, full: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float, trainable: bool):
        """Install an adapter from full HF-shaped (A, B) per piece, keeping this rank's shard."""
        device = _device_of(self.base)
        loras = {}
        for piece in self.pieces:
            A, B = (self.shard(which, t) for which, t in zip("AB", full[piece.hf_name]))
            A = A.to(device, torch.float32).contiguous().clone()
            B = B.to(device, torch.float32).contiguous().clone()
            if trainable:
                A, B = nn.Parameter(A), nn.Parameter(B)
                A.tensor_model_parallel, B.tensor_model_parallel = not self.column, self.column
            loras[piece.hf_name] = LoraWeights(A=A, B=B, scaling=scaling)
        self.adapters[key] = loras

    def shard(self, which: str, full: torch.Tensor) -> torch.Tensor:
        """This TP rank's part of a full HF-shaped A or B (or of its AdamW moment)."""
        tp_rank, tp = _tp()
        if self.column and which == "B":
            return full.chunk(tp)[tp_rank]
        if not self.column and which == "A":
            return full.chunk(tp, dim=1)[tp_rank]
        return full

    def full(self, key: str, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        """The adapter's (or the given local tensors') full HF-shaped (A, B) per piece (a TP collective)."""
        tensors = tensors or {name: (w.A, w.B) for name, w in self.adapters[key].items()}
        full = {}
        for piece in self.pieces:
            A, B = (t.detach() for t in tensors[piece.hf_name])
            if self.column:
                B = _gather(B, dim=0)
            else:
                A = _gather(A, dim=1)
            full[piece.hf_name] = (A.cpu(), B.cpu())
        return full


def _tp() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def _gather(shard: torch.Tensor, dim: int) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(size)]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _device_of(module: nn.Module) -> torch.device:
    """Where the base computes (a tied output layer owns no parameters of its own)."""
    param = next(module.parameters(), None)
    if param is not None:
        return param.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
