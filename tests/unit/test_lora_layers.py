"""Multi-adapter LoRA layers (actors.lora): the grouped matmul and the per-adapter path for uneven
groups give each unit its own adapter's output and gradients, as that adapter alone would."""

import pytest
import torch
from torch import nn

from actors import lora as lora_module
from actors.lora import LoraLinear, LoraWeights, Routing

RANKS = {"a": 2, "b": 4, "c": 3}


def layer() -> tuple[LoraLinear, Routing]:
    torch.manual_seed(0)
    routing = Routing()
    module = LoraLinear(nn.Linear(8, 6), routing)
    module.base.requires_grad_(False)
    for key, rank in RANKS.items():
        A = nn.Parameter(torch.randn(rank, 8))
        B = nn.Parameter(torch.randn(6, rank))
        module.adapters[key] = LoraWeights(A, B, scaling=2.0 / rank)
    return module, routing


def reference(module: LoraLinear, x_UTF: torch.Tensor, unit_keys: list[str]) -> torch.Tensor:
    """Each unit through its own adapter alone (PEFT's y + s * B(A(x)))."""
    out = []
    for x, key in zip(x_UTF, unit_keys):
        lora = module.adapters.get(key)
        y = module.base(x)
        out.append(y if lora is None else y + (x @ lora.A.T @ lora.B.T) * lora.scaling)
    return torch.stack(out)


@pytest.mark.parametrize(
    "row_keys, row_tokens",
    [
        (["a", "b", "c", "a", "b", "c"], None),  # even groups: the grouped matmul
        (["b", "a", "b", "a", "c", "c"], None),  # even, out of order
        (["a", "b", "c", "none", "a"], [1, 1, 1, 1, 40]),  # a long prompt beside decode tokens: per adapter
        (["c", "a", "b"], [30, 1, 2]),  # uneven the other way round
    ],
)
def test_every_unit_gets_its_own_adapter_and_gradients(row_keys, row_tokens, monkeypatch):
    module, routing = layer()
    routing.set(row_keys, frozen=frozenset({"c"}), row_tokens=row_tokens)
    units = routing.num_units
    unit_keys = [k for k, n in zip(row_keys, row_tokens or [1] * len(row_keys)) for _ in range(n)]
    tokens = 3 if row_tokens is None else 1
    x = torch.randn(units, tokens, 8)
    if row_tokens is not None:  # a packed [1, N] pass: each token is a unit
        x = x.reshape(1, units, 8)
    uneven = routing.layout(x.device).gather.numel() > lora_module.UNEVEN * units
    assert uneven == (row_tokens is not None)
    calls = []
    for name in ("_grouped_delta", "_delta_per_adapter"):
        real = getattr(LoraLinear, name)
        monkeypatch.setattr(LoraLinear, name, lambda self, *a, _r=real, _n=name: calls.append(_n) or _r(self, *a))
    got = module(x)
    assert calls[-1] == ("_delta_per_adapter" if uneven else "_grouped_delta")
    want = reference(module, x.reshape(units, -1, 8), unit_keys).reshape(got.shape)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), [module.adapters[k].A for k in "ab"], retain_graph=True)
    want_grads = torch.autograd.grad((want * weights).sum(), [module.adapters[k].A for k in "ab"])
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    frozen = torch.autograd.grad(got.sum(), [module.adapters["c"].A], allow_unused=True)
    assert frozen == (None,)  # "c" is frozen: it contributes, it takes no gradient
