"""Many tenants through the real HTTP API: aggregate training tokens/s with cross-adapter batching
versus the same server with it switched off (one adapter per pass), in the same run.

K tenants (training clients of the official SDK, one thread each) send forward_backward of
`datums x tokens` then optim_step, for several rounds. One Serve app holds the default model
twice: `batched` (cross_adapter_batching on) and `unbatched` (off); the phases alternate, so
machine noise hits both alike. Printed: tokens/s of each and their ratio.

    python bench/multi_tenant.py                      # K=8: 1x64 (light) and 8x128 (saturated)
    python bench/multi_tenant.py --shapes 1x64 --rounds 3 --tenants 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import numpy as np

os.environ.setdefault("TINKER_API_KEY", "tml-bench")
os.environ.setdefault("TINKER_TELEMETRY", "0")

LR = 1e-4


def tenant_data(types, shape: tuple[int, int], vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (shape[0], shape[1] + 1))
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(t[:-1].tolist()), loss_fn_inputs={"target_tokens": t[1:].tolist()}
        )
        for t in tokens
    ]


def run_rounds(clients, datas, rounds: int) -> float:
    """Wall seconds for every tenant to do `rounds` forward_backward + optim_step, concurrently,
    after one untimed round (steady state: each tenant's next request follows its last one)."""
    from tinker import types

    warm = threading.Barrier(len(clients) + 1)

    def one_round(client, data):
        fb = client.forward_backward(data, "cross_entropy")
        op = client.optim_step(types.AdamParams(learning_rate=LR))
        fb.result()
        op.result()

    def tenant(client, data):
        one_round(client, data)
        warm.wait()
        for _ in range(rounds):
            one_round(client, data)

    threads = [threading.Thread(target=tenant, args=(c, d)) for c, d in zip(clients, datas)]
    for t in threads:
        t.start()
    warm.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--shapes", nargs="+", default=["1x64", "8x128"], help="datums x tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per phase")
    parser.add_argument("--repeats", type=int, default=2, help="alternating phases per side")
    parser.add_argument("--cache-dir", default="~/.cache/thinker")
    args = parser.parse_args()

    import tinker
    from local_serve import serve_thinker
    from tinker import types

    from configs.schema import BaseModelConfig, ThinkerConfig

    models = [
        BaseModelConfig(name="batched", cross_adapter_batching=True),
        BaseModelConfig(name="unbatched", cross_adapter_batching=False),
    ]
    url = serve_thinker(ThinkerConfig(models=models, cache_dir=args.cache_dir))
    service = tinker.ServiceClient(base_url=url)
    clients = {
        side: [
            service.create_lora_training_client(base_model=side, rank=16, seed=i).result() for i in range(args.tenants)
        ]
        for side in ("batched", "unbatched")
    }
    vocab = 49152
    print(f"{args.tenants} tenants, LoRA rank 16, default model; {os.cpu_count()} cores")
    for spec in args.shapes:
        shape = tuple(int(v) for v in spec.split("x"))
        datas = [tenant_data(types, shape, vocab, seed=i) for i in range(args.tenants)]
        tokens = args.tenants * args.rounds * shape[0] * shape[1]
        rates = {"batched": [], "unbatched": []}
        for _ in range(args.repeats):
            for side in ("batched", "unbatched"):
                rates[side].append(tokens / run_rounds(clients[side], datas, args.rounds))
        batched, unbatched = statistics.median(rates["batched"]), statistics.median(rates["unbatched"])
        print(
            f"{spec:>7}: batched {batched:8.1f} tok/s   one adapter per pass {unbatched:8.1f} tok/s   "
            f"ratio {batched / unbatched:.2f}x"
        )


if __name__ == "__main__":
    main()
