"""Checkpoints through the official SDK: save/load, resume, sampler weights, REST, PEFT, export."""

import os

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from actors.checkpoint_store import CheckpointStore, parse_tinker_path
from actors.hf.base_model import load_base_model
from actors.hf.export import export
from actors.metadata.tenants import open_tenant_id
from configs.schema import BaseModelConfig, ThinkerConfig
from tests.conftest import tiny_model_config

pytestmark = pytest.mark.serve
TENANT = open_tenant_id(os.environ["TINKER_API_KEY"])  # open mode: the SDK's key is its tenant


def batch(seed: int) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    data = []
    for n in (9, 5):
        tokens = rng.integers(0, 256, n + 1).tolist()
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:]}
            )
        )
    return data


def steps(tc, seeds) -> list[float]:
    losses = []
    for seed in seeds:
        fb = tc.forward_backward(batch(seed), "cross_entropy")
        op = tc.optim_step(types.AdamParams(learning_rate=1e-2, weight_decay=0.01))
        losses.append(fb.result().metrics["loss:sum"])
        op.result()
    return losses


# load_state* into a live training client is deprecated in SDK 0.38, but older SDKs and scripts use it.
@pytest.mark.filterwarnings("ignore:DEPRECATED. TrainingClient.load_state:FutureWarning")
def test_resume_is_exact(service):
    tc = service.create_lora_training_client(
        base_model="tiny-a", rank=4, seed=0, user_metadata={"renderer_name": "chatml"}
    ).result()
    steps(tc, [0, 1])
    path = tc.save_state("resume-point").result().path
    assert path == f"tinker://{tc.get_info().model_id}/weights/resume-point"
    first = steps(tc, [2, 3, 4])
    tc.load_state_with_optimizer(path).result()
    assert steps(tc, [2, 3, 4]) == first
    resumed = service.create_training_client_from_state_with_optimizer(path).result()
    assert steps(resumed, [2, 3, 4]) == first
    fresh_optimizer = service.create_training_client_from_state(path).result()
    replay = steps(fresh_optimizer, [2, 3, 4])
    assert replay[0] == first[0] and replay[1:] != first[1:]  # same weights, new Adam moments


def test_rest_listing_delete_and_weights_info(service, tiny_url):
    tc = service.create_lora_training_client(
        base_model="tiny-b", rank=4, seed=0, user_metadata={"renderer_name": "chatml"}
    ).result()
    run_id = tc.get_info().model_id
    steps(tc, [0])
    state = tc.save_state("a").result().path
    sampler_path = tc.save_weights_for_sampler("b").result().path
    rest = tinker.RestClient(base_url=tiny_url)
    listed = rest.list_checkpoints(run_id).result().checkpoints
    assert [(c.checkpoint_id, c.checkpoint_type) for c in listed] == [
        ("weights/a", "training"),
        ("sampler_weights/b", "sampler"),
    ]
    assert all(c.size_bytes > 0 for c in listed)
    run = rest.get_training_run(run_id).result()
    assert run.base_model == "tiny-b" and run.lora_rank == 4 and run.user_metadata == {"renderer_name": "chatml"}
    assert run.last_checkpoint.tinker_path == state and run.last_sampler_checkpoint.tinker_path == sampler_path
    assert run_id in [r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs]
    info = rest.get_weights_info_by_tinker_path(sampler_path).result()
    assert (info.base_model, info.lora_rank, info.train_mlp) == ("tiny-b", 4, True)
    rest.delete_checkpoint_from_tinker_path(state).result()
    assert [c.checkpoint_id for c in rest.list_checkpoints(run_id).result().checkpoints] == ["sampler_weights/b"]
    with pytest.raises(tinker.NotFoundError, match="unknown checkpoint"):
        service.create_training_client_from_state(state).result()


def sampler_checkpoint(service) -> tuple[str, list]:
    tc = service.create_lora_training_client(base_model="tiny-a", rank=4, seed=3).result()
    steps(tc, [5, 6])
    path = tc.save_weights_for_sampler("for-peft").result().path
    prompt = types.ModelInput.from_ints(list(range(40, 52)))
    logprobs = service.create_sampling_client(model_path=path).result().compute_logprobs(prompt).result()
    assert logprobs == tc.save_weights_and_get_sampling_client().result().compute_logprobs(prompt).result()
    return path, logprobs


def reference_logprobs(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0]
    return torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()


def test_sampler_checkpoint_is_a_peft_folder_and_exports_merged(service, checkpoint_root, tmp_path):
    from peft import PeftModel

    path, server_logprobs = sampler_checkpoint(service)
    folder = CheckpointStore(checkpoint_root).folder(TENANT, *parse_tinker_path(path))
    base_config = BaseModelConfig(**tiny_model_config("tiny-a"))
    base = load_base_model(base_config, str(tmp_path)).model
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    tokens = list(range(40, 52))
    np.testing.assert_allclose(reference_logprobs(peft_model, tokens), server_logprobs[1:], atol=1e-5)

    config = ThinkerConfig(models=[base_config], checkpoint_root=checkpoint_root, cache_dir=str(tmp_path))
    out = export(path, str(tmp_path / "merged"), config, TENANT)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    np.testing.assert_allclose(reference_logprobs(merged, tokens), server_logprobs[1:], atol=1e-4)
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"
