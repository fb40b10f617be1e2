"""Training and sampling on one model actor: does either starve the other?

The shape of an asynchronous RL run (the cookbook's async mode): `--tenants` training clients
each loop forward_backward (`datums x tokens`, cross_entropy) + optim_step, while as many
sampling clients each keep `--in-flight` sampling requests (`samples` x 1/2 to 3/2 `tokens`, drawn
per request, so requests finish at different steps rather than in waves; stop=[]) pending, all
through the official SDK. Three phases of `--seconds` each, repeated: training alone, sampling
alone, both together. Printed: training steps/s and sampled tokens/s in each phase, and
each kind's rate together as a share of its rate alone (the scheduler's `sampling_share` is 0.5:
when both wait, each should keep at least about half).

    python bench/rl_mix.py                       # 8 + 8 clients, 1x64 training, 2 x 4x16 sampling each
    python bench/rl_mix.py --shape 4x128 --tokens 64 --seconds 120   # heavier: a GPU, or patience
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TINKER_API_KEY", "tml-bench")
os.environ.setdefault("TINKER_TELEMETRY", "0")

from multi_tenant import tenant_data  # noqa: E402


def phase(trainers, datas, samplers, prompt, args, train: bool, sample: bool) -> tuple[float, float]:
    """(training steps/s, sampled tokens/s) over `args.seconds`, counted from when every client runs."""
    from tinker import types

    stop = threading.Event()
    started = threading.Barrier(len(trainers) * train + len(samplers) * sample + 1)
    steps, tokens = [], []
    low, high = max(1, args.tokens // 2), args.tokens * 3 // 2

    def params(rng):  # lengths vary, so requests finish at different steps rather than in waves
        return types.SamplingParams(max_tokens=int(rng.integers(low, high + 1)), temperature=1.0, stop=[])

    def trainer(client, data):
        started.wait()
        while not stop.is_set():
            fb = client.forward_backward(data, "cross_entropy")
            op = client.optim_step(types.AdamParams(learning_rate=1e-5))
            fb.result()
            op.result()
            steps.append(time.perf_counter())

    def sampler(client, seed):
        rng = np.random.default_rng(seed)
        started.wait()
        pending = [client.sample(prompt, args.samples, params(rng)) for _ in range(args.in_flight)]
        while not stop.is_set():
            result = pending.pop(0).result()
            tokens.append((time.perf_counter(), sum(len(s.tokens) for s in result.sequences)))
            pending.append(client.sample(prompt, args.samples, params(rng)))
        for future in pending:
            future.result()

    threads = [threading.Thread(target=trainer, args=(c, d)) for c, d in zip(trainers, datas) if train]
    threads += [threading.Thread(target=sampler, args=(c, i)) for i, c in enumerate(samplers) if sample]
    for t in threads:
        t.start()
    started.wait()
    start = time.perf_counter()
    time.sleep(args.seconds)
    end = time.perf_counter()
    stop.set()
    for t in threads:
        t.join()
    seconds = end - start
    trained = sum(1 for t in steps if start <= t <= end)
    sampled = sum(n for t, n in tokens if start <= t <= end)
    return trained / seconds, sampled / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=8, help="training clients, and as many sampling clients")
    parser.add_argument("--shape", default="1x64", help="datums x tokens of each forward_backward")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16, help="mean tokens per sample (each request: 1/2x to 3/2x)")
    parser.add_argument("--in-flight", type=int, default=2, help="sampling requests each sampling client keeps pending")
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--nice", type=int, default=None, help="compute_thread_nice (default: the config's)")
    parser.add_argument(
        "--policy", choices=["normal", "idle"], default=None, help="compute_thread_policy (default: the config's)"
    )
    args = parser.parse_args()

    import tinker
    from local_serve import serve_thinker
    from tinker import types

    from configs.schema import DEFAULT_MODEL_NAME, BaseModelConfig, ThinkerConfig

    extra = {} if args.nice is None else {"compute_thread_nice": args.nice}
    extra |= {} if args.policy is None else {"compute_thread_policy": args.policy}
    url = serve_thinker(ThinkerConfig(models=[BaseModelConfig(name=DEFAULT_MODEL_NAME, **extra)]))
    service = tinker.ServiceClient(base_url=url)
    trainers = [
        service.create_lora_training_client(base_model=DEFAULT_MODEL_NAME, rank=16, seed=i).result()
        for i in range(args.tenants)
    ]
    samplers = [t.save_weights_and_get_sampling_client().result() for t in trainers]
    shape = tuple(int(v) for v in args.shape.split("x"))
    datas = [tenant_data(types, shape, 49152, seed=i) for i in range(args.tenants)]
    prompt = types.ModelInput.from_ints(list(range(100, 140)))
    rates: dict[str, list[tuple[float, float]]] = {"train": [], "sample": [], "both": []}
    phase(trainers, datas, samplers, prompt, args, True, True)  # warm-up
    for _ in range(args.repeats):
        for name, train, sample in (("train", True, False), ("sample", False, True), ("both", True, True)):
            rates[name].append(phase(trainers, datas, samplers, prompt, args, train, sample))
            print(f"{name:>6}: {rates[name][-1][0]:.2f} steps/s, {rates[name][-1][1]:.1f} sampled tok/s", flush=True)
    alone_train = statistics.median(r[0] for r in rates["train"])
    alone_sample = statistics.median(r[1] for r in rates["sample"])
    both_train = statistics.median(r[0] for r in rates["both"])
    both_sample = statistics.median(r[1] for r in rates["both"])
    print(
        f"{args.tenants} trainers ({args.shape}) + {args.tenants} samplers ({args.in_flight} x "
        f"{args.samples}x{args.tokens} pending each): training {both_train:.2f} of {alone_train:.2f} steps/s alone "
        f"= {both_train / alone_train:.0%}; sampling {both_sample:.1f} of {alone_sample:.1f} tok/s alone "
        f"= {both_sample / alone_sample:.0%}"
    )


if __name__ == "__main__":
    main()
