"""Joining prompts folded into the decode step's forward vs prefilled in a forward of their own.

The continuous batch's engine (`actors.decoding.DecodeEngine`) on the HF backend in this process,
twice over the same model: once with `fold_prefill` (the prompts that join in a step ride in that
step's decode forward, one forward a step) and once without (they are prefilled in a batched
forward of their own first). Both serve the same closed loop, as RL samplers do: `--pending`
requests of `--samples` samples always waiting, each with `max_tokens` drawn from `--tokens`
(seeded, no early stop), a new one submitted as each finishes, `--requests` in all, spread over
`--adapters` LoRA adapters. Rounds alternate the two, so machine noise hits both alike. Printed:
median sampled tokens/s of each, forwards per step, and the ratio folded / apart.

    python bench/folded_step.py                        # default model, 16 pending x 4 samples x 8..24 tokens
    python bench/folded_step.py --model tiny --rounds 1  # plumbing check, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from packing import TINY  # noqa: E402
from sampling import prompts_of  # noqa: E402


def make_engine(backend, fold: bool, max_rows: int):
    from actors.decoding import DecodeEngine

    return DecodeEngine(
        backend.model,
        backend.routing,
        rows_of=backend._rows_of,
        keep_resident=backend._keep_resident,
        max_rows=max_rows,
        max_adapters=8,
        prefill_chunk_tokens=backend.config.prefill_chunk_tokens,
        decode=backend._decode,
        fold_prefill=fold,
    )


def works(backend, args) -> list:
    from actors.work import SampleWork, SamplingParams

    rng = np.random.default_rng(0)
    prompts = prompts_of(backend.tokenizer, args.requests)
    low, high = args.tokens
    out = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=int(rng.integers(low, high + 1)), stop_at_eos=False, temperature=1.0, seed=i)
        out.append(
            SampleWork(f"a{i % args.adapters}", None, np.array(prompt), args.samples, params, tenant=f"t{i % 8}")
        )
    return out


def serve(engine, stream: list, pending: int) -> tuple[float, int, int]:
    """The closed loop: seconds, sampled tokens, forwards (decoder calls)."""
    queue = list(stream)
    for _ in range(min(pending, len(queue))):
        engine.submit(queue.pop(0), None)
    tokens, forwards = 0, 0
    decoder = engine._model.model
    real = decoder.forward

    def counted(*a, **k):
        nonlocal forwards
        forwards += 1
        return real(*a, **k)

    decoder.forward = counted
    start = time.perf_counter()
    try:
        while engine.busy:
            finished = []
            engine.step(finished)
            for _, result in finished:
                assert not isinstance(result, Exception), result
                tokens += sum(len(s.tokens) for s in result.sequences)
                if queue:
                    engine.submit(queue.pop(0), None)
    finally:
        del decoder.forward
    return time.perf_counter() - start, tokens, forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["default", "tiny"], default="default")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--pending", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, nargs=2, default=[8, 24])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    from actors.hf.backend import HFBackend
    from actors.work import CreateModelWork, LoraSpec
    from configs.schema import DEFAULT_MODEL_NAME, BaseModelConfig

    extra = {"random_init": TINY} if args.model == "tiny" else {}
    max_rows = args.pending * args.samples
    config = BaseModelConfig(name=DEFAULT_MODEL_NAME, torch_threads=args.threads, max_sample_rows=max_rows, **extra)
    backend = HFBackend(config)
    for a in range(args.adapters):
        backend.create_model(CreateModelWork(f"a{a}", LoraSpec(rank=16, seed=a)))
        with torch.no_grad():  # non-zero B, as a trained adapter
            for w in backend.adapters.get(f"a{a}").weights.values():
                w.B.normal_(0, 0.01, generator=torch.Generator().manual_seed(a))
    stream = works(backend, args)
    rates = {"folded": [], "apart": []}
    per_step = {}
    for r in range(args.rounds):
        for name in ("folded", "apart") if r % 2 == 0 else ("apart", "folded"):
            engine = make_engine(backend, name == "folded", max_rows)
            seconds, tokens, forwards = serve(engine, stream, args.pending)
            rates[name].append(tokens / seconds)
            per_step[name] = forwards / engine.steps
            print(f"round {r} {name}: {tokens / seconds:.1f} tok/s ({forwards} forwards, {engine.steps} steps)")
    folded, apart = (statistics.median(rates[k]) for k in ("folded", "apart"))
    print(
        f"{args.requests} requests ({args.pending} pending) x {args.samples} samples"
        f" x {args.tokens[0]}..{args.tokens[1]} tokens, {args.adapters} adapters:"
        f" folded {folded:.1f} tok/s ({per_step['folded']:.2f} forwards a step),"
        f" apart {apart:.1f} tok/s ({per_step['apart']:.2f}), ratio {folded / apart:.2f}x"
    )


if __name__ == "__main__":
    main()
