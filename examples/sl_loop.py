"""A supervised fine-tuning loop in the style of tinker-cookbook's `sl_loop`, against Thinker.

    TINKER_API_KEY=tml-local python examples/sl_loop.py [--base-url ...] [--steps 20]

Conversations are rendered with the model's chat template; only the assistant replies are
trained (weights 1), the loss shown is the mean negative log-likelihood per reply token.
"""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass

import tinker
from tinker import types
from tqdm import tqdm

FACTS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many days are in a week?", "A week has seven days."),
    ("What do bees make?", "Bees make honey."),
    ("What is frozen water called?", "Frozen water is called ice."),
]


@dataclass
class Config:
    base_url: str = "http://127.0.0.1:8000"
    base_model: str | None = None  # default: the server's first model
    rank: int = 16
    learning_rate: float = 5e-4
    batch_size: int = 4
    steps: int = 20
    seed: int = 0


def conversation_datum(tokenizer, question: str, answer: str) -> types.Datum:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + reply_ids
    weights = [0.0] * (len(prompt_ids) - 1) + [1.0] * len(reply_ids)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:], "weights": weights}
    )


def main(config: Config) -> list[float]:
    service = tinker.ServiceClient(base_url=config.base_url)
    base_model = (
        config.base_model
        or tinker.RestClient(base_url=config.base_url).get_server_capabilities().result().supported_models[0].model_name
    )
    training = service.create_lora_training_client(base_model=base_model, rank=config.rank, seed=config.seed).result()
    tokenizer = training.get_tokenizer()
    dataset = [conversation_datum(tokenizer, q, a) for q, a in FACTS]
    rng = random.Random(config.seed)
    history = []
    progress = tqdm(range(config.steps), desc="sl", unit="step")
    for _ in progress:
        batch = rng.sample(dataset, config.batch_size)
        tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)
        fwd_bwd = training.forward_backward(batch, "cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=config.learning_rate))
        nll = fwd_bwd.result().metrics["loss:sum"] / tokens
        optim.result()
        history.append(nll)
        progress.set_postfix(nll=f"{nll:.3f}")
    path = training.save_state("final").result().path
    print(f"final checkpoint: {path}")
    service.close("success").result()
    return history


if __name__ == "__main__":
    os.environ.setdefault("TINKER_API_KEY", "tml-local")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in vars(Config()).items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=type(value) if value is not None else str, default=value
        )
    main(Config(**vars(parser.parse_args())))
