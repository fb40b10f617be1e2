"""The runnable examples, run against the tiny models (the README shows them on the default)."""

import asyncio

import pytest
import yaml

from examples import example_simple, example_tinker_client, example_tinker_full, rl_loop, sl_loop

pytestmark = pytest.mark.serve


def test_example_simple(tiny_url):
    report = example_simple.main(tiny_url, steps=4, learning_rate=5e-3)
    assert report["losses"][-1] < report["losses"][0]
    assert set(report["ppo"]["metrics"]) >= {"mean_nll", "perplexity", "clip_fraction"}
    assert report["generated"]["text"] == report["generated"]["texts"][0]


def test_example_tinker_client(tiny_url):
    report = asyncio.run(example_tinker_client.main(tiny_url, steps=4, learning_rate=5e-3))
    assert report["losses"][-1] < report["losses"][0] and len(report["samples"]) == 2


def test_example_tinker_full(tiny_url, tiny_config, tmp_path):
    config_file = tmp_path / "serve_config.yaml"
    app = {"name": "tiny", "import_path": "deployments.app:build_app", "args": tiny_config.model_dump()}
    config_file.write_text(yaml.safe_dump({"applications": [app]}))
    report = example_tinker_full.main(tiny_url, str(config_file))
    assert report["trained_loss"] < report["eval_loss"]
    assert set(report["rl_losses"]) == {"importance_sampling", "ppo", "cispo", "dro"}
    assert report["server_side_custom_loss"] > 0  # a weighted NLL
    assert {"weights/example-state", "sampler_weights/example-sampler"} <= set(report["checkpoints"])
    assert report["export"].returncode == 0, report["export"].stderr
    assert (tmp_path.parent / report["export_dir"] / "model.safetensors").exists()


def test_sl_loop(tiny_url):
    history = sl_loop.main(sl_loop.Config(base_url=tiny_url, steps=8, learning_rate=5e-3, batch_size=4))
    assert sum(history[-3:]) < sum(history[:3])


def test_rl_loop_runs(tiny_url):
    rewards = rl_loop.main(rl_loop.Config(base_url=tiny_url, steps=2, questions_per_step=2, group_size=3))
    assert len(rewards) == 2 and all(0.0 <= r <= 1.0 for r in rewards)
