"""Thinker's simple JSON routes with plain `requests`: no SDK, chat messages in, text out.

Start the server (`make serve`), then:

    python examples/example_simple.py [--base-url http://127.0.0.1:8000] [--steps 5]

It checks health, lists the loss functions, trains an adapter on one conversation (the loss
falls), takes a PPO step on a reply it sampled itself, lists adapters and generates text.
Requests carry `$TINKER_API_KEY` as `X-API-Key` when it is set (each key is its own tenant; a
server with `auth.mode: keys` needs one); without it they belong to the shared anonymous tenant.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid

import requests

http = requests.Session()
if os.environ.get("TINKER_API_KEY"):
    http.headers["X-API-Key"] = os.environ["TINKER_API_KEY"]

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
]


def retrieve(base_url: str, request_id: str, timeout_s: float = 600, headers: dict | None = None) -> dict:
    """Poll /retrieve_future until the job is done (202 = still pending)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        body = {"request_id": request_id}
        response = http.post(f"{base_url}/retrieve_future", json=body, headers=headers, timeout=60)
        if response.status_code != 202:
            response.raise_for_status()
            return response.json()
    raise TimeoutError(request_id)


def main(base_url: str = "http://127.0.0.1:8000", steps: int = 5, learning_rate: float = 5e-4) -> dict:
    print("=== Thinker simple example ===")
    print("Server status:", http.get(f"{base_url}/healthz", timeout=10).json()["status"])

    losses = http.get(f"{base_url}/loss_functions", timeout=10).json()
    print("\nAvailable loss functions:")
    for name, description in losses["descriptions"].items():
        print(f"  - {name}: {description}")

    model_id = f"example-{uuid.uuid4().hex[:8]}"
    created = http.post(f"{base_url}/add_lora", json={"model_id": model_id, "rank": 16}, timeout=120).json()
    print(f"\nCreated adapter {created['model_id']} (rank {created['rank']}) on {created['base_model']}")

    print("\n=== Supervised learning (cross_entropy) ===")
    history = []
    for step in range(steps):
        submitted = http.post(
            f"{base_url}/fwdbwd",
            json={"model_id": model_id, "data": [CONVERSATION], "loss_fn": "cross_entropy"},
            timeout=60,
        ).json()
        result = retrieve(base_url, submitted["request_id"])
        history.append(result["loss"])
        print(
            f"step {step + 1}: loss {result['loss']:.4f}  mean_nll {result['metrics']['mean_nll']:.4f}  "
            f"perplexity {result['metrics']['perplexity']:.2f}"
        )
        step_job = http.post(
            f"{base_url}/optim_step",
            json={"model_id": model_id, "adam_params": {"learning_rate": learning_rate}},
            timeout=60,
        ).json()
        retrieve(base_url, step_job["request_id"])

    print("\n=== Reinforcement learning (ppo) on a sampled reply ===")
    question = [{"role": "user", "content": "What is 2+2?"}]
    sample = http.post(
        f"{base_url}/generate",
        json={"model_id": model_id, "messages": question, "max_tokens": 16, "temperature": 1.0, "seed": 0},
        timeout=120,
    ).json()
    reward = 1.0 if "4" in sample["text"] else 0.0
    reply_tokens, reply_logprobs = sample["tokens"][0], sample["logprobs"][0]
    print(f"sampled {sample['text']!r}, reward {reward}")
    submitted = http.post(
        f"{base_url}/api/v1/forward_backward",
        json={
            "model_id": model_id,
            "data": [question + [{"role": "assistant", "content": sample["text"]}]],
            "loss_fn": "ppo",
            "loss_fn_inputs": {
                "target_tokens": [reply_tokens],
                "logprobs": [reply_logprobs],
                "advantages": [[reward - 0.5] * len(reply_tokens)],
            },
        },
        timeout=60,
    ).json()
    ppo = retrieve(base_url, submitted["request_id"])
    print(f"ppo loss {ppo['loss']:.4f}, metrics {ppo['metrics']}")
    step_job = http.post(
        f"{base_url}/api/v1/optim_step",
        json={"model_id": model_id, "adam_params": {"learning_rate": 1e-4}},
        timeout=60,
    ).json()
    retrieve(base_url, step_job["request_id"])

    adapters = http.get(f"{base_url}/adapters", timeout=10).json()["adapters"]
    print(f"\nAdapters on the server: {[a['model_id'] for a in adapters]}")
    generated = http.post(
        f"{base_url}/generate",
        json={"model_id": model_id, "messages": question, "max_tokens": 16, "temperature": 0.0},
        timeout=120,
    ).json()
    print(f"Generated: {generated['text']!r}")
    http.delete(f"{base_url}/adapters/{model_id}", timeout=60).raise_for_status()
    return {"losses": history, "ppo": ppo, "adapters": adapters, "generated": generated}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    main(args.base_url, args.steps)
