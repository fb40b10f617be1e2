"""Adapters beyond the resident capacity wait off the device and come back bit-exact."""

import numpy as np
import pytest
import torch

from actors.hf.backend import HFBackend
from actors.work import AdamParams, CreateModelWork, Datum, ForwardBackwardWork, LoraSpec, OptimStepWork
from configs.schema import BaseModelConfig
from tests.conftest import TINY_LLAMA

VOCAB = TINY_LLAMA["vocab_size"]


def backend(tmp_path, resident: int) -> HFBackend:
    config = BaseModelConfig(name="tiny", random_init=TINY_LLAMA, torch_threads=2, max_resident_adapters=resident)
    return HFBackend(config, str(tmp_path))


def batch(seed: int) -> list[Datum]:
    rng = np.random.default_rng(seed)
    return [Datum(rng.integers(0, VOCAB, 9), {"target_tokens": rng.integers(0, VOCAB, 9)}) for _ in range(2)]


def train(be, model_id, seed, optim=True):
    be.forward_backward(ForwardBackwardWork(model_id, None, batch(seed), "cross_entropy"))
    if optim:
        be.optim_step(OptimStepWork(model_id, None, AdamParams(learning_rate=1e-2, weight_decay=0.1)))


def full_state(be, model_id) -> dict[str, torch.Tensor]:
    """Weights, gradients and AdamW moments, per parameter, plus the step and the has-grad flag."""
    adapter = be.adapters.get(model_id)
    state = {"step": torch.tensor(adapter.step), "has_grad": torch.tensor(adapter.has_grad)}
    for name, w in adapter.weights.items():
        for which, p in (("A", w.A), ("B", w.B)):
            state[f"{name}.{which}"] = p.detach().clone()
            state[f"{name}.{which}.grad"] = p.grad.clone()
    for key, (exp_avg, exp_avg_sq) in adapter.moments().items():
        state[f"{key}.exp_avg"], state[f"{key}.exp_avg_sq"] = exp_avg.clone(), exp_avg_sq.clone()
    return state


def test_offload_and_reload_are_bit_exact_and_training_continues_identically(tmp_path):
    small, large = backend(tmp_path / "a", resident=2), backend(tmp_path / "b", resident=8)
    for be in (small, large):
        be.create_model(CreateModelWork("m", LoraSpec(rank=4, seed=1)))
        train(be, "m", 0)
        train(be, "m", 1)
        train(be, "m", 2, optim=False)  # an accumulated gradient must survive offloading too
    before = full_state(small, "m")
    for i in range(3):  # push "m" out of the two resident slots
        small.create_model(CreateModelWork(f"other{i}", LoraSpec(rank=2, seed=i)))
        train(small, f"other{i}", 10 + i)
    assert "m" not in small.adapters.resident_ids()
    assert small.adapter_counts() == (2, 2)  # what the resident / offloaded gauges report
    spilled = list((tmp_path / "a" / "spill").glob("adapters-*/m.safetensors"))
    assert len(spilled) == 1  # a CPU model spills to disk
    after = full_state(small, "m")  # brings it back
    assert not spilled[0].exists()
    assert before.keys() == after.keys() and any(k.endswith(".exp_avg") for k in before)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    for be in (small, large):
        be.optim_step(OptimStepWork("m", None, AdamParams(learning_rate=1e-2, weight_decay=0.1)))
        train(be, "m", 3)
    final_small, final_large = full_state(small, "m"), full_state(large, "m")
    for key in final_large:
        assert torch.equal(final_small[key], final_large[key]), key


def test_sixty_four_live_adapters_with_eight_resident(tmp_path):
    be = backend(tmp_path, resident=8)
    for i in range(64):
        be.create_model(CreateModelWork(f"t{i}", LoraSpec(rank=4, seed=i)))
    works = [ForwardBackwardWork(f"t{i}", None, batch(i), "cross_entropy") for i in range(64)]
    for start in range(0, 64, 8):  # passes of eight tenants, every tenant offloaded in between
        outcomes = be.forward_backward_batch(works[start : start + 8])
        assert all(not isinstance(o, Exception) for o in outcomes)
    for i in range(64):
        assert be.optim_step(OptimStepWork(f"t{i}", None, AdamParams())).metrics["grad_norm:mean"] > 0
    assert len(be.adapters.resident_ids()) == 8 and len(be.list_models()) == 64


def test_a_pass_cannot_hold_more_adapters_than_fit(tmp_path):
    be = backend(tmp_path, resident=2)
    for i in range(3):
        be.create_model(CreateModelWork(f"t{i}", LoraSpec(rank=2, seed=i)))
    with pytest.raises(Exception, match="resident"):
        be.adapters.make_resident(["t0", "t1", "t2"])
