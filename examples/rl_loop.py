"""An RL loop in the style of tinker-cookbook's `rl_loop`, against Thinker.

    TINKER_API_KEY=tml-local python examples/rl_loop.py [--base-url ...] [--steps 20]

Toy task: small additions ("What is 3 + 4?"). Each step samples a group of replies per
question from a snapshot of the current weights, scores them with a programmatic reward
(1 if the reply's first number is the sum, else 0), and trains with importance sampling (or
ppo) on group-relative advantages. The progress bar shows the mean reward per step.
"""

from __future__ import annotations

import argparse
import os
import random
import re
from dataclasses import dataclass

import tinker
from tinker import types
from tqdm import tqdm


@dataclass
class Config:
    base_url: str = "http://127.0.0.1:8000"
    base_model: str | None = None  # default: the server's first model
    rank: int = 16
    learning_rate: float = 2e-4
    questions_per_step: int = 4
    group_size: int = 4
    max_tokens: int = 8
    steps: int = 20
    loss_fn: str = "importance_sampling"  # or "ppo"
    seed: int = 0


def question(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"What is {a} + {b}? Reply with only the number.", a + b


def reward(text: str, answer: int) -> float:
    numbers = re.findall(r"-?\d+", text)
    return 1.0 if numbers and int(numbers[0]) == answer else 0.0


def prompt_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def rollout_datum(prompt: list[int], tokens: list[int], logprobs: list[float], advantage: float) -> types.Datum:
    ids = prompt + tokens
    context = len(prompt) - 1  # positions that predict prompt tokens: no advantage, no sampler logprob
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={
            "target_tokens": ids[1:],
            "logprobs": [0.0] * context + list(logprobs),
            "advantages": [0.0] * context + [advantage] * len(tokens),
        },
    )


def main(config: Config) -> list[float]:
    service = tinker.ServiceClient(base_url=config.base_url)
    base_model = (
        config.base_model
        or tinker.RestClient(base_url=config.base_url).get_server_capabilities().result().supported_models[0].model_name
    )
    training = service.create_lora_training_client(base_model=base_model, rank=config.rank, seed=config.seed).result()
    tokenizer = training.get_tokenizer()
    rng = random.Random(config.seed)
    mean_rewards = []
    progress = tqdm(range(config.steps), desc="rl", unit="step")
    for step in progress:
        sampler = training.save_weights_and_get_sampling_client().result()
        batch = [question(rng) for _ in range(config.questions_per_step)]
        prompts = [prompt_ids(tokenizer, text) for text, _ in batch]
        futures = [
            sampler.sample(
                types.ModelInput.from_ints(p),
                config.group_size,
                types.SamplingParams(
                    max_tokens=config.max_tokens, temperature=1.0, seed=config.seed * 1_000_000 + step * 1000 + i
                ),
            )
            for i, p in enumerate(prompts)
        ]
        data, rewards = [], []
        for prompt, (_, answer), future in zip(prompts, batch, futures):
            sequences = future.result().sequences
            group = [reward(tokenizer.decode(s.tokens, skip_special_tokens=True), answer) for s in sequences]
            baseline = sum(group) / len(group)
            rewards += group
            data += [
                rollout_datum(prompt, s.tokens, s.logprobs, r - baseline)
                for s, r in zip(sequences, group)
                if r != baseline
            ]  # an all-equal group teaches nothing
        if data:
            training.forward_backward(data, config.loss_fn)
            training.optim_step(types.AdamParams(learning_rate=config.learning_rate)).result()
        mean_rewards.append(sum(rewards) / len(rewards))
        progress.set_postfix(reward=f"{mean_rewards[-1]:.2f}")
    window = max(1, len(mean_rewards) // 4)
    first, last = mean_rewards[:window], mean_rewards[-window:]
    print(f"mean reward: first {window} steps {sum(first) / window:.3f}, last {window} steps {sum(last) / window:.3f}")
    service.close("success").result()
    return mean_rewards


if __name__ == "__main__":
    os.environ.setdefault("TINKER_API_KEY", "tml-local")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in vars(Config()).items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=type(value) if value is not None else str, default=value
        )
    main(Config(**vars(parser.parse_args())))
