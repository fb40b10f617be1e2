"""The slot cache (actors.kv_slots) against a plain reference: through random joins, decode steps
and departures, every row's real keys and values are where the mask says, in order, and the
window moves to new buffers rarely; a decode step through it gives a DynamicCache's logits."""

import random

import torch
from transformers import DynamicCache

from actors import kv_slots
from actors.kv_slots import SlotCache

LAYERS, HEADS, DIM = 3, 2, 4


def _kv(rows: int, length: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.randn(rows, HEADS, length, DIM, generator=gen), torch.randn(rows, HEADS, length, DIM, generator=gen))
        for _ in range(LAYERS)
    ]


def _check(kv: SlotCache, reference: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """Slot i holds reference row i: its tokens are the last columns of the window, the mask marks
    exactly them, and the cache's layers show the same window."""
    assert kv.rows == len(reference)
    cached = torch.tensor([ref[0][0].shape[1] for ref in reference])
    mask = kv.mask(cached)
    assert mask.shape == (kv.rows, kv.width)
    for slot, ref in enumerate(reference):
        n = ref[0][0].shape[1]
        assert mask[slot].tolist() == [0] * (kv.width - n) + [1] * n
        for layer, (k, v) in zip(kv.cache.layers, ref):
            assert layer.keys.shape == (kv.rows, HEADS, kv.width, DIM)
            torch.testing.assert_close(layer.keys[slot, :, kv.width - n :], k, rtol=0, atol=0)
            torch.testing.assert_close(layer.values[slot, :, kv.width - n :], v, rtol=0, atol=0)
            assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()


def test_random_joins_steps_and_departures_keep_every_row_in_place(monkeypatch):
    monkeypatch.setattr(kv_slots, "SPARE_COLUMNS", 3)  # small room: the window moves often
    gen = torch.Generator().manual_seed(0)
    rnd = random.Random(0)
    kv = SlotCache(max_rows=16)
    reference: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per slot, per layer: [heads, tokens, dim]
    moves = 0
    original_move = SlotCache._move

    def counting_move(self, rows, width):
        nonlocal moves
        moves += 1
        original_move(self, rows, width)

    monkeypatch.setattr(SlotCache, "_move", counting_move)
    for _ in range(300):
        op = rnd.random()
        if op < 0.2 and kv.rows < 12:  # a request of 1..4 rows with one prompt joins
            count, length = rnd.randint(1, 4), rnd.randint(1, 20)
            pairs = _kv(1, length, gen)
            kv.append([(k.expand(count, -1, -1, -1), v.expand(count, -1, -1, -1)) for k, v in pairs], length)
            reference += [[(k[0], v[0]) for k, v in pairs] for _ in range(count)]
        elif op < 0.35 and kv.rows:  # some rows leave
            kept = sorted(rnd.sample(range(kv.rows), rnd.randint(0, kv.rows)))
            width = max((reference[i][0][0].shape[1] for i in kept), default=0)
            order = kv.keep(kept, width)
            assert sorted(order) == kept
            reference = [reference[slot] for slot in order]
        elif kv.rows:  # a decode step: one token per row, written through the layers' update
            step = _kv(kv.rows, 1, gen)
            kv.reserve(1)
            for layer, (k, v) in zip(kv.cache.layers, step):
                keys, values = layer.update(k, v)
                assert keys.shape[2] == kv.width + 1
            kv.advance(1)
            reference = [
                [(torch.cat([rk, k[i]], dim=1), torch.cat([rv, v[i]], dim=1)) for (rk, rv), (k, v) in zip(ref, step)]
                for i, ref in enumerate(reference)
            ]
        _check(kv, reference)
    assert 0 < moves < 100  # far fewer than the steps (a DynamicCache copies everything at each)


def test_a_decode_step_through_slots_matches_a_dynamic_cache():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    lengths = [5, 9, 3]
    prompts = [torch.randint(0, 64, (1, n)) for n in lengths]
    kv = SlotCache(max_rows=4)
    caches = []
    with torch.no_grad():
        for prompt in prompts:  # each prompt prefilled alone, then joined
            cache = DynamicCache()
            model(input_ids=prompt, cache=cache, use_cache=True)
            caches.append(cache)
            kv.append([(layer.keys, layer.values) for layer in cache.layers], prompt.shape[1])
        width = max(lengths)

        def left_padded(i: int, name: str) -> torch.Tensor:
            parts = [
                torch.nn.functional.pad(getattr(c.layers[i], name), (0, 0, width - n, 0))
                for c, n in zip(caches, lengths)
            ]
            return torch.cat(parts)

        layers = range(config.num_hidden_layers)
        padded = DynamicCache(ddp_cache_data=[(left_padded(i, "keys"), left_padded(i, "values")) for i in layers])
        cached = torch.tensor(lengths)
        ids = torch.randint(0, 64, (3, 1))
        expected = model(
            input_ids=ids, attention_mask=kv.mask(cached, extra=1), position_ids=cached[:, None], cache=padded
        ).logits
        kv.reserve(1)
        got = model(
            input_ids=ids, attention_mask=kv.mask(cached, extra=1), position_ids=cached[:, None], cache=kv.cache
        ).logits
        kv.advance(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert kv.width == width + 1


def test_keys_a_leaving_row_leaves_behind_never_reach_the_window_again():
    """A row whose keys are not finite (a diverged adapter) leaves; the rows that take its slot,
    and the window widened over its old columns, hold zeros where they pad, not its NaN."""
    gen = torch.Generator().manual_seed(1)
    kv = SlotCache(max_rows=4)
    kv.append(_kv(1, 4, gen), 4)  # slot 0
    diverged = [(torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))) for k, v in _kv(1, 10, gen)]
    kv.append(diverged, 10)  # slot 1, 10 columns of NaN
    assert kv.keep([0], 4) == [0]  # it leaves; the window narrows to 4
    kv.append(_kv(1, 2, gen), 2)  # slot 1 again, padded over 2 of its old columns
    assert all(torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all() for layer in kv.cache.layers)
    kv.append(_kv(1, 8, gen), 8)  # the window widens left over more of them
    assert kv.width == 8
    assert all(torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all() for layer in kv.cache.layers)
    mask = kv.mask(torch.tensor([4, 2, 8]))
    assert mask.sum(1).tolist() == [4, 2, 8]


def test_attend_step_writes_each_rows_token_and_attends_to_its_own_tokens_only():
    """A folded step's attention (`attend_step`): each row's query sees its own real tokens and the
    new one, never padding; the new key and value are in the window once it advances."""
    gen = torch.Generator().manual_seed(3)
    kv = SlotCache(max_rows=4)
    lengths = [5, 2, 7]
    rows = [_kv(1, n, gen) for n in lengths]
    for pairs, n in zip(rows, lengths):
        kv.append(pairs, n)
    cached = torch.tensor(lengths)
    queries = torch.randn(1, 2 * HEADS, len(lengths), DIM, generator=gen)  # grouped-query: 2 per kv head
    new = [tuple(torch.randn(1, HEADS, len(lengths), DIM, generator=gen) for _ in "kv") for _ in range(LAYERS)]
    kv.reserve(1)
    mask = kv.mask(cached, extra=1).bool()[:, None, None, :]
    for layer in range(LAYERS):
        out = kv.attend_step(layer, queries, new[layer][0], new[layer][1], attn_mask=mask, scale=0.5)
        assert out.shape == (1, len(lengths), 2 * HEADS, DIM)
        for row in range(len(lengths)):
            own = rows[row][layer]  # the row's keys and values [1, heads, n, dim], then the step's token
            keys, values = (
                torch.cat([own[i][0], new[layer][i][0, :, row : row + 1]], dim=1).repeat_interleave(2, dim=0)
                for i in (0, 1)
            )
            want = torch.softmax(queries[0, :, row : row + 1] @ keys.transpose(1, 2) * 0.5, dim=-1) @ values
            torch.testing.assert_close(out[0, row], want[:, 0], rtol=1e-5, atol=1e-5)
    kv.advance(1)
    _check(
        kv,
        [
            [
                (torch.cat([k[0], nk[0][0, :, r : r + 1]], 1), torch.cat([v[0], nk[1][0, :, r : r + 1]], 1))
                for (k, v), nk in zip(rows[r], new)
            ]
            for r in range(len(lengths))
        ],
    )
