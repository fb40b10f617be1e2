"""Thinker's per-step overhead: the same LoRA forward_backward + optim_step through HTTP and
the official SDK, versus in-process transformers + PEFT on the same model and data.

Both run in this one process's run, alternating rounds, so machine noise hits both alike;
the printed ratio is Thinker's median step time over the baseline's.

    python bench/overhead.py                 # default model, shapes 1x32 and 8x128
    python bench/overhead.py --shapes 1x32 --rounds 3 --steps 5
    python bench/overhead.py --durability    # Thinker with durable training vs without, same run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

os.environ.setdefault("TINKER_API_KEY", "tml-bench")
os.environ.setdefault("TINKER_TELEMETRY", "0")

RANK, ALPHA, LR = 16, 32.0, 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def batch(shape: tuple[int, int], vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (shape[0], shape[1] + 1))
    return tokens[:, :-1], tokens[:, 1:]


class PeftBaseline:
    """What a user would write in-process: transformers + PEFT LoRA + torch AdamW."""

    def __init__(self, model_dir: str):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)

    def step(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        logits = self.model(input_ids=torch.from_numpy(inputs)).logits
        lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.from_numpy(targets)[..., None])[..., 0]
        loss = -lp.sum()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss)


class ThinkerClient:
    """The same step through a running Thinker app and the official SDK."""

    def __init__(self, url: str, base_model: str):
        import tinker

        self.types = tinker.types
        self.service = tinker.ServiceClient(base_url=url)
        self.client = self.service.create_lora_training_client(base_model=base_model, rank=RANK, seed=0).result()

    def step(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        t = self.types
        data = [
            t.Datum(model_input=t.ModelInput.from_ints(x.tolist()), loss_fn_inputs={"target_tokens": y.tolist()})
            for x, y in zip(inputs, targets)
        ]
        fb = self.client.forward_backward(data, "cross_entropy")
        op = self.client.optim_step(t.AdamParams(learning_rate=LR))
        loss = fb.result().metrics["loss:sum"]
        op.result()
        return loss


def thinker_vocab(model_dir: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).vocab_size


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1x32", "8x128"], help="datums x tokens")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per shape")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round and side")
    parser.add_argument(
        "--durability", action="store_true", help="baseline: Thinker with durable_training off (instead of PEFT)"
    )
    args = parser.parse_args()

    from actors.model_source import ensure_embedded_model
    from configs.schema import DEFAULT_MODEL_NAME

    model_dir = str(ensure_embedded_model("SmolLM2-135M-Instruct", "~/.cache/thinker"))
    torch.set_num_threads(os.cpu_count() or 1)
    from local_serve import serve_thinker_apps

    from configs.schema import BaseModelConfig, ThinkerConfig

    configs = {"thinker": ThinkerConfig(models=[BaseModelConfig(name=DEFAULT_MODEL_NAME)])}
    if args.durability:
        models = [BaseModelConfig(name=DEFAULT_MODEL_NAME)]
        configs["volatile"] = ThinkerConfig(
            models=models, durable_training=False, checkpoint_root="~/.cache/thinker/bench-volatile"
        )
    urls = serve_thinker_apps(configs)
    thinker = ThinkerClient(urls["thinker"], DEFAULT_MODEL_NAME)
    baseline = ThinkerClient(urls["volatile"], DEFAULT_MODEL_NAME) if args.durability else PeftBaseline(model_dir)
    labels = ("durable", "not durable") if args.durability else ("thinker", "in-process PEFT")
    vocab = thinker_vocab(model_dir)
    print(f"model {DEFAULT_MODEL_NAME}, LoRA rank {RANK} on {', '.join(TARGETS)}; {os.cpu_count()} cores")
    for spec in args.shapes:
        shape = tuple(int(v) for v in spec.split("x"))
        inputs, targets = batch(shape, vocab)
        for side in (baseline, thinker):  # warm-up
            side.step(inputs, targets)
        times = {"peft": [], "thinker": []}
        for _ in range(args.rounds):
            times["peft"] += [timed(baseline.step, inputs, targets) for _ in range(args.steps)]
            times["thinker"] += [timed(thinker.step, inputs, targets) for _ in range(args.steps)]
        peft, ours = statistics.median(times["peft"]), statistics.median(times["thinker"])
        print(
            f"{spec:>7}: {labels[0]} {ours * 1000:8.1f} ms/step   {labels[1]} {peft * 1000:8.1f} ms/step   "
            f"ratio {ours / peft:.2f}x"
        )


if __name__ == "__main__":
    main()
