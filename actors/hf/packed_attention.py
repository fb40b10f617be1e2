"""Block-diagonal causal attention for packed passes: the rows of a pass as one [1, N] sequence.

- Registered with transformers' `AttentionInterface` as "thinker_packed"; the HF backend sets it
  on its model once. A forward that carries `cu_seq_lens_q` (the rows' cumulative lengths, as
  flash-attention's varlen kwargs, which transformers hands down to attention functions) attends
  within each row only: one causal SDPA per row length, so no N x N mask is built and no score
  across rows is computed.
- Every other forward (sampling with its KV cache and left padding, padded passes) is exactly
  transformers' sdpa: the attention falls back to `sdpa_attention_forward` and the mask function
  registered beside it is `sdpa_mask`.
- A forward that carries a `FoldedStep` (kwarg `FOLDED_STEP`) is a decode step and the prefill of
  prompt chunks in one [1, N] sequence: one token per decode row first, each attending to its
  row's keys and values in the continuous batch's slot cache, then prompt chunks back to back,
  each attending causally within its own prompt: a first chunk within itself (as a packed pass),
  a later one to its prompt's earlier chunks too. Each layer's prompt keys and values are kept,
  for the next chunk or for the prompt's rows to join the batch.
- A packed forward passes an all-ones [1, N] attention mask: without one, transformers sees the
  position ids restart and would build the N x N block mask; with it, sdpa's mask function returns
  None (no padding, no cache). Packed position ids without `cu_seq_lens_q` and without a mask still
  get that correct (slow) block mask, but only with `use_cache=False`: transformers detects packing
  only without a cache, and `use_cache` defaults to True (as in stock transformers' sdpa).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

PACKED_ATTENTION = "thinker_packed"
FOLDED_STEP = "thinker_folded_step"  # the forward kwarg that carries a FoldedStep


@dataclass
class FoldedStep:
    """What a folded forward's attention needs (see the module): `rows` decode tokens first, whose
    keys and values `slots` (a SlotCache, `attend_step`) writes and attends over with `attn_mask`,
    then prompt chunks of `prompt_lengths` tokens. A chunk with a `past` (its prompt's earlier
    chunks' keys and values per layer, [1, kv heads, past, head dim]) attends to that too; the
    chunks without one come first. Filled during the forward: each layer's prompt keys and values."""

    slots: Any
    attn_mask: torch.Tensor | None  # [rows, 1, 1, width + 1], from SlotCache.mask
    rows: int
    prompt_lengths: list[int]
    pasts: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = field(default_factory=list)
    prompt_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self):
        self.pasts = self.pasts or [None] * len(self.prompt_lengths)
        self._fresh = sum(1 for past in self.pasts if past is None)
        self._with_past: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        if any(past is not None for past in self.pasts[: self._fresh]):
            raise ValueError("the prompt chunks that start their prompt come first")

    def prompt_cache(self, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Chunk `index`'s prompt so far (its past and itself): keys and values per layer."""
        if self.pasts[index] is not None:
            return [self._with_past[layer, index] for layer in sorted(self.prompt_kv)]
        start = sum(self.prompt_lengths[:index])
        end = start + self.prompt_lengths[index]
        return [(k[:, :, start:end], v[:, :, start:end]) for _, (k, v) in sorted(self.prompt_kv.items())]

    def attend(self, module, query_1HND, key_1GND, value_1GND, scaling: float | None) -> torch.Tensor:
        n, layer = self.rows, module.layer_idx
        parts = []
        if n:
            sdpa = {"attn_mask": self.attn_mask, "scale": scaling}
            parts.append(
                self.slots.attend_step(layer, *(t[:, :, :n] for t in (query_1HND, key_1GND, value_1GND)), **sdpa)
            )
        if not self.prompt_lengths:
            return torch.cat(parts, dim=1)
        q, k, v = (t[:, :, n:] for t in (query_1HND, key_1GND, value_1GND))
        self.prompt_kv[layer] = (k, v)
        fresh = sum(self.prompt_lengths[: self._fresh])
        if fresh:  # whole prompts, or first chunks: a packed pass
            bounds = torch.tensor([0, *self.prompt_lengths[: self._fresh]]).cumsum(0)
            head = (t[:, :, :fresh] for t in (q, k, v))
            parts.append(packed_attention_forward(module, *head, None, scaling=scaling, cu_seq_lens_q=bounds)[0])
        start = fresh
        for index in range(self._fresh, len(self.prompt_lengths)):
            length = self.prompt_lengths[index]
            chunk_q, chunk_k, chunk_v = (t[:, :, start : start + length] for t in (q, k, v))
            past_k, past_v = self.pasts[index][layer]
            keys, values = torch.cat([past_k, chunk_k], dim=2), torch.cat([past_v, chunk_v], dim=2)
            self._with_past[layer, index] = (keys, values)
            before = past_k.shape[2]  # query i sees the past and the chunk's tokens up to i
            columns = torch.arange(before + length, device=q.device)
            mask = columns[None] <= before + torch.arange(length, device=q.device)[:, None]
            gqa = chunk_q.shape[1] != keys.shape[1]
            out = F.scaled_dot_product_attention(chunk_q, keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa)
            parts.append(out.transpose(1, 2))
            start += length
        return torch.cat(parts, dim=1)


def packed_attention_forward(
    module: torch.nn.Module,
    query_1HND: torch.Tensor,
    key_1GND: torch.Tensor,
    value_1GND: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: returns ([batch, tokens, heads, head_dim], None)."""
    folded = kwargs.get(FOLDED_STEP)
    if folded is not None:
        if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None or dropout:
            raise ValueError("a folded step supports neither softcap, a position bias nor dropout")
        return folded.attend(module, query_1HND, key_1GND, value_1GND, scaling), None
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        return sdpa_attention_forward(
            module, query_1HND, key_1GND, value_1GND, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if attention_mask is not None or query_1HND.shape[0] != 1 or not getattr(module, "is_causal", True):
        raise ValueError("packed attention takes one causal [1, N] sequence without an attention mask")
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError("packed attention supports neither softcap nor a position bias")
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    rows_by_length: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        rows_by_length.setdefault(length, []).append(row)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    q_rows, k_rows, v_rows = (t.split(lengths, dim=2) for t in (query_1HND, key_1GND, value_1GND))
    out_rows: list[torch.Tensor | None] = [None] * len(lengths)
    for rows in rows_by_length.values():  # rows of one length share a call: [rows, heads, length, head_dim]
        q, k, v = (torch.cat([parts[r] for r in rows]) for parts in (q_rows, k_rows, v_rows))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
        for row, row_out in zip(rows, out.split(1)):
            out_rows[row] = row_out
    return torch.cat(out_rows, dim=2).transpose(1, 2).contiguous(), None


def packed_forward_kwargs(row_lengths: list[int], device: torch.device) -> dict:
    """What a packed forward passes to the decoder besides input_ids and position_ids."""
    cu_seqlens = torch.tensor([0, *row_lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    longest = max(row_lengths)
    return {
        "attention_mask": torch.ones((1, sum(row_lengths)), dtype=torch.bool, device=device),
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def install_packed_attention(model) -> bool:
    """Make `model` use packed attention (sdpa unless a forward carries `cu_seq_lens_q`); False, and
    the model untouched, where packing would not be exact: another attention implementation, a
    sliding window, or no `.model` decoder to run on its own."""
    config = model.config
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    full_attention = all(kind == "full_attention" for kind in layer_types)
    if (
        config._attn_implementation != "sdpa"
        or not full_attention
        or getattr(config, "sliding_window", None) is not None
        or getattr(model, "model", None) is None
    ):
        return False
    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    model.set_attn_implementation(PACKED_ATTENTION)
    return True
