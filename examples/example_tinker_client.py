"""The official tinker SDK's async API against Thinker: train a few steps, then sample.

Every call returns an APIFuture at once; `await` it (or call `.result()` in sync code). The
`*_async` methods are deprecated in the SDK, so this example does not use them.

TINKER_API_KEY=tml-local python examples/example_tinker_client.py [--base-url ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os

import tinker
from tinker import types


def supervised_datum(tokenizer, question: str, answer: str) -> types.Datum:
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


async def main(base_url: str, steps: int = 5, learning_rate: float = 5e-4) -> dict:
    service = tinker.ServiceClient(base_url=base_url)
    capabilities = await tinker.RestClient(base_url=base_url).get_server_capabilities()
    base_model = capabilities.supported_models[0].model_name
    print(f"base model: {base_model}")
    training = await service.create_lora_training_client(base_model=base_model, rank=16, seed=0)
    tokenizer = training.get_tokenizer()
    data = [supervised_datum(tokenizer, "Name a primary color.", "Blue.")]

    losses = []
    for step in range(steps):
        fwd_bwd = training.forward_backward(data, "cross_entropy")  # both submitted at once ...
        optim = training.optim_step(types.AdamParams(learning_rate=learning_rate))
        result = await fwd_bwd  # ... and awaited together
        await optim
        losses.append(result.metrics["loss:sum"])
        print(f"step {step}: loss {losses[-1]:.4f}")

    sampler = await training.save_weights_and_get_sampling_client()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a primary color."}], tokenize=False, add_generation_prompt=True
    )
    model_input = types.ModelInput.from_ints(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    response = await sampler.sample(
        model_input, num_samples=2, sampling_params=types.SamplingParams(max_tokens=12, temperature=0.7, seed=1)
    )
    texts = [tokenizer.decode(s.tokens) for s in response.sequences]
    for text in texts:
        print("sample:", repr(text))
    await service.close("success")
    return {"losses": losses, "samples": texts}


if __name__ == "__main__":
    os.environ.setdefault("TINKER_API_KEY", "tml-local")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.base_url, args.steps))
