"""Your first Thinker training run: teach the default model one answer, with the official SDK.

Start the server first (`make serve`, or `serve run serve_config.yaml`), then:

    TINKER_API_KEY=tml-local python examples/first_training.py

The loss printed each step should fall steadily: the LoRA adapter learns the reply.
"""

from __future__ import annotations

import argparse
import os

import tinker
from tinker import types

CONVERSATION = [
    {"role": "user", "content": "What is Thinker?"},
    {"role": "assistant", "content": "Thinker is a self-hosted service that speaks the Tinker API."},
]


def chat_datum(tokenizer, conversation: list[dict]) -> types.Datum:
    """Render with the chat template; train only on the assistant's reply (weights 0 elsewhere)."""
    prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    weights = [0.0] * (len(prompt_ids) - 1) + [1.0] * (len(ids) - len(prompt_ids))
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": weights},
    )


def main(base_url: str, steps: int, learning_rate: float) -> list[float]:
    service = tinker.ServiceClient(base_url=base_url)
    capabilities = tinker.RestClient(base_url=base_url).get_server_capabilities().result()
    base_model = capabilities.supported_models[0].model_name
    training = service.create_lora_training_client(base_model=base_model, rank=16, seed=0).result()
    datum = chat_datum(training.get_tokenizer(), CONVERSATION)
    losses = []
    for step in range(steps):
        # Submit both, then wait: the server runs them in order while we wait.
        fwd_bwd = training.forward_backward([datum], "cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=learning_rate))
        loss = fwd_bwd.result().metrics["loss:sum"]
        optim.result()
        losses.append(loss)
        print(f"step {step:2d}  loss {loss:8.3f}")
    service.close("success").result()
    return losses


if __name__ == "__main__":
    os.environ.setdefault("TINKER_API_KEY", "tml-local")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    args = parser.parse_args()
    main(args.base_url, args.steps, args.learning_rate)
