"""On a CUDA device (skipped elsewhere): the HF backend trains and samples as it does on the CPU,
offloads adapters to host memory bit-exact, the Megatron backend runs its ranks over NCCL, and
the shipped single-GPU config serves the official SDK."""

from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
import yaml
from tinker import types

from actors.hf.backend import HFBackend
from actors.work import (
    AdamParams,
    CreateModelWork,
    Datum,
    ForwardBackwardWork,
    LoraSpec,
    OptimStepWork,
    SampleWork,
    SamplingParams,
)
from configs.schema import BaseModelConfig, ThinkerConfig
from tests.conftest import TINY_LLAMA, database_file, run_app

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]
VOCAB = TINY_LLAMA["vocab_size"]


def tiny(num_gpus: float, **extra) -> BaseModelConfig:
    return BaseModelConfig(name="tiny", random_init=TINY_LLAMA, torch_threads=2, num_gpus=num_gpus, **extra)


def data(seed: int, n: int = 3) -> list[Datum]:
    rng = np.random.default_rng(seed)
    return [Datum(rng.integers(0, VOCAB, 12), {"target_tokens": rng.integers(0, VOCAB, 12)}) for _ in range(n)]


def trajectory(backend, steps: int = 3) -> list[float]:
    backend.create_model(CreateModelWork("m", LoraSpec(rank=8, seed=1)))
    losses = []
    for step in range(steps):
        result = backend.forward_backward(ForwardBackwardWork("m", None, data(step), "cross_entropy"))
        backend.optim_step(OptimStepWork("m", None, AdamParams(learning_rate=1e-2)))
        losses.append(result.metrics["loss:sum"])
    return losses


def test_training_on_the_gpu_follows_the_cpu_trajectory(tmp_path):
    gpu, cpu = HFBackend(tiny(1), str(tmp_path)), HFBackend(tiny(0), str(tmp_path))
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(trajectory(gpu), trajectory(cpu), rtol=1e-4, atol=1e-4)


def test_greedy_sampling_on_the_gpu_equals_the_cpu(tmp_path):
    prompt = np.random.default_rng(0).integers(0, 256, 7)
    work = SampleWork("tiny", None, prompt, params=SamplingParams(max_tokens=12, temperature=0, stop_at_eos=False))
    tokens = [HFBackend(tiny(g), str(tmp_path)).sample([work])[0].sequences[0].tokens.tolist() for g in (1, 0)]
    assert tokens[0] == tokens[1]


def test_offloaded_adapters_wait_in_host_memory_and_come_back_bit_exact(tmp_path):
    backend = HFBackend(tiny(1, max_resident_adapters=1), str(tmp_path))
    trajectory(backend, steps=2)
    backend.forward_backward(ForwardBackwardWork("m", None, data(9), "cross_entropy"))  # a pending gradient too
    before = {key: buffer.clone() for key, buffer in backend.adapters.get("m").buffers.items()}
    backend.create_model(CreateModelWork("other", LoraSpec(rank=4, seed=2)))
    backend.forward_backward(ForwardBackwardWork("other", None, data(3), "cross_entropy"))
    offloaded = backend.adapters._adapters["m"].offloaded
    assert isinstance(offloaded, dict) and {t.device.type for t in offloaded.values()} == {"cpu"}
    after = backend.adapters.get("m").buffers
    assert all(torch.equal(before[key], after[key]) and after[key].is_cuda for key in before)


@pytest.mark.megatron
def test_megatron_ranks_over_nccl_follow_the_hf_backend(serve_instance, tmp_path):
    from actors.megatron.backend import MegatronBackend

    layout = {"gpus_per_rank": 1.0, "cpus_per_rank": 0.5}
    megatron = MegatronBackend(
        BaseModelConfig(name="tiny", random_init=TINY_LLAMA, backend="megatron", megatron=layout), str(tmp_path)
    )
    try:
        np.testing.assert_allclose(
            trajectory(megatron), trajectory(HFBackend(tiny(1), str(tmp_path))), rtol=1e-4, atol=1e-4
        )
    finally:
        megatron.close()


@pytest.mark.serve
@pytest.mark.default_model
def test_the_single_gpu_config_trains_and_samples_through_the_sdk(serve_instance, default_model_dir, checkpoint_root):
    from deployments.app import build_thinker_app

    served = yaml.safe_load((REPO / "configs" / "gpu_single.yaml").read_text())
    args = {
        **served["applications"][0]["args"],
        "checkpoint_root": checkpoint_root,
        "database_url": database_file(checkpoint_root),
        "ingress_replicas": 1,
    }
    url = run_app(serve_instance, build_thinker_app(ThinkerConfig.model_validate(args)), "gpu")
    service = tinker.ServiceClient(base_url=url)
    base_model = args["models"][0]["name"]
    tc = service.create_lora_training_client(base_model=base_model, rank=16, seed=0).result()
    ids = tc.get_tokenizer()("The capital of France is Paris, on the river Seine.")["input_ids"]
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]})
    losses = []
    for _ in range(6):
        fb = tc.forward_backward([datum], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        losses.append(fb.result().metrics["loss:sum"])
    assert losses[-1] < 0.8 * losses[0]
    sampler = tc.save_weights_and_get_sampling_client()
    reply = sampler.sample(types.ModelInput.from_ints(ids[:4]), 1, types.SamplingParams(max_tokens=8)).result()
    assert len(reply.sequences[0].tokens) > 0
    service.close("success").result()
