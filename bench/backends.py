"""The Megatron backend beside the HF backend: LoRA training tokens/s on the same model and data.

Both backends are driven in this process the way the model actor drives them (create_model,
forward_backward + optim_step), alternating rounds so machine noise hits both alike. The HF
backend computes in this process; the Megatron backend in its rank actors (TP x PP of them).
Printed: median training tokens/s of each and their ratio (Megatron over HF). With `--tenants K`
each step trains K adapters, one request each, in one pass; Megatron is then also timed with one
adapter per pass.

    python bench/backends.py                                   # default model, TP=1, CPU
    python bench/backends.py --model tiny --tp 2 --pp 2        # plumbing check, seconds
    python bench/backends.py --tenants 8 --shape 1x64          # many small tenants
    python bench/backends.py --model llama-1b --gpu --shape 8x1024   # on a GPU machine

`llama-1b` is a Llama-3.2-1B-shaped model (1.24B parameters) with seeded random weights
(speed does not depend on the weights, and no hub is needed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

RANK = 16
MODELS = {
    "tiny": dict(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
}


def configs(args) -> tuple:
    from configs.schema import BaseModelConfig

    common = dict(name=args.model, max_pass_tokens=max(1024, args.batch * args.seq), torch_threads=args.threads)
    if args.model in MODELS:
        common["random_init"] = MODELS[args.model]
    if args.gpu:
        common["dtype"] = "bfloat16"
    hf = BaseModelConfig(**common, num_gpus=1 if args.gpu else 0)
    layout = dict(
        tensor_parallel=args.tp,
        pipeline_parallel=args.pp,
        cpus_per_rank=(os.cpu_count() or 1) / (args.tp * args.pp) if not args.gpu else 1,
        gpus_per_rank=1 if args.gpu else 0,
        microbatches=args.microbatches,
        last_stage_layers=args.last_stage_layers,
    )
    return hf, BaseModelConfig(**common, backend="megatron", megatron=layout)


def work_items(vocab: int, batch: int, seq: int, seed: int, tenants: int):
    """One step's requests: one per tenant, each `batch` datums of `seq` tokens."""
    from actors.work import Datum, ForwardBackwardWork

    rng = np.random.default_rng(seed)
    works = []
    for t in range(tenants):
        tokens = rng.integers(0, vocab, (batch, seq + 1))
        data = [Datum(row[:-1], {"target_tokens": row[1:]}) for row in tokens]
        works.append(ForwardBackwardWork(f"t{t}", None, data, "cross_entropy"))
    return works


def step(backend, works, batched: bool = True) -> float:
    """forward_backward of every tenant (in one pass, or one pass each), then their optim_steps."""
    from actors.work import AdamParams, OptimStepWork

    start = time.perf_counter()
    results = backend.forward_backward_batch(works) if batched else [backend.forward_backward(w) for w in works]
    for work, result in zip(works, results):
        if isinstance(result, Exception):
            raise result
        if not np.isfinite(result.metrics["loss:sum"]):
            raise RuntimeError(f"{type(backend).__name__}: loss {result.metrics['loss:sum']}")
        backend.optim_step(OptimStepWork(work.model_id, None, AdamParams(learning_rate=1e-4)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' (the embedded model), 'tiny' or 'llama-1b'")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--microbatches", type=int, default=0, help="megatron.microbatches (0: 2 x PP)")
    parser.add_argument("--last-stage-layers", type=int, default=None, help="megatron.last_stage_layers")
    parser.add_argument("--shape", default="8x128", help="datums x tokens per step")
    parser.add_argument("--tenants", type=int, default=1, help="adapters, one request each per step")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and backend")
    parser.add_argument("--gpu", action="store_true", help="HF backend and every rank on a GPU, bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the HF backend")
    args = parser.parse_args()
    args.batch, args.seq = (int(v) for v in args.shape.split("x"))

    import ray

    from actors.hf.backend import HFBackend
    from actors.megatron.backend import MegatronBackend
    from actors.work import CreateModelWork, LoraSpec

    ray.init(include_dashboard=False, log_to_driver=False)
    hf_config, megatron_config = configs(args)
    hf = HFBackend(hf_config)
    hf.init_compute_thread()
    megatron = MegatronBackend(megatron_config)
    try:
        sides = {"hf": (hf, True), "megatron": (megatron, True)}
        if args.tenants > 1:
            sides["megatron, one adapter per pass"] = (megatron, False)
        for backend in (hf, megatron):
            for t in range(args.tenants):
                backend.create_model(CreateModelWork(f"t{t}", LoraSpec(rank=RANK, seed=t)))
        vocab = hf.describe().vocab_size
        params = sum(p.numel() for p in hf.model.parameters() if not p.requires_grad)  # the frozen base
        print(
            f"model {args.model} ({params / 1e9:.2f}B base parameters), LoRA rank {RANK}, {args.tenants} tenant(s), "
            f"{'GPU bf16' if args.gpu else f'CPU fp32, {os.cpu_count()} cores'}; Megatron TP={args.tp} PP={args.pp}"
        )
        works = [work_items(vocab, args.batch, args.seq, seed, args.tenants) for seed in range(args.steps)]
        for backend, batched in sides.values():  # warm-up
            step(backend, works[0], batched)
        times = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, (backend, batched) in sides.items():
                times[name] += [step(backend, w, batched) for w in works]
        tokens = args.tenants * args.batch * args.seq
        rate = {name: tokens / statistics.median(t) for name, t in times.items()}
        label = f"{args.tenants}x{args.shape}" if args.tenants > 1 else args.shape
        print(
            f"{label:>8}: megatron {rate['megatron']:9.1f} tok/s   hf {rate['hf']:9.1f} tok/s   "
            f"ratio {rate['megatron'] / rate['hf']:.2f}x"
        )
        if args.tenants > 1:
            alone = rate["megatron, one adapter per pass"]
            print(
                f"{'':>8}  megatron one adapter per pass {alone:9.1f} tok/s   "
                f"batched / one per pass {rate['megatron'] / alone:.2f}x"
            )
    finally:
        megatron.close()
        hf.close()
        ray.shutdown()


if __name__ == "__main__":
    main()
