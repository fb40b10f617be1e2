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
    vocab_size=260,  # the byte-level tokenizer's 259 tokens, rounded up to an even number
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

    from actors.byte_tokenizer import save_byte_level_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(1234)
    AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA)).save_pretrained(path)
    save_byte_level_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("checkpoints"))


def database_file(checkpoint_root: str) -> str:
    """The test apps' metadata database: a SQLite file beside their checkpoint root."""
    return f"sqlite:///{checkpoint_root}.sqlite3"


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors folder (converted once, cached)."""
    from actors.model_source import ensure_embedded_model

    return ensure_embedded_model("SmolLM2-135M-Instruct", "~/.cache/thinker")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the `slow` tier (minutes each on 2 cores)")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is, `slow` ones only with --slow: elsewhere they are skipped, saying why."""
    skips = []
    if not torch.cuda.is_available():
        skips.append(("gpu", pytest.mark.skip(reason="needs a CUDA device (tests/gpu runs on a GPU machine)")))
    if not config.getoption("--slow"):
        skips.append(("slow", pytest.mark.skip(reason="the slow tier: run it with --slow")))
    for item in items:
        for marker, skip in skips:
            if marker in item.keywords:
                item.add_marker(skip)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """Where the test cluster's Ray metrics agent serves Prometheus text (/metrics on 127.0.0.1)."""
    return free_port()


@pytest.fixture(scope="session")
def serve_instance(metrics_port):
    """A local Ray cluster with Serve's HTTP proxy on 127.0.0.1 (shut down at the end); its metrics
    are exported on `metrics_port` every second (Ray's default is every 10 s)."""
    import ray
    from ray import serve

    # address="local": always a cluster of its own, even beside one a test started with `ray start`
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def run_app(serve_instance: str, app, name: str) -> str:
    """Serve `app` under /name (several test apps live side by side); returns its base URL."""
    from ray import serve

    serve.run(app, name=name, route_prefix=f"/{name}")
    return f"{serve_instance}/{name}"


@pytest.fixture(scope="session")
def tiny_config(checkpoint_root):
    """Two tiny random Llamas (tiny-a, tiny-b), two ingress replicas."""
    from configs.schema import ThinkerConfig

    return ThinkerConfig(
        models=[tiny_model_config("tiny-a"), tiny_model_config("tiny-b", random_seed=1)],
        ingress_replicas=2,
        long_poll_s=2,
        checkpoint_root=checkpoint_root,
        database_url=database_file(checkpoint_root),
    )


@pytest.fixture(scope="session")
def tiny_url(serve_instance, tiny_config) -> str:
    from deployments.app import build_thinker_app

    return run_app(serve_instance, build_thinker_app(tiny_config), "tiny")


@pytest.fixture(scope="module")
def service(tiny_url):
    """An official SDK client of the tiny app: one session per test module, closed after it."""
    import tinker

    client = tinker.ServiceClient(base_url=tiny_url)
    yield client
    client.close("success").result()


@pytest.fixture(scope="session")
def postgres_server_url():
    """A PostgreSQL server for the session's tests (started here, stopped at the end)."""
    from tests.postgres import binaries, postgres_server

    if binaries() is None:
        pytest.skip("PostgreSQL server binaries not installed (.ci/run installs them)")
    with postgres_server(free_port()) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """A fresh, empty metadata database: a SQLite file, and a database on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'thinker.sqlite3'}"
    from tests.postgres import fresh_database

    return fresh_database(request.getfixturevalue("postgres_server_url"))
