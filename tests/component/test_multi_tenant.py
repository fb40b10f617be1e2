"""Many tenants, one pass: a mixed batch equals each adapter alone, and never touches the others."""

import numpy as np
import pytest
import torch

from actors.hf.backend import HFBackend
from actors.work import AdamParams, CreateModelWork, Datum, ForwardBackwardWork, LoraSpec, OptimStepWork
from configs.schema import BaseModelConfig
from tests.conftest import TINY_LLAMA

VOCAB = TINY_LLAMA["vocab_size"]
TENANTS = {  # model id -> (LoRA spec, loss, config)
    "ce": (LoraSpec(rank=4, seed=1), "cross_entropy", {}),
    "is": (LoraSpec(rank=8, seed=2, train_unembed=False), "importance_sampling", {}),
    "ppo": (LoraSpec(rank=2, seed=3, train_mlp=False), "ppo", {"clip_low_threshold": 0.9}),
    "dro": (LoraSpec(rank=16, seed=4, train_attn=False), "dro", {"beta": 0.1}),
    "topk": (LoraSpec(rank=4, seed=5), "cross_entropy", {}),
}


def make_backend(cache) -> HFBackend:
    be = HFBackend(BaseModelConfig(name="tiny", random_init=TINY_LLAMA, torch_threads=2), cache)
    for model_id, (lora, _, _) in TENANTS.items():
        be.create_model(CreateModelWork(model_id, lora))
        with torch.no_grad():
            gen = torch.Generator().manual_seed(lora.seed)
            for w in be.adapters.get(model_id).weights.values():
                w.B.copy_(torch.randn(w.B.shape, generator=gen) * 0.1)
    return be


def data_for(model_id: str, seed: int) -> list[Datum]:
    rng = np.random.default_rng(seed)
    data = []
    for n in rng.integers(3, 14, size=2):
        inputs = {"target_tokens": rng.integers(0, VOCAB, (n, 3) if model_id == "topk" else n)}
        if model_id == "topk":
            inputs["weights"] = rng.random((n, 3)).astype(np.float32)
        elif model_id == "ce":
            inputs["weights"] = rng.normal(size=n).astype(np.float32)
        else:
            inputs["logprobs"] = rng.normal(-5.5, 0.3, size=n).astype(np.float32)
            inputs["advantages"] = rng.normal(size=n).astype(np.float32)
        data.append(Datum(tokens=rng.integers(0, VOCAB, n), loss_fn_inputs=inputs))
    return data


def works(forward_only=()) -> list[ForwardBackwardWork]:
    return [
        ForwardBackwardWork(m, None, data_for(m, i), loss, dict(config), forward_only=m in forward_only)
        for i, (m, (_, loss, config)) in enumerate(TENANTS.items())
    ]


def grads(be, model_id):
    """The accumulated gradients (None when none accumulated)."""
    adapter = be.adapters.get(model_id)
    return {
        (name, which): getattr(w, which).grad.clone() if adapter.has_grad else None
        for name, w in adapter.weights.items()
        for which in ("A", "B")
    }


@pytest.fixture
def backends(tmp_path):
    return make_backend(str(tmp_path)), make_backend(str(tmp_path))


@pytest.mark.parametrize("forward_only", [(), ("is", "topk")])
def test_mixed_batch_equals_each_adapter_alone(backends, forward_only):
    together, alone = backends
    batched = together.forward_backward_batch(works(forward_only))
    single = [alone.forward_backward_batch([w])[0] for w in works(forward_only)]
    for model_id, r1, r2 in zip(TENANTS, batched, single):
        assert r1.metrics["loss:sum"] == pytest.approx(r2.metrics["loss:sum"], rel=1e-5, abs=1e-5), model_id
        for o1, o2 in zip(r1.loss_fn_outputs, r2.loss_fn_outputs):
            np.testing.assert_allclose(o1["logprobs"], o2["logprobs"], atol=1e-5)
        g1, g2 = grads(together, model_id), grads(alone, model_id)
        for key in g1:
            if model_id in forward_only:
                assert g1[key] is None and g2[key] is None
            else:
                scale = max(float(g2[key].abs().max()), 1.0)
                assert float((g1[key] - g2[key]).abs().max()) <= 1e-5 * scale, (model_id, key)


def test_shared_passes_never_change_a_bit_of_another_adapter(backends):
    be, _ = backends
    be.create_model(CreateModelWork("bystander", LoraSpec(rank=4, seed=9)))
    before = {n: (w.A.detach().clone(), w.B.detach().clone()) for n, w in be.adapters.get("bystander").weights.items()}
    for _ in range(2):
        be.forward_backward_batch(works())
        for model_id in TENANTS:
            be.optim_step(OptimStepWork(model_id, None, AdamParams(learning_rate=1e-2, weight_decay=0.1)))
    bystander = be.adapters.get("bystander")
    for name, w in bystander.weights.items():
        assert torch.equal(w.A, before[name][0]) and torch.equal(w.B, before[name][1])
        assert not w.A.grad.any() and not w.B.grad.any()
    assert not bystander.has_grad and bystander.step == 0


def test_a_bad_request_fails_alone_in_a_shared_pass(backends):
    be, _ = backends
    batch = works()
    batch[1].data[0].loss_fn_inputs["advantages"] = np.zeros(1, np.float32)  # wrong length
    outcomes = be.forward_backward_batch(batch)
    assert isinstance(outcomes[1], ValueError) and "advantages" in str(outcomes[1])
    assert all(not isinstance(o, Exception) for i, o in enumerate(outcomes) if i != 1)
    assert all(g is None for g in grads(be, "is").values())


def test_micro_batches_equal_one_pass_and_fail_whole(tmp_path):
    import asyncio

    from actors.model_actor import ModelActor

    config = BaseModelConfig(name="tiny", random_init=TINY_LLAMA, torch_threads=2, max_pass_tokens=30)
    actor = ModelActor(config, str(tmp_path), str(tmp_path / "ckpt"))
    reference = HFBackend(BaseModelConfig(name="tiny", random_init=TINY_LLAMA, torch_threads=2), str(tmp_path))
    data = data_for("ce", 3) + data_for("ce", 4) + data_for("ce", 5)  # 6 datums of 3..13 tokens

    async def scenario():
        await actor.create_model(CreateModelWork("m", LoraSpec(rank=4, seed=1)))
        split = await actor.forward_backward(ForwardBackwardWork("m", 1, data, "cross_entropy"))
        bad = data[:5] + [Datum(np.array([1, 2]), {"target_tokens": np.array([3, VOCAB])})]
        with pytest.raises(ValueError, match="outside"):
            await actor.forward_backward(ForwardBackwardWork("m", 2, bad, "cross_entropy"))
        return split

    split = asyncio.run(scenario())
    reference.create_model(CreateModelWork("m", LoraSpec(rank=4, seed=1)))
    whole = reference.forward_backward(ForwardBackwardWork("m", None, data, "cross_entropy"))
    assert split.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], rel=1e-5)
    for o1, o2 in zip(split.loss_fn_outputs, whole.loss_fn_outputs):
        np.testing.assert_allclose(o1["logprobs"], o2["logprobs"], atol=1e-5)
    g1, g2 = grads(actor._backend, "m"), grads(reference, "m")  # the bad request added nothing
    for key in g1:
        assert float((g1[key] - g2[key]).abs().max()) <= 1e-5 * max(float(g2[key].abs().max()), 1.0)
