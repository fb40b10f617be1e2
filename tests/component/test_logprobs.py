"""Sliced, checkpointed LM-head log-probs equal the plain computation, values and gradients."""

import torch

from actors.hf.backend import HFBackend
from actors.logprobs import head_is_separable, head_logits, target_logprobs, target_logprobs_from_logits
from actors.work import CreateModelWork, LoraSpec
from configs.schema import BaseModelConfig
from tests.conftest import TINY_LLAMA


def test_sliced_logprobs_and_gradients_equal_full_logits(tmp_path):
    be = HFBackend(BaseModelConfig(name="tiny", random_init=TINY_LLAMA, torch_threads=2), str(tmp_path))
    be.create_model(CreateModelWork("m", LoraSpec(rank=4, seed=0)))
    params = be.adapters.get("m").parameters()
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    be.routing.set(["m"] * 3)
    tokens = torch.randint(0, TINY_LLAMA["vocab_size"], (3, 11), generator=torch.Generator().manual_seed(2))
    targets = torch.randint(0, TINY_LLAMA["vocab_size"], (3, 11, 2), generator=torch.Generator().manual_seed(3))

    def run(compute):
        for p in params:
            p.grad = None
        lp = compute()
        (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
        return lp.detach(), [p.grad.clone() for p in params]

    full = run(lambda: target_logprobs_from_logits(be.model(input_ids=tokens).logits, targets))
    sliced = run(lambda: target_logprobs(be.model, tokens, targets, logits_per_slice=3 * 4 * 260))  # 4 positions
    torch.testing.assert_close(sliced[0], full[0], atol=1e-5, rtol=0)
    for g1, g2 in zip(sliced[1], full[1]):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def _tiny(config_class, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_class(**TINY_LLAMA, **extra)).eval()


def test_the_head_alone_gives_the_models_own_logits_or_is_not_used():
    """Packed passes and folded decode steps run the LM head on chosen positions only: its logits
    must be the model's own, including the output scaling of Granite and Cohere (a plain head
    alone samples wrong tokens there); a model whose forward does something else is not
    separable, and its logits come from its own forward."""
    from transformers import CohereConfig, GraniteConfig, LlamaConfig

    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(4))
    targets = ids[:, :, None]
    models = {
        "llama": _tiny(LlamaConfig),
        "granite": _tiny(GraniteConfig, logits_scaling=4.0),
        "cohere": _tiny(CohereConfig, logit_scale=0.5),
    }
    for name, model in models.items():
        assert head_is_separable(model), name
        with torch.no_grad():
            want = model(input_ids=ids).logits
            got = head_logits(model, model.model(input_ids=ids).last_hidden_state)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            plain = model.get_output_embeddings()(model.model(input_ids=ids).last_hidden_state)
            assert name == "llama" or not torch.allclose(plain, want, atol=1e-3)  # the scaling matters
            torch.testing.assert_close(target_logprobs(model, ids, targets), target_logprobs_from_logits(want, targets))

    odd = _tiny(LlamaConfig)
    forward = odd.forward
    odd.forward = lambda *a, **k: forward(*a, **k).__class__(logits=forward(*a, **k).logits * 3)  # unknown scaling
    assert not head_is_separable(odd)
    with torch.no_grad():
        want = target_logprobs_from_logits(odd(input_ids=ids).logits, targets)
        torch.testing.assert_close(target_logprobs(odd, ids, targets, separable=False), want)
