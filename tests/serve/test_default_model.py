"""The real embedded default model (SmolLM2-135M-Instruct) through the official SDK."""

import pytest
import tinker
from ray import serve
from tinker import types

from configs.schema import DEFAULT_MODEL_NAME, BaseModelConfig, ThinkerConfig
from deployments.app import build_thinker_app
from examples import first_training
from examples.first_training import chat_datum
from tests.conftest import database_file, run_app

pytestmark = [pytest.mark.serve, pytest.mark.default_model]

CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris, on the river Seine."},
]


@pytest.fixture(scope="module")
def url(serve_instance, default_model_dir, checkpoint_root):
    config = ThinkerConfig(
        models=[BaseModelConfig(name=DEFAULT_MODEL_NAME, num_cpus=1)],
        checkpoint_root=checkpoint_root,
        database_url=database_file(checkpoint_root),
    )
    yield run_app(serve_instance, build_thinker_app(config), "default")
    serve.delete("default")  # its CPU goes back to the other test apps


def test_loss_falls_by_more_than_20_percent_in_10_steps(url):
    service = tinker.ServiceClient(base_url=url)
    base_model = tinker.RestClient(base_url=url).get_server_capabilities().result().supported_models[0].model_name
    tc = service.create_lora_training_client(base_model=base_model, rank=16, seed=0).result()
    datum = chat_datum(tc.get_tokenizer(), CHAT)  # tokenizer_id points at the converted model folder
    losses = []
    for _ in range(10):
        fb = tc.forward_backward([datum], "cross_entropy")
        op = tc.optim_step(types.AdamParams(learning_rate=1e-4))
        losses.append(fb.result().metrics["loss:sum"])
        op.result()
    print("losses", [round(x, 3) for x in losses])
    assert losses[-1] < 0.8 * losses[0]
    service.close("success").result()


def test_first_training_example_runs(url):
    losses = first_training.main(url, steps=3, learning_rate=1e-4)
    assert losses[-1] < losses[0]


@pytest.mark.slow  # three minutes on 2 cores: the examples' RL loop runs on tiny models in the default tier
def test_rl_loop_raises_mean_reward(url):
    from examples import rl_loop

    rewards = rl_loop.main(rl_loop.Config(base_url=url, steps=24))
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    print(f"rl_loop mean reward: first 6 steps {first:.3f}, last 6 steps {last:.3f}")
    assert last > first + 0.2
