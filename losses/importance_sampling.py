"""importance_sampling: -sum(exp(logprobs - sampler_logprobs) * advantages) (off-policy REINFORCE)."""

from __future__ import annotations

import torch

from losses.spec import LossSpec

RL_INPUTS = ("target_tokens", "logprobs", "advantages")


def importance_ratio(logprobs_T: torch.Tensor, inputs) -> torch.Tensor:
    """r = p_learner / p_sampler per token, from log-probs."""
    return torch.exp(logprobs_T - inputs["logprobs"])


def importance_sampling(logprobs_T: torch.Tensor, inputs, config) -> torch.Tensor:
    return -(importance_ratio(logprobs_T, inputs) * inputs["advantages"]).sum()


SPEC = LossSpec(
    name="importance_sampling",
    description="REINFORCE with importance sampling for RL: -sum(ratio * advantages)",
    fn=importance_sampling,
    required_inputs=RL_INPUTS,
)
