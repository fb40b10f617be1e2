"""Packed passes vs padded passes: LoRA training tokens/s of the HF backend on mixed-length data.

Two HF backends in this process, one with `packed_passes` (every row of a pass back to back in
one sequence, attention kept to each row) and one without (rows right-padded to the longest), run
the same steps: a forward_backward pass of `--rows` datums with lengths drawn uniformly from
`--lengths` (seeded), cross_entropy, then an optim_step per adapter. With `--adapters 1 4` it runs
once with one adapter and once with four (the rows split evenly, one request per adapter, all in
one pass). Rounds alternate packed and padded so machine noise hits both alike. Printed: median
training tokens/s (real tokens, no padding counted) of each and the ratio packed / padded.

    python bench/packing.py                          # default model, 16 rows of 16..512, 1 and 4 adapters
    python bench/packing.py --model tiny --rounds 1  # plumbing check, seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RANK = 16
TINY = dict(
    vocab_size=260,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def make_backend(args, packed: bool, adapters: int):
    from actors.hf.backend import HFBackend
    from actors.work import CreateModelWork, LoraSpec
    from configs.schema import DEFAULT_MODEL_NAME, BaseModelConfig

    extra = {"random_init": TINY} if args.model == "tiny" else {}
    config = BaseModelConfig(name=DEFAULT_MODEL_NAME, torch_threads=args.threads, packed_passes=packed, **extra)
    backend = HFBackend(config)
    assert backend.packed == packed, "this model cannot run packed passes"
    for a in range(adapters):
        backend.create_model(CreateModelWork(f"a{a}", LoraSpec(rank=RANK, seed=a)))
    return backend


def pass_works(vocab: int, args, adapters: int, seed: int) -> list:
    """One pass: `args.rows` datums of random lengths, split evenly over the adapters (one request each)."""
    from actors.work import Datum, ForwardBackwardWork

    rng = np.random.default_rng(seed)
    low, high = args.lengths
    data = []
    for n in rng.integers(low, high + 1, size=args.rows):
        tokens = rng.integers(0, vocab, n + 1)
        data.append(Datum(tokens[:-1], {"target_tokens": tokens[1:]}))
    per = -(-args.rows // adapters)
    return [ForwardBackwardWork(f"a{a}", None, data[a * per : (a + 1) * per], "cross_entropy") for a in range(adapters)]


def step(backend, works) -> float:
    from actors.work import AdamParams, OptimStepWork

    start = time.perf_counter()
    for work, result in zip(works, backend.forward_backward_batch(works)):
        if isinstance(result, Exception):
            raise result
        backend.optim_step(OptimStepWork(work.model_id, None, AdamParams(learning_rate=1e-4)))
    return time.perf_counter() - start


def run(args, adapters: int) -> None:
    sides = {"packed": make_backend(args, True, adapters), "padded": make_backend(args, False, adapters)}
    vocab = sides["packed"].describe().vocab_size
    steps = [pass_works(vocab, args, adapters, args.seed + s) for s in range(args.steps)]
    lengths = [[int(d.tokens.shape[0]) for w in works for d in w.data] for works in steps]
    real = [sum(ls) for ls in lengths]
    padded_tokens = sum(len(ls) * max(ls) for ls in lengths)
    warm_up = pass_works(
        vocab, argparse.Namespace(**{**vars(args), "rows": adapters * 2}), adapters, args.seed + 10_000
    )
    for backend in sides.values():  # a small pass: the code paths, not the minutes of a full one
        step(backend, warm_up)
    rates: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side, backend in sides.items():
            rates[side] += [tokens / step(backend, works) for tokens, works in zip(real, steps)]
    rate = {side: statistics.median(r) for side, r in rates.items()}
    print(
        f"{adapters} adapter(s), {args.rows} rows/pass, {sum(real) / len(real):.0f} real tokens/pass "
        f"({sum(real) / padded_tokens:.0%} of the padded pass): packed {rate['packed']:7.1f} tok/s   "
        f"padded {rate['padded']:7.1f} tok/s   packed / padded {rate['packed'] / rate['padded']:.2f}x",
        flush=True,
    )
    for backend in sides.values():
        backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' (the embedded SmolLM2-135M-Instruct) or 'tiny'")
    parser.add_argument("--rows", type=int, default=16, help="datums per pass")
    parser.add_argument("--lengths", type=int, nargs=2, default=[16, 512], help="datum lengths: uniform in [low, high]")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4], help="adapters per pass, one run each")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=1, help="timed passes per round and side (different data)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    args = parser.parse_args()
    print(f"model {args.model}, LoRA rank {RANK}, CPU fp32, {os.cpu_count()} cores", flush=True)
    for adapters in args.adapters:
        run(args, adapters)


if __name__ == "__main__":
    main()
