"""Every feature of the official tinker SDK that Thinker serves, in one script.

    TINKER_API_KEY=tml-local python examples/example_tinker_full.py [--base-url ...]

Training with each loss (cross_entropy, importance_sampling, ppo, cispo, dro, and a custom
client-side loss), AdamW steps, save/load with and without optimizer state, sampling from a
snapshot and from a saved checkpoint, compute_logprobs, checkpoint listing, and `thinker export`
of a merged model (this last part needs this machine to see the server's checkpoint folder).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import tinker
from tinker import types

QUESTIONS = [("What is the capital of France?", "Paris."), ("What color is the sky?", "Blue.")]


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def supervised(tokenizer) -> list[types.Datum]:
    data = []
    for question, answer in QUESTIONS:
        prompt = chat_ids(tokenizer, question)
        reply = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids = prompt + reply
        weights = [0.0] * (len(prompt) - 1) + [1.0] * len(reply)
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(ids[:-1]),
                loss_fn_inputs={"target_tokens": ids[1:], "weights": weights},
            )
        )
    return data


def rl_batch(sampler, tokenizer) -> list[types.Datum]:
    """Sample replies, score them (shorter is better), and build RL datums from the sampler's logprobs."""
    data = []
    for question, _ in QUESTIONS:
        prompt = chat_ids(tokenizer, question)
        result = sampler.sample(
            types.ModelInput.from_ints(prompt),
            num_samples=2,
            sampling_params=types.SamplingParams(max_tokens=8, temperature=1.0, seed=0),
        ).result()
        rewards = [-len(s.tokens) / 8 for s in result.sequences]
        baseline = sum(rewards) / len(rewards)
        for sequence, reward in zip(result.sequences, rewards):
            ids = prompt + sequence.tokens
            n = len(ids) - 1
            reply_from = len(prompt) - 1  # positions before the reply carry no advantage
            data.append(
                types.Datum(
                    model_input=types.ModelInput.from_ints(ids[:-1]),
                    loss_fn_inputs={
                        "target_tokens": ids[1:],
                        "logprobs": [0.0] * reply_from + list(sequence.logprobs),
                        "advantages": [0.0] * reply_from + [reward - baseline] * (n - reply_from),
                    },
                )
            )
    return data


def main(base_url: str, serve_config: str | None = None, checkpoint_root: str | None = None) -> dict:
    report: dict = {}
    rest = tinker.RestClient(base_url=base_url)
    base_model = rest.get_server_capabilities().result().supported_models[0].model_name
    service = tinker.ServiceClient(base_url=base_url)
    training = service.create_lora_training_client(
        base_model=base_model, rank=8, seed=0, user_metadata={"example": "full"}
    ).result()
    tokenizer = training.get_tokenizer()
    data = supervised(tokenizer)

    print("== forward (evaluation) and cross_entropy training")
    report["eval_loss"] = training.forward(data, "cross_entropy").result().metrics["loss:sum"]
    adam = types.AdamParams(learning_rate=5e-4, weight_decay=0.01, grad_clip_norm=1.0)
    for _ in range(3):
        training.forward_backward(data, "cross_entropy")
        training.optim_step(adam)
    report["trained_loss"] = training.forward(data, "cross_entropy").result().metrics["loss:sum"]
    print(f"   eval loss {report['eval_loss']:.3f} -> {report['trained_loss']:.3f}")

    print("== RL losses on sampled replies")
    sampler = training.save_weights_and_get_sampling_client().result()
    rl_data = rl_batch(sampler, tokenizer)
    configs = {"ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, "dro": {"beta": 0.05}}
    report["rl_losses"] = {}
    for loss_fn in ("importance_sampling", "ppo", "cispo", "dro"):
        out = training.forward_backward(rl_data, loss_fn, configs.get(loss_fn)).result()
        report["rl_losses"][loss_fn] = out.metrics["loss:sum"]
        print(f"   {loss_fn}: loss {out.metrics['loss:sum']:.4f}")
    training.optim_step(types.AdamParams(learning_rate=1e-4)).result()

    print("== a custom loss computed client-side (forward_backward_custom)")

    def mean_logprob_loss(batch, logprobs_list):
        total = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(batch, logprobs_list))
        return total / len(batch), {"custom_batches:sum": 1.0}

    custom = training.forward_backward_custom(data, mean_logprob_loss).result()
    report["custom_loss"] = custom.metrics["loss:sum"]
    training.optim_step(adam).result()

    print("== a per-datum custom loss run server-side (create_custom_loss: one forward+backward)")

    def weighted_nll(logprobs, weights):
        return -(logprobs * weights).sum(), {"custom/weighted_tokens:sum": (weights != 0).float().sum()}

    loss = service.create_custom_loss(weighted_nll, {"logprobs": 1, "weights": 1}).result()
    server_side = training.forward_backward_custom(data, loss).result()
    report["server_side_custom_loss"] = server_side.metrics["loss:sum"]
    training.optim_step(adam).result()

    print("== checkpoints: save, then resume as a new training client (with and without the optimizer)")
    state_path = training.save_state("example-state").result().path
    resumed = service.create_training_client_from_state_with_optimizer(state_path).result()
    weights_only = service.create_training_client_from_state(state_path).result()
    report["resumed_loss"] = resumed.forward(data, "cross_entropy").result().metrics["loss:sum"]
    assert abs(weights_only.forward(data, "cross_entropy").result().metrics["loss:sum"] - report["resumed_loss"]) < 1e-4

    print("== sampling from a saved checkpoint, compute_logprobs")
    sampler_path = training.save_weights_for_sampler("example-sampler").result().path
    saved_sampler = service.create_sampling_client(model_path=sampler_path).result()
    prompt = types.ModelInput.from_ints(chat_ids(tokenizer, QUESTIONS[0][0]))
    result = saved_sampler.sample(
        prompt,
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=16, temperature=0.0, stop=[tokenizer.eos_token_id]),
    ).result()
    report["sampled"] = tokenizer.decode(result.sequences[0].tokens)
    report["prompt_logprobs"] = saved_sampler.compute_logprobs(prompt).result()
    print(
        f"   sampled {report['sampled']!r}; mean prompt logprob "
        f"{np.mean([x for x in report['prompt_logprobs'] if x is not None]):.3f}"
    )

    print("== listing checkpoints, weights info")
    run_id = training.get_info().model_id
    report["checkpoints"] = [c.checkpoint_id for c in rest.list_checkpoints(run_id).result().checkpoints]
    report["weights_info"] = rest.get_weights_info_by_tinker_path(sampler_path).result()
    print(f"   {report['checkpoints']}; rank {report['weights_info'].lora_rank}")

    print("== thinker export: the LoRA merged into a plain HF model folder")
    out_dir = tempfile.mkdtemp(prefix="thinker-export-")
    command = [sys.executable, "-m", "actors.cli"] + (["--config", serve_config] if serve_config else [])
    command += ["export", sampler_path, out_dir] + (["--checkpoint-root", checkpoint_root] if checkpoint_root else [])
    report["export"] = subprocess.run(command, capture_output=True, text=True)
    print(f"   {report['export'].stderr.strip().splitlines()[-1] if report['export'].stderr else 'no output'}")
    report["export_dir"] = out_dir

    rest.delete_checkpoint_from_tinker_path(state_path).result()
    service.close("success").result()
    return report


if __name__ == "__main__":
    os.environ.setdefault("TINKER_API_KEY", "tml-local")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--serve-config", default="serve_config.yaml", help="the server's config, for export")
    parser.add_argument("--checkpoint-root", default=None)
    args = parser.parse_args()
    main(args.base_url, args.serve_config, args.checkpoint_root)
