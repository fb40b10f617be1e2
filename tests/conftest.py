"""Shared fixtures: a tiny random Llama built from a config, and the default-model cache."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Ray workers started by the tests must import the tests' fakes too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("TINKER_API_KEY", "tml-thinker-tests")
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

TINY_LLAMA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def tiny_model_config(name: str = "tiny-llama", **overrides) -> dict:
    """A BaseModelConfig dict of the tiny random Llama (weights rebuilt from the seed)."""
    return {"name": name, "random_init": TINY_LLAMA, "num_cpus": 0.5, "torch_threads": 2, **overrides}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama saved as a local Hugging Face folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(1234)
    AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors folder (converted once, cached)."""
    from actors.model_source import ensure_embedded_model

    return ensure_embedded_model("SmolLM2-135M-Instruct", "~/.cache/thinker")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_instance():
    """A local Ray cluster with Serve's HTTP proxy on 127.0.0.1 (shut down at the end)."""
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def run_app(serve_instance: str, app, name: str = "thinker") -> str:
    from ray import serve

    serve.run(app, name=name, route_prefix="/")
    return serve_instance
