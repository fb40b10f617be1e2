"""Joining prompts folded into the decode step's forward vs prefilled in a forward of their own.

The continuous batch's engine (`actors.decoding.DecodeEngine`) on the HF backend in this process,
twice over the same model: once with `fold_prefill` (the prompts that join in a step ride in that
step's decode forward, one forward a step) and once without (they are prefilled in a batched
forward of their own first). Both serve the same closed loop, as RL samplers do: `--pending`
requests of `--samples` samples always waiting, each with `max_tokens` drawn from `--tokens`
(seeded, no early stop), a new one submitted as each finishes, `--requests` in all, spread over
`--adapters` LoRA adapters. Each round runs both in lockstep, a step of one and then a step of
the other (the first alternating), so machine noise hits both alike; each counts only its own
steps' time. Printed: median sampled tokens/s of each, forwards per step, and the median of the
rounds' ratios folded / apart.

    python bench/folded_step.py                        # default model, 16 pending x 4 samples x 8..24 tokens
    python bench/folded_step.py --context 600 --requests 24    # long prompts: prefilled in chunks
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
    return backend.decode_engine(max_rows=max_rows, max_adapters=8, fold_prefill=fold)


def works(backend, args) -> list:
    from actors.work import SampleWork, SamplingParams

    rng = np.random.default_rng(0)
    prompts = prompts_of(backend.tokenizer, args.requests)
    low, high = args.tokens
    out = []
    for i, prompt in enumerate(prompts):
        context = rng.integers(0, min(10_000, backend.vocab_size), args.context)
        prompt = [int(t) for t in context] + prompt
        params = SamplingParams(max_tokens=int(rng.integers(low, high + 1)), stop_at_eos=False, temperature=1.0, seed=i)
        out.append(
            SampleWork(f"a{i % args.adapters}", None, np.array(prompt), args.samples, params, tenant=f"t{i % 8}")
        )
    return out


class Loop:
    """One engine's closed loop: `pending` requests always waiting, a new one as each finishes."""

    def __init__(self, engine, stream: list, pending: int):
        self.engine, self.queue = engine, list(stream)
        self.seconds, self.tokens, self.forwards = 0.0, 0, 0
        for _ in range(min(pending, len(self.queue))):
            engine.submit(self.queue.pop(0), None)

    def step(self) -> None:
        finished = []
        start = time.perf_counter()
        self.engine.step(finished)
        self.seconds += time.perf_counter() - start
        for _, result in finished:
            assert not isinstance(result, Exception), result
            self.tokens += sum(len(s.tokens) for s in result.sequences)
            if self.queue:
                self.engine.submit(self.queue.pop(0), None)


def lockstep(loops: dict[str, Loop], decoder) -> None:
    """Step the loops in turn (the first to go alternating) until all are done: machine noise
    over seconds hits each alike. Each loop counts its own step time and decoder forwards."""
    real, current = decoder.forward, [None]

    def counted(*a, **k):
        current[0].forwards += 1
        return real(*a, **k)

    decoder.forward = counted
    try:
        order = list(loops.values())
        while any(loop.engine.busy for loop in order):
            for loop in order:
                if loop.engine.busy:
                    current[0] = loop
                    loop.step()
            order.reverse()
    finally:
        del decoder.forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["default", "tiny"], default="default")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--pending", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, nargs=2, default=[8, 24])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--context", type=int, default=0, help="random tokens before each prompt (a document)")
    parser.add_argument("--rounds", type=int, default=5)
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
    for _ in range(args.rounds):
        loops = {name: Loop(make_engine(backend, name == "folded", max_rows), stream, args.pending) for name in rates}
        lockstep(loops, backend.model.model)
        for name, loop in loops.items():
            rates[name].append(loop.tokens / loop.seconds)
            per_step[name] = loop.forwards / loop.engine.steps
        print(
            " ".join(
                f"{n} {loop.tokens / loop.seconds:.1f} tok/s ({loop.forwards} forwards);" for n, loop in loops.items()
            )
        )
    folded, apart = (statistics.median(rates[k]) for k in ("folded", "apart"))
    ratio = statistics.median(f / a for f, a in zip(rates["folded"], rates["apart"]))
    print(
        f"{args.requests} requests ({args.pending} pending) x {args.samples} samples"
        f" x {args.tokens[0]}..{args.tokens[1]} tokens, {args.adapters} adapters"
        f"{f', {args.context} tokens of context' if args.context else ''}:"
        f" folded {folded:.1f} tok/s ({per_step['folded']:.2f} forwards a step),"
        f" apart {apart:.1f} tok/s ({per_step['apart']:.2f}), ratio {ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
