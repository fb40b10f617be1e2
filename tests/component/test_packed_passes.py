"""Packed passes (rows back to back, attention kept to each row) equal padded ones: log-probs,
losses and every adapter's gradients, with many adapters, losses and very different lengths."""

import numpy as np
import pytest
import torch
from transformers.masking_utils import create_causal_mask

from actors.batch import pack_flat, pack_pass
from actors.hf.backend import HFBackend
from actors.hf.packed_attention import packed_forward_kwargs
from actors.logprobs import scored_logprobs, target_logprobs
from actors.work import CreateModelWork, Datum, ForwardBackwardWork, LoraSpec, SampleWork, SamplingParams
from configs.schema import BaseModelConfig
from tests.conftest import TINY_LLAMA

VOCAB = TINY_LLAMA["vocab_size"]
LENGTHS = (2, 150, 7, 61, 1, 33)  # very different, so padding would be most of a padded pass
ADAPTERS = {  # model id -> LoRA spec: different ranks and target scopes
    "ce": LoraSpec(rank=4, seed=1),
    "is": LoraSpec(rank=8, seed=2, train_unembed=False),
    "topk": LoraSpec(rank=2, seed=3, train_mlp=False),
    "fwd": LoraSpec(rank=16, seed=4),
}


def make_backend(cache: str, packed: bool) -> HFBackend:
    config = BaseModelConfig(name="tiny", random_init=TINY_LLAMA, torch_threads=2, packed_passes=packed)
    be = HFBackend(config, cache)
    for model_id, lora in ADAPTERS.items():
        be.create_model(CreateModelWork(model_id, lora))
        with torch.no_grad():  # B starts at zero; make it non-zero so every gradient is exercised
            gen = torch.Generator().manual_seed(lora.seed)
            for w in be.adapters.get(model_id).weights.values():
                w.B.copy_(torch.randn(w.B.shape, generator=gen) * 0.1)
    return be


@pytest.fixture
def backends(tmp_path):
    packed, padded = make_backend(str(tmp_path), True), make_backend(str(tmp_path), False)
    assert packed.packed and not padded.packed
    return packed, padded


def data_for(model_id: str, seed: int, lengths=LENGTHS) -> list[Datum]:
    """Loss weights and advantages of order 1 / tokens: losses (and gradients) of order 1, as a
    mean-style loss gives, so that 1e-5 is fp32's precision and not a fraction of it."""
    rng = np.random.default_rng(seed)
    scale = 1 / sum(lengths)
    data = []
    for i, n in enumerate(lengths):
        shape = (n, 3) if model_id == "topk" else (n,)
        weights = (rng.random(shape) * scale).astype(np.float32)
        inputs = {"target_tokens": rng.integers(0, VOCAB, shape), "weights": weights}
        if model_id == "is":
            inputs = {
                "target_tokens": inputs["target_tokens"],
                "logprobs": rng.normal(-5.5, 0.3, size=n).astype(np.float32),
                "advantages": (rng.normal(size=n) * scale).astype(np.float32),
            }
        data.append(Datum(tokens=rng.integers(0, VOCAB, n), loss_fn_inputs=inputs))
        if model_id == "ce" and i % 2 and n > 2:  # chat-style datums: the prompt is context only
            data[-1] = Datum(
                tokens=data[-1].tokens,
                loss_fn_inputs={k: v[n // 3 :] for k, v in inputs.items()},
                loss_from=n // 3,
            )
    return data


def works(model_ids=tuple(ADAPTERS), lengths=LENGTHS) -> list[ForwardBackwardWork]:
    losses = {"ce": "cross_entropy", "is": "importance_sampling", "topk": "cross_entropy", "fwd": "cross_entropy"}
    return [
        ForwardBackwardWork(m, None, data_for(m, i, lengths), losses[m], forward_only=m == "fwd")
        for i, m in enumerate(model_ids)
    ]


def gradients(be: HFBackend, model_id: str) -> dict:
    adapter = be.adapters.get(model_id)
    return {(n, which): getattr(w, which).grad for n, w in adapter.weights.items() for which in ("A", "B")}


def assert_same_pass(packed_results, padded_results, packed: HFBackend, padded: HFBackend, model_ids) -> None:
    for ours, ref in zip(packed_results, padded_results):
        assert ours.metrics.keys() == ref.metrics.keys()
        assert ours.metrics["loss:sum"] == pytest.approx(ref.metrics["loss:sum"], abs=1e-5, rel=1e-5)
        assert len(ours.loss_fn_outputs) == len(ref.loss_fn_outputs)
        for a, b in zip(ours.loss_fn_outputs, ref.loss_fn_outputs):
            assert a["logprobs"].shape == b["logprobs"].shape
            np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5, rtol=0)
    for model_id in model_ids:
        assert packed.adapters.get(model_id).has_grad == padded.adapters.get(model_id).has_grad
        ours, ref = gradients(packed, model_id), gradients(padded, model_id)
        for key in ref:
            torch.testing.assert_close(ours[key], ref[key], atol=1e-5, rtol=1e-5, msg=f"{model_id} {key}")


def test_packed_pass_equals_padded_pass_across_adapters_and_losses(backends):
    """ce (with context-only prompts), importance_sampling, top-K targets and a forward-only
    request, each on its own adapter of its own rank, in one pass."""
    packed, padded = backends
    ours, ref = packed.forward_backward_batch(works()), padded.forward_backward_batch(works())
    assert_same_pass(ours, ref, packed, padded, ADAPTERS)
    assert not packed.adapters.get("fwd").has_grad


def test_packed_pass_equals_padded_pass_with_one_adapter(backends):
    packed, padded = backends
    ours, ref = packed.forward_backward_batch(works(["ce"])), padded.forward_backward_batch(works(["ce"]))
    assert_same_pass(ours, ref, packed, padded, ["ce"])


def test_packed_pass_equals_padded_pass_when_requests_of_one_adapter_interleave(backends):
    """Rows of one adapter that are not contiguous in the sequence (ce, is, ce): the gathered layout."""
    packed, padded = backends

    def batch():
        first, second = works(["ce", "is"], lengths=(9, 3, 40))
        third = ForwardBackwardWork("ce", None, data_for("ce", 7, (12, 1)), "cross_entropy")
        return [first, second, third]

    assert_same_pass(
        packed.forward_backward_batch(batch()), padded.forward_backward_batch(batch()), packed, padded, ADAPTERS
    )


def test_sliced_lm_head_routes_each_slice_to_its_adapters(backends):
    """A pass larger than one slice of logits: each checkpointed head slice narrows the routing to its
    own positions, in forward and in the recompute of backward."""
    packed, _ = backends
    requests = [(w.model_id, w.data) for w in works()]
    flat, padded_batch = pack_flat(requests, packed.device), pack_pass(requests, packed.device)
    params = [p for m in ADAPTERS for p in packed.adapters.get(m).parameters()]
    weights = None

    def run(compute):
        nonlocal weights
        for p in params:
            p.grad = None
        lp = compute()
        weights = torch.linspace(-1, 1, lp.numel()).view_as(lp) / len(lp) if weights is None else weights
        (lp * weights).sum().backward()
        return lp.detach(), [p.grad.clone() for p in params]

    def padded_run():
        packed.routing.set(padded_batch.row_keys)
        return target_logprobs(packed.model, padded_batch.tokens_BT, padded_batch.targets_BTK)[padded_batch.mask_BT]

    def packed_run():
        packed.routing.set(flat.row_keys, row_tokens=flat.row_lengths)
        forward = packed_forward_kwargs(flat.row_lengths, packed.device)
        args = (packed.model, flat.tokens_1N, flat.targets_SK, flat.scored_S, packed.routing.narrow)
        return scored_logprobs(*args, logits_per_slice=37 * VOCAB, position_ids=flat.positions_1N, **forward)

    ref, ours = run(padded_run), run(packed_run)
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=0)
    for g1, g2 in zip(ours[1], ref[1]):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_a_packed_forward_builds_no_attention_mask(backends):
    """The packed pass's all-ones mask lets transformers skip the N x N block mask (None: rows are kept
    apart by the lengths instead), where position ids alone would make it build one."""
    packed, _ = backends
    flat = pack_flat([(w.model_id, w.data) for w in works()], packed.device)
    embeds = packed.model.model.embed_tokens(flat.tokens_1N)
    config, mask_1N = packed.model.config, packed_forward_kwargs(flat.row_lengths, packed.device)["attention_mask"]
    mask = create_causal_mask(config, embeds, mask_1N, cache=None, position_ids=flat.positions_1N)
    assert mask is None
    n = flat.tokens_1N.shape[1]
    assert create_causal_mask(config, embeds, None, cache=None, position_ids=flat.positions_1N).shape[-2:] == (n, n)


def test_sampling_is_unchanged_on_a_packed_backend(backends):
    """Generation (left padding, KV cache) keeps transformers' own sdpa path."""
    packed, padded = backends
    params = SamplingParams(max_tokens=6, seed=3, temperature=1.0)
    prompts = [np.arange(3), np.arange(11) % 7]
    samples = [
        be.sample([SampleWork(m, None, p, params=params) for m, p in zip(("ce", "is"), prompts)])
        for be in (packed, padded)
    ]
    for ours, ref in zip(*samples):
        np.testing.assert_array_equal(ours.sequences[0].tokens, ref.sequences[0].tokens)
        np.testing.assert_allclose(ours.sequences[0].logprobs, ref.sequences[0].logprobs, atol=0, rtol=0)
