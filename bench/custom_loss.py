"""A custom loss run client-side vs server-side: the same per-datum loss (a clipped policy-gradient
objective with two metrics) through the official SDK's `forward_backward_custom`, on one app.

- client-side: the SDK's own path for a loss the server does not run (a `LossHandle` without a
  loss_id): a forward to get the log-probs, the loss and its gradient in this process, then a
  second forward+backward with the gradient as per-token weights;
- server-side: `create_custom_loss` uploads the traced graph and one forward_backward runs it in
  the server's pass.

Each step is forward_backward_custom + optim_step, on two training clients of the same app,
alternating rounds, so machine noise hits both alike. Prints median ms/step and the ratio
client-side / server-side (> 1: the server-side path is faster).

    python bench/custom_loss.py                  # default model, shapes 4x128 and 16x128
    python bench/custom_loss.py --shapes 8x64 --rounds 2 --steps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TINKER_API_KEY", "tml-bench")
os.environ.setdefault("TINKER_TELEMETRY", "0")

RANK, LR = 16, 1e-4


def clipped_pg(logprobs, advantages, sampler_logprobs):
    ratio = torch.exp(logprobs - sampler_logprobs)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    objective = torch.minimum(ratio * advantages, clipped * advantages)
    return -objective.sum(), {
        "custom/clipped:mean": (ratio != clipped).float().mean(),
        "custom/tokens:sum": (advantages != 0).float().sum(),
    }


RANKS = {"logprobs": 1, "advantages": 1, "sampler_logprobs": 1}


def batch(types, shape: tuple[int, int], vocab: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    rows, length = shape
    data = []
    for _ in range(rows):
        tokens = rng.integers(0, vocab, length + 1).tolist()
        inputs = {
            "target_tokens": tokens[1:],
            "advantages": rng.normal(size=length).astype(np.float32),
            "sampler_logprobs": (-rng.random(length) * 8).astype(np.float32),
        }
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs))
    return data


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4x128", "16x128"], help="datums x tokens")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per shape")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round and side")
    args = parser.parse_args()

    import tinker
    from local_serve import serve_thinker

    from actors.model_source import ensure_embedded_model
    from configs.schema import DEFAULT_MODEL_NAME, BaseModelConfig, ThinkerConfig

    model_dir = ensure_embedded_model("SmolLM2-135M-Instruct", "~/.cache/thinker")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    url = serve_thinker(ThinkerConfig(models=[BaseModelConfig(name=DEFAULT_MODEL_NAME)]))
    service = tinker.ServiceClient(base_url=url)
    server_side = service.create_custom_loss(clipped_pg, RANKS).result()
    assert server_side.loss_id, "the server did not turn custom_loss_server_side on"
    sides = {
        "server-side": (
            server_side,
            service.create_lora_training_client(base_model=DEFAULT_MODEL_NAME, rank=RANK).result(),
        ),
        "client-side": (
            dataclasses.replace(server_side, loss_id=None),
            service.create_lora_training_client(base_model=DEFAULT_MODEL_NAME, rank=RANK).result(),
        ),
    }
    adam = tinker.types.AdamParams(learning_rate=LR)

    def step(side: str, data: list) -> None:
        handle, client = sides[side]
        fb = client.forward_backward_custom(data, handle)
        op = client.optim_step(adam)
        fb.result()
        op.result()

    print(f"model {DEFAULT_MODEL_NAME}, LoRA rank {RANK}; {os.cpu_count()} cores")
    for spec in args.shapes:
        shape = tuple(int(v) for v in spec.split("x"))
        data = batch(tinker.types, shape, vocab)
        for side in sides:  # warm-up
            step(side, data)
        times: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(args.rounds):
            for side in sides:
                times[side] += [timed(step, side, data) for _ in range(args.steps)]
        client, server = statistics.median(times["client-side"]), statistics.median(times["server-side"])
        print(
            f"{spec:>7}: client-side {client * 1000:8.1f} ms/step   server-side {server * 1000:8.1f} ms/step   "
            f"ratio {client / server:.2f}x"
        )
    service.close("success").result()


if __name__ == "__main__":
    main()
