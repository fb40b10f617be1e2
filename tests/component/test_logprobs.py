"""Sliced, checkpointed LM-head log-probs equal the plain computation, values and gradients."""

import torch

from actors.hf.backend import HFBackend
from actors.logprobs import target_logprobs, target_logprobs_from_logits
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
