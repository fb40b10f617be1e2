"""The HF backend against a direct transformers + PEFT computation, and adapter isolation."""

import numpy as np
import pytest
import torch

from actors.hf.backend import HFBackend
from actors.work import AdamParams, CreateModelWork, Datum, ForwardBackwardWork, LoraSpec, OptimStepWork, target_scope
from configs.errors import NotFoundError, UserError
from configs.schema import BaseModelConfig
from tests.conftest import TINY_LLAMA

VOCAB = TINY_LLAMA["vocab_size"]


@pytest.fixture
def backend(tiny_model_dir):
    return HFBackend(BaseModelConfig(name="tiny", source=str(tiny_model_dir), max_adapters=4, torch_threads=2))


def make_data(seed: int, lengths=(7, 12, 3)) -> list[Datum]:
    rng = np.random.default_rng(seed)
    data = []
    for n in lengths:
        data.append(
            Datum(
                tokens=rng.integers(0, VOCAB, n),
                loss_fn_inputs={
                    "target_tokens": rng.integers(0, VOCAB, n),
                    "weights": rng.normal(size=n).astype(np.float32),
                },
            )
        )
    return data


def create(backend, model_id, **lora):
    backend.create_model(CreateModelWork(model_id, LoraSpec(**{"rank": 4, "seed": 7, **lora})))
    adapter = backend.adapters.get(model_id)
    with torch.no_grad():  # B starts at zero; make it non-zero so every gradient is exercised
        gen = torch.Generator().manual_seed(99)
        for w in adapter.weights.values():
            w.B.copy_(torch.randn(w.B.shape, generator=gen) * 0.1)
    return adapter


def peft_reference(model_dir, adapter, data, rank=4, alpha=32.0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    )
    model = get_peft_model(base, config)
    inner = model.base_model.model
    with torch.no_grad():
        for name, w in adapter.weights.items():
            module = inner.get_submodule(name)
            module.lora_A["default"].weight.copy_(w.A)
            module.lora_B["default"].weight.copy_(w.B)
    total = 0.0
    logprobs = []
    for datum in data:
        logits = model(input_ids=torch.from_numpy(datum.tokens)[None]).logits[0]
        lp = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(datum.loss_fn_inputs["target_tokens"])[:, None])[
            :, 0
        ]
        total = total - (torch.from_numpy(datum.loss_fn_inputs["weights"]) * lp).sum()
        logprobs.append(lp.detach().numpy())
    total.backward()
    grads = {
        name: (
            inner.get_submodule(name).lora_A["default"].weight.grad,
            inner.get_submodule(name).lora_B["default"].weight.grad,
        )
        for name in adapter.weights
    }
    return float(total.detach()), logprobs, grads


def test_forward_backward_matches_transformers_plus_peft(backend, tiny_model_dir):
    adapter = create(backend, "a")
    data = make_data(0)
    result = backend.forward_backward(ForwardBackwardWork("a", None, data, "cross_entropy"))
    loss, logprobs, grads = peft_reference(tiny_model_dir, adapter, data)
    assert result.metrics["loss:sum"] == pytest.approx(loss, abs=1e-4)
    for ours, ref in zip(result.loss_fn_outputs, logprobs):
        np.testing.assert_allclose(ours["logprobs"], ref, atol=1e-5, rtol=0)
    assert len(grads) == 2 * 7 + 1  # every attention and MLP projection of both layers, plus lm_head
    for name, w in adapter.weights.items():
        assert_close_to_scale(w.A.grad, grads[name][0])
        assert_close_to_scale(w.B.grad, grads[name][1])


def assert_close_to_scale(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """|ours - ref| <= tol * max|ref|: fp32 sums in another order differ at ~1e-6 of the scale."""
    scale = max(float(ref.abs().max()), 1.0)
    assert float((ours - ref).abs().max()) <= tol * scale


def test_forward_backward_accumulates_until_optim_step(backend):
    adapter = create(backend, "a")
    data = make_data(1)
    backend.forward_backward(ForwardBackwardWork("a", None, data, "cross_entropy"))
    once = [p.grad.clone() for p in adapter.parameters()]
    backend.forward_backward(ForwardBackwardWork("a", None, data, "cross_entropy"))
    for g1, p in zip(once, adapter.parameters()):
        torch.testing.assert_close(p.grad, 2 * g1)
    backend.optim_step(OptimStepWork("a", None, AdamParams(learning_rate=1e-3)))
    assert not adapter.has_grad and all(not p.grad.any() for p in adapter.parameters())


def test_forward_only_leaves_no_gradient(backend):
    adapter = create(backend, "a")
    backend.forward_backward(ForwardBackwardWork("a", None, make_data(2), "cross_entropy", forward_only=True))
    assert not adapter.has_grad and all(not p.grad.any() for p in adapter.parameters())


def test_optim_step_matches_torch_adamw_with_clipping(backend):
    adapter = create(backend, "a")
    reference = [p.detach().clone().requires_grad_(True) for p in adapter.parameters()]
    backend.forward_backward(ForwardBackwardWork("a", None, make_data(3), "cross_entropy"))
    for ref, p in zip(reference, adapter.parameters()):
        ref.grad = p.grad.clone()
    params = AdamParams(learning_rate=1e-2, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1, grad_clip_norm=0.5)
    metrics = backend.optim_step(OptimStepWork("a", None, params)).metrics
    norm = torch.nn.utils.clip_grad_norm_(reference, 0.5)
    torch.optim.AdamW(reference, lr=1e-2, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1).step()
    assert metrics["grad_norm:mean"] == pytest.approx(float(norm), rel=1e-5)
    for ref, p in zip(reference, adapter.parameters()):
        torch.testing.assert_close(p.detach(), ref.detach(), atol=0, rtol=0)


def test_training_adapter_a_leaves_adapter_b_bit_identical(backend):
    create(backend, "a")
    b = create(backend, "b", rank=8, seed=3, train_mlp=False)
    before = {name: (w.A.detach().clone(), w.B.detach().clone()) for name, w in b.weights.items()}
    for step in range(3):
        backend.forward_backward(ForwardBackwardWork("a", None, make_data(step), "cross_entropy"))
        backend.optim_step(OptimStepWork("a", None, AdamParams(learning_rate=1e-2, weight_decay=0.1)))
    for name, w in b.weights.items():
        assert torch.equal(w.A, before[name][0]) and torch.equal(w.B, before[name][1])
        assert not w.A.grad.any() and not w.B.grad.any()
    assert not b.has_grad


def test_lora_scopes_select_target_modules(backend):
    attn_only = create(backend, "attn", train_mlp=False, train_unembed=False)
    assert {target_scope(n) for n in attn_only.weights} == {"attn"}
    unembed_only = create(backend, "head", train_mlp=False, train_attn=False)
    assert list(unembed_only.weights) == ["lm_head"]


def test_same_seed_same_initial_adapter(backend):
    backend.create_model(CreateModelWork("x", LoraSpec(rank=4, seed=11)))
    backend.create_model(CreateModelWork("y", LoraSpec(rank=4, seed=11)))
    x, y = backend.adapters.get("x"), backend.adapters.get("y")
    for name in x.weights:
        assert torch.equal(x.weights[name].A, y.weights[name].A)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d[0].loss_fn_inputs.update(target_tokens=np.array([1, 2])), "leading dimension"),
        (lambda d: d[1].loss_fn_inputs.update(target_tokens=d[1].loss_fn_inputs["target_tokens"] + VOCAB), "outside"),
        (
            lambda d: d.__setitem__(
                0, Datum(tokens=np.array([-1, 3]), loss_fn_inputs={"target_tokens": np.array([1, 2])})
            ),
            "outside",
        ),
        (lambda d: d[2].loss_fn_inputs.pop("weights"), "every datum or for none"),
        (lambda d: d.clear(), "at least one datum"),
    ],
)
def test_bad_data_fails_before_touching_gradients(backend, mutate, match):
    adapter = create(backend, "a")
    data = make_data(4)
    mutate(data)
    with pytest.raises(UserError, match=match):
        backend.forward_backward(ForwardBackwardWork("a", None, data, "cross_entropy"))
    assert not adapter.has_grad and all(not p.grad.any() for p in adapter.parameters())


def test_unknown_model_and_lora_spec_errors(backend):
    with pytest.raises(NotFoundError):
        backend.forward_backward(ForwardBackwardWork("nope", None, make_data(0), "cross_entropy"))
    with pytest.raises(UserError, match="rank"):
        backend.create_model(CreateModelWork("big", LoraSpec(rank=10_000)))


def test_top_k_cross_entropy_logprobs_have_k_columns(backend):
    create(backend, "a")
    rng = np.random.default_rng(5)
    data = [
        Datum(
            tokens=rng.integers(0, VOCAB, n),
            loss_fn_inputs={
                "target_tokens": rng.integers(0, VOCAB, (n, 3)),
                "weights": np.full((n, 3), 1 / 3, np.float32),
            },
        )
        for n in (4, 6)
    ]
    result = backend.forward_backward(ForwardBackwardWork("a", None, data, "cross_entropy"))
    assert [o["logprobs"].shape for o in result.loss_fn_outputs] == [(4, 3), (6, 3)]
    expected = -sum((o["logprobs"] / 3).sum() for o in result.loss_fn_outputs)
    assert result.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)


def test_sampling_a_diverged_adapter_is_the_users_error_and_fails_alone(backend):
    """An adapter whose weights went NaN (too large a learning rate) makes non-finite logits:
    sampling it is a 400 naming the cause, and a request batched with it still samples."""
    from actors.work import SampleWork, SamplingParams

    diverged, healthy = create(backend, "nan"), create(backend, "ok")
    with torch.no_grad():
        for w in diverged.weights.values():
            w.B.fill_(float("nan"))
    params = SamplingParams(max_tokens=3, seed=1)
    prompt = np.arange(4)
    bad, good = backend.sample(
        [SampleWork("nan", None, prompt, params=params), SampleWork("ok", None, prompt, params=params)]
    )
    assert isinstance(bad, UserError) and "diverged" in str(bad)
    assert len(good.sequences[0].tokens) == 3
    assert healthy is not None
