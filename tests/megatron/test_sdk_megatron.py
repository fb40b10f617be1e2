"""The official SDK against a Serve app with the Megatron backend (TP=2 and PP=2 on CPU):
the same LoRA loss trajectory as the HF backend on the same data and seed."""

import os
import signal

import numpy as np
import pytest
import ray
import tinker
from ray import serve
from tinker import types

from configs.schema import BaseModelConfig, ThinkerConfig
from deployments.app import build_thinker_app
from tests.conftest import TINY_LLAMA, database_file, run_app

pytestmark = [pytest.mark.serve, pytest.mark.megatron]
BASES = {
    "tiny-hf": {},
    "tiny-tp2": {"backend": "megatron", "megatron": {"tensor_parallel": 2, "cpus_per_rank": 0.25}},
    "tiny-pp2": {"backend": "megatron", "megatron": {"pipeline_parallel": 2, "cpus_per_rank": 0.25}},
}


@pytest.fixture(scope="module")
def url(serve_instance, checkpoint_root):
    models = [
        BaseModelConfig(name=name, random_init=TINY_LLAMA, num_cpus=0.5 if not extra else 0.05, **extra)
        for name, extra in BASES.items()
    ]
    config = ThinkerConfig(models=models, checkpoint_root=checkpoint_root, database_url=database_file(checkpoint_root))
    yield run_app(serve_instance, build_thinker_app(config), "megatron")
    serve.delete("megatron")  # its ranks' CPUs go back to the other test apps


def batch(step: int) -> list[types.Datum]:
    rng = np.random.default_rng(step)
    data = []
    for n in (6, 11):
        tokens = rng.integers(0, TINY_LLAMA["vocab_size"], n + 1).tolist()
        weights = rng.uniform(0.5, 1.5, n).tolist()
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
            )
        )
    return data


def test_megatron_loss_trajectories_equal_the_hf_backend(url):
    service = tinker.ServiceClient(base_url=url)
    trajectories = {}
    for base in BASES:
        tc = service.create_lora_training_client(base_model=base, rank=4, seed=3).result()
        losses = []
        for step in range(4):
            fb = tc.forward_backward(batch(step), "cross_entropy")
            op = tc.optim_step(types.AdamParams(learning_rate=1e-2, weight_decay=0.01))
            losses.append(fb.result().metrics["loss:sum"])
            op.result()
        trajectories[base] = losses
        if base != "tiny-hf":  # sampling and sampler checkpoints go through the group too
            sampler = tc.save_weights_and_get_sampling_client().result()
            result = sampler.sample(
                types.ModelInput.from_ints([1, 2, 3]), 2, types.SamplingParams(max_tokens=4, seed=1)
            )
            assert [len(s.tokens) for s in result.result().sequences] == [4, 4]
            path = tc.save_weights_for_sampler("final").result().path
            assert (
                service.create_sampling_client(model_path=path)
                .result()
                .compute_logprobs(types.ModelInput.from_ints([5, 6, 7]))
                .result()[1]
                < 0
            )
    for base in ("tiny-tp2", "tiny-pp2"):
        np.testing.assert_allclose(trajectories[base], trajectories["tiny-hf"], rtol=1e-4, atol=1e-4)
    service.close("success").result()


def rank_actors(base: str) -> list:
    named = ray.util.list_named_actors(all_namespaces=True)
    return [
        ray.get_actor(a["name"], namespace=a["namespace"])
        for a in named
        if a["name"].startswith(f"thinker-megatron:{base}:")
    ]


def test_a_rank_killed_mid_training_costs_the_client_a_delay_not_an_error(url):
    """The official SDK trains on the TP=2 group while a rank is SIGKILLed with requests in
    flight (twice): no exception, and every loss equals an unbroken run's on the same data."""
    service = tinker.ServiceClient(base_url=url)

    def run(kill_at: set[int]) -> list[float]:
        tc = service.create_lora_training_client(base_model="tiny-tp2", rank=4, seed=5).result()
        losses = []
        for step in range(6):
            fb = tc.forward_backward(batch(step), "cross_entropy")
            op = tc.optim_step(types.AdamParams(learning_rate=5e-2))
            if step in kill_at:
                (victim, *_) = rank_actors("tiny-tp2")
                pid = ray.get(victim.__ray_call__.remote(lambda _: os.getpid()))
                os.kill(pid, signal.SIGKILL)
            losses.append(fb.result().metrics["loss:sum"])
            op.result()
        return losses

    expected = run(set())
    got = run({1, 4})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    service.close("success").result()
