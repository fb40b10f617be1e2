"""The continuous batch's KV cache: rows in slots of buffers allocated ahead, written in place.

- Each layer's keys and values live in two buffers [row slots, kv heads, columns, head dim]. The
  batch's n rows are slots 0..n-1 and its tokens are the columns [lo, hi); a row's real tokens
  are always its last `cached` columns (rows are left-padded, right-aligned at hi), so the
  attention mask follows from each row's count.
- A forward writes its new keys and values at the columns from hi on, in place; the model reads
  views [:n, :, lo:hi]. (A DynamicCache concatenates at every step: it copies the whole cache once
  per decode step.)
- A row that leaves is replaced by a row moved down from the end (a copy of that row only, not of
  the cache), and columns no row needs any more are given up by moving lo right.
- Rows that join are written into the slots after the last, right-aligned at hi.
- When the buffers are too small (rows, or columns right of hi, or room left of hi for a longer
  joining row) the window moves into new buffers with room to spare: half its width again (at
  least `SPARE_COLUMNS`) and twice the row slots (up to `max_rows`), so the whole cache is copied
  once in many steps, not at every one. An empty batch frees its buffers.
- Padding columns inside the window hold zeros, written when a row joins or the window widens:
  a slot or column a row left may hold its non-finite keys (a diverged adapter), and a masked
  NaN still makes the attention NaN, which would fail the next request in that slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

SPARE_COLUMNS = 64  # at least this many columns of room after a move, so moves are rare


class SlotCache:
    """The batch's keys and values (see the module); `cache` is what the model's forward takes."""

    def __init__(self, max_rows: int):
        self._max_rows = max_rows
        self._keys: list[torch.Tensor] = []  # per layer: [row slots, kv heads, columns, head dim]
        self._values: list[torch.Tensor] = []
        self.rows = 0
        self.lo = self.hi = 0
        self.cache = Cache(layers=[])

    @property
    def width(self) -> int:
        return self.hi - self.lo

    def mask(self, cached: torch.Tensor, extra: int = 0) -> torch.Tensor:
        """The attention mask [rows, width + extra] of rows holding `cached` real tokens each (the
        extra columns are the ones a forward is about to write, real for every row)."""
        columns = torch.arange(self.width + extra, device=cached.device)
        return (columns[None, :] >= (self.width - cached)[:, None]).long()

    def append(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Rows whose keys and values ([count, kv heads, length, head dim] per layer, broadcasts allowed)
        hold `length` tokens join as the last slots; the batch is unchanged if this raises."""
        count = pairs[0][0].shape[0]
        if not self._keys:
            self._allocate(pairs[0][0], len(pairs), count, length)
        elif self.rows + count > self._keys[0].shape[0] or length > self.hi:
            self._move(self.rows + count, max(self.width, length))
        start = self.hi - length
        lo = min(self.lo, start)
        for keys, values, (k, v) in zip(self._keys, self._values, pairs):
            for buffer, new in ((keys, k), (values, v)):
                buffer[self.rows : self.rows + count, :, start : self.hi].copy_(new)
                buffer[self.rows : self.rows + count, :, lo:start].zero_()  # a row that left may have left NaN
                buffer[: self.rows, :, lo : self.lo].zero_()  # the window widens left: padding of the others
        self.rows += count
        self.lo = lo
        self._views()

    def reserve(self, columns: int) -> None:
        """Room for a forward that writes `columns` more tokens per row (call before it)."""
        if self.hi + columns > self._keys[0].shape[2]:
            self._move(self.rows, self.width + columns)

    def attend_step(
        self, layer: int, query_1HRD: torch.Tensor, key_1GRD: torch.Tensor, value_1GRD: torch.Tensor, **sdpa
    ) -> torch.Tensor:
        """One decode step's attention in `layer` without the Cache API (a step folded with other
        tokens into one [1, N] forward): each row's new key and value ([1, kv heads, rows, head dim],
        one token per row) are written at column hi (`reserve(1)` before the forward, `advance(1)`
        after it), and its query attends to its window and that token. `sdpa` carries `attn_mask`
        ([rows, 1, 1, width + 1], from `mask`) and `scale`. Returns [1, rows, heads, head dim]."""
        keys, values = self._keys[layer], self._values[layer]
        end = self.hi + 1
        keys[: self.rows, :, self.hi].copy_(key_1GRD[0].transpose(0, 1))
        values[: self.rows, :, self.hi].copy_(value_1GRD[0].transpose(0, 1))
        query_RH1D = query_1HRD[0].transpose(0, 1).unsqueeze(2)
        keys_RGWD, values_RGWD = keys[: self.rows, :, self.lo : end], values[: self.rows, :, self.lo : end]
        gqa = query_RH1D.shape[1] != keys_RGWD.shape[1]
        out_RH1D = F.scaled_dot_product_attention(query_RH1D, keys_RGWD, values_RGWD, enable_gqa=gqa, **sdpa)
        return out_RH1D[:, :, 0].unsqueeze(0)

    def advance(self, columns: int) -> None:
        """The forward wrote `columns` tokens per row at hi: they are part of the window now."""
        self.hi += columns
        self._views()

    def keep(self, kept: list[int], width: int) -> list[int]:
        """Keep the rows at slots `kept` (ascending) and the last `width` columns; the old slot of
        each row in its new order. Each row that moves is copied alone, from the end into a gap."""
        if not kept:
            self._keys, self._values, self.rows, self.lo, self.hi = [], [], 0, 0, 0
            self.cache.layers = []
            return []
        count = len(kept)
        order = list(range(count))
        staying = set(kept)
        gaps = [slot for slot in range(count) if slot not in staying]
        movers = [slot for slot in kept if slot >= count]
        for gap, mover in zip(gaps, movers):
            order[gap] = mover
        if gaps:
            src = torch.tensor(movers, device=self._keys[0].device)
            dst = torch.tensor(gaps, device=self._keys[0].device)
            for buffers in (self._keys, self._values):
                for buffer in buffers:
                    window = buffer[:, :, self.lo : self.hi]
                    window.index_copy_(0, dst, window.index_select(0, src))
        self.rows = count
        self.lo = self.hi - width
        self._views()
        return order

    def _allocate(self, like: torch.Tensor, layers: int, rows: int, length: int) -> None:
        shape = (max(rows, min(self._max_rows, 2 * rows)), like.shape[1], _with_room(length), like.shape[3])
        self._keys = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(layers)]
        self._values = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(layers)]
        self.rows, self.lo, self.hi = 0, length, length
        self.cache.layers = [_SlotLayer(self, i) for i in range(layers)]

    def _move(self, rows: int, width: int) -> None:
        """New buffers for `rows` rows and a window of `width` columns ending at hi, with room to
        spare; the live window is copied over."""
        old = self._keys[0]
        slots = max(rows, min(self._max_rows, 2 * old.shape[0])) if rows > old.shape[0] else old.shape[0]
        shape = (slots, old.shape[1], _with_room(width), old.shape[3])
        hi = width
        moved = []
        for buffers in (self._keys, self._values):
            fresh = []
            for buffer in buffers:
                new = torch.zeros(shape, dtype=buffer.dtype, device=buffer.device)
                new[: self.rows, :, hi - self.width : hi] = buffer[: self.rows, :, self.lo : self.hi]
                fresh.append(new)
            moved.append(fresh)
        self._keys, self._values = moved
        self.lo, self.hi = hi - self.width, hi
        self._views()

    def _views(self) -> None:
        for layer in self.cache.layers:
            layer.refresh()

    def layer_buffers(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._keys[index], self._values[index]


def _with_room(width: int) -> int:
    """Columns for a window of `width`: half as many again to spare, at least SPARE_COLUMNS."""
    return width + max(SPARE_COLUMNS, width // 2)


class _SlotLayer(DynamicLayer):
    """One layer of a SlotCache as transformers' attention sees it: `update` writes in place.
    The SlotCache alone changes rows and columns: the Cache API's own ways to do that refuse."""

    is_croppable = False

    def __init__(self, owner: SlotCache, index: int):
        super().__init__()
        self._owner, self._index = owner, index
        self.is_initialized = True
        self.refresh()

    def refresh(self) -> None:
        keys, values = self._owner.layer_buffers(self._index)
        owner = self._owner
        self.keys = keys[: owner.rows, :, owner.lo : owner.hi]
        self.values = values[: owner.rows, :, owner.lo : owner.hi]
        self.device = keys.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        owner = self._owner
        keys, values = owner.layer_buffers(self._index)
        end = owner.hi + key_states.shape[2]
        keys[: owner.rows, :, owner.hi : end].copy_(key_states)
        values[: owner.rows, :, owner.hi : end].copy_(value_states)
        return keys[: owner.rows, :, owner.lo : end], values[: owner.rows, :, owner.lo : end]

    def get_seq_length(self) -> int:
        return self._owner.width

    def _owned_by_the_slot_cache(self, *args, **kwargs):
        raise NotImplementedError("a SlotCache layer's rows and columns change only through its SlotCache")

    crop = batch_repeat_interleave = batch_select_indices = reorder_cache = _owned_by_the_slot_cache
    reset = offload = prefetch = _owned_by_the_slot_cache
