"""cross_entropy: -sum(weights * logprobs).

Weights are arbitrary reals (negative ones come from `forward_backward_custom`); missing weights
mean all ones. With (N, K) targets (top-K distillation) logprobs and weights are (N, K) too.
"""

from __future__ import annotations

import torch

from losses.spec import LossSpec


def cross_entropy(logprobs_T: torch.Tensor, inputs, config) -> torch.Tensor:
    weights_T = inputs.get("weights")
    if weights_T is None:
        return -logprobs_T.sum()
    return -(weights_T * logprobs_T).sum()


SPEC = LossSpec(
    name="cross_entropy",
    description="Supervised learning: -sum(weights * logprobs); real-valued weights, (N,) or (N, K) targets",
    fn=cross_entropy,
    optional_inputs=("weights",),
    allows_topk=True,
)
