"""Sampling throughput: Thinker through the official SDK vs transformers' own `generate` with a KV
cache in this process, on the same base model, prompts, batch and sampling parameters.

- Thinker: `num_prompts` sampling requests of `num_samples` each, all sent at once to a sampling
  client of a fresh LoRA adapter (rank 16, untrained: the base model's distribution), every
  sequence exactly `max_tokens` long (`stop=[]`).
- transformers: one `generate(do_sample=True, num_return_sequences=num_samples,
  min_new_tokens=max_tokens)` over the same prompts (left-padded), the same torch thread count as
  the model actor.
Rounds alternate between the two, so machine noise hits both alike; prints median tokens/s of
each and the ratio Thinker / transformers (>= 1: Thinker is at least as fast).

`--staggered`: continuous vs static batching. Two apps on the same base model side by side, one
with `continuous_batching: false`; the same seeded Poisson stream of sampling requests (each its
own `max_tokens`, drawn from 32..`--tokens`) is sent through the SDK to each in turn, every
request at its arrival time. Prints tokens/s over the stream (first arrival to last answer) and
mean latency of each, and the ratios continuous / static.

    python bench/sampling.py                        # 16 prompts x 4 samples x 128 tokens, default model
    python bench/sampling.py --prompts 4 --samples 2 --tokens 32 --rounds 2
    python bench/sampling.py --staggered            # 24 requests x 4 samples, 2 per second
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
os.environ.setdefault("TINKER_API_KEY", "tml-bench")
os.environ.setdefault("TINKER_TELEMETRY", "0")


def prompts_of(tokenizer, count: int, seed: int = 0) -> list[list[int]]:
    """`count` short chat prompts of varied length."""
    rng = np.random.default_rng(seed)
    topics = ["rivers", "prime numbers", "bread", "the moon", "chess", "volcanoes", "music", "bees"]
    prompts = []
    for i in range(count):
        words = " ".join(rng.choice(topics, size=int(rng.integers(1, 4))))
        text = f"<|im_start|>user\nTell me something about {words} ({i}).<|im_end|>\n<|im_start|>assistant\n"
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--staggered", action="store_true", help="continuous vs static batching, Poisson arrivals")
    parser.add_argument("--requests", type=int, default=24, help="--staggered: requests in the stream")
    parser.add_argument("--rate", type=float, default=2.0, help="--staggered: mean arrivals per second")
    args = parser.parse_args()
    if args.staggered:
        staggered(args)
        return

    import tinker
    import torch
    from local_serve import serve_thinker
    from tinker import types
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.model_source import ensure_embedded_model
    from configs.schema import DEFAULT_MODEL_NAME, BaseModelConfig, ThinkerConfig

    model_dir = ensure_embedded_model("SmolLM2-135M-Instruct", "~/.cache/thinker")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = prompts_of(tokenizer, args.prompts)
    rows = args.prompts * args.samples
    model_config = BaseModelConfig(name=DEFAULT_MODEL_NAME, max_sample_rows=max(64, rows))
    url = serve_thinker(ThinkerConfig(models=[model_config]))
    service = tinker.ServiceClient(base_url=url)
    training = service.create_lora_training_client(base_model=DEFAULT_MODEL_NAME, rank=16).result()
    sampler = training.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=args.tokens, temperature=1.0, stop=[])

    def thinker_round(seed: int) -> int:
        futures = [
            sampler.sample(
                types.ModelInput.from_ints(p), args.samples, params.model_copy(update={"seed": seed * 1000 + i})
            )
            for i, p in enumerate(prompts)
        ]
        return sum(len(s.tokens) for f in futures for s in f.result().sequences)

    torch.set_num_threads(os.cpu_count() or 1)  # what the model actor uses (torch_threads unset)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def transformers_round(seed: int) -> int:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=args.samples,
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                pad_token_id=pad,
            )
        return int((out.shape[1] - width) * out.shape[0])

    thinker_round(0)  # warm-up: the adapter's sampler, the compute thread, allocator
    transformers_round(0)
    rates: dict[str, list[float]] = {"thinker": [], "transformers": []}
    for r in range(1, args.rounds + 1):
        for name, run in (("thinker", thinker_round), ("transformers", transformers_round)):
            start = time.perf_counter()
            tokens = run(r)
            rates[name].append(tokens / (time.perf_counter() - start))
            assert tokens == rows * args.tokens, f"{name} sampled {tokens} tokens, expected {rows * args.tokens}"
    thinker, reference = statistics.median(rates["thinker"]), statistics.median(rates["transformers"])
    print(
        f"{args.prompts} prompts x {args.samples} samples x {args.tokens} tokens: "
        f"Thinker {thinker:.0f} tok/s, transformers generate {reference:.0f} tok/s, "
        f"ratio {thinker / reference:.2f}x"
    )


def staggered(args) -> None:
    import tinker
    from local_serve import serve_thinker_apps
    from tinker import types
    from transformers import AutoTokenizer

    from actors.model_source import ensure_embedded_model
    from configs.schema import DEFAULT_MODEL_NAME, BaseModelConfig, ThinkerConfig

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model("SmolLM2-135M-Instruct", "~/.cache/thinker"))
    rng = np.random.default_rng(0)
    prompts = prompts_of(tokenizer, args.requests)
    arrivals = np.cumsum(rng.exponential(1 / args.rate, args.requests))
    arrivals -= arrivals[0]
    lengths = rng.integers(32, args.tokens + 1, args.requests)
    configs = {
        name: ThinkerConfig(models=[BaseModelConfig(name=DEFAULT_MODEL_NAME, continuous_batching=continuous)])
        for name, continuous in (("continuous", True), ("static", False))
    }
    urls = serve_thinker_apps(configs)
    samplers = {}
    for name, url in urls.items():
        service = tinker.ServiceClient(base_url=url)
        training = service.create_lora_training_client(base_model=DEFAULT_MODEL_NAME, rank=16).result()
        samplers[name] = training.save_weights_and_get_sampling_client().result()

    def stream(name: str, seed: int) -> tuple[float, float]:
        """(tokens/s from the first arrival to the last answer, mean latency in s)."""
        sampler = samplers[name]
        start = time.perf_counter()
        futures, sent = [], []
        for i, (at, prompt, length) in enumerate(zip(arrivals, prompts, lengths)):
            time.sleep(max(0.0, start + at - time.perf_counter()))
            params = types.SamplingParams(max_tokens=int(length), temperature=1.0, stop=[], seed=seed * 1000 + i)
            futures.append(sampler.sample(types.ModelInput.from_ints(prompt), args.samples, params))
            sent.append(time.perf_counter())
        ends, tokens = [], 0
        pending = dict(enumerate(futures))
        while pending:  # note each answer's time as it comes (the futures finish out of order)
            for i, future in list(pending.items()):
                if future.done():
                    tokens += sum(len(s.tokens) for s in future.result().sequences)
                    ends.append((i, time.perf_counter()))
                    del pending[i]
            time.sleep(0.01)
        assert tokens == int(lengths.sum()) * args.samples, f"{name} sampled {tokens} tokens"
        latency = statistics.mean(end - sent[i] for i, end in ends)
        return tokens / (max(end for _, end in ends) - start), latency

    for name in samplers:  # warm-up
        samplers[name].sample(types.ModelInput.from_ints(prompts[0]), 1, types.SamplingParams(max_tokens=4)).result()
    results: dict[str, list[tuple[float, float]]] = {"continuous": [], "static": []}
    for r in range(1, args.rounds + 1):
        for name in ("continuous", "static"):
            results[name].append(stream(name, r))
            print(f"round {r} {name}: {results[name][-1][0]:.1f} tok/s, mean latency {results[name][-1][1]:.1f} s")
    rate = {name: statistics.median(x[0] for x in runs) for name, runs in results.items()}
    latency = {name: statistics.median(x[1] for x in runs) for name, runs in results.items()}
    print(
        f"{args.requests} requests x {args.samples} samples x 32..{args.tokens} tokens, {args.rate}/s Poisson: "
        f"continuous {rate['continuous']:.1f} tok/s, static {rate['static']:.1f} tok/s, "
        f"ratio {rate['continuous'] / rate['static']:.2f}x; mean latency {latency['continuous']:.1f} s vs "
        f"{latency['static']:.1f} s ({latency['static'] / latency['continuous']:.2f}x)"
    )


if __name__ == "__main__":
    main()
