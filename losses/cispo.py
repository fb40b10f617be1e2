"""cispo: -sum(stopgrad(clip(r, lo, hi)) * logprobs * A): the clipped ratio is a constant weight."""

from __future__ import annotations

import torch

from losses.importance_sampling import RL_INPUTS, importance_ratio
from losses.ppo import CLIP_DEFAULTS, CLIP_INPUTS, clip_bounds
from losses.spec import LossSpec


def cispo(logprobs_T: torch.Tensor, inputs, config) -> torch.Tensor:
    ratio_T = importance_ratio(logprobs_T, inputs)
    low, high = clip_bounds(inputs, config, ratio_T)
    weight_T = torch.clamp(ratio_T, low, high).detach()
    return -(weight_T * logprobs_T * inputs["advantages"]).sum()


SPEC = LossSpec(
    name="cispo",
    description="Clipped importance-sampling policy optimisation: -sum(sg(clip(r)) * logprobs * A)",
    fn=cispo,
    required_inputs=RL_INPUTS,
    optional_inputs=CLIP_INPUTS,
    config_defaults=CLIP_DEFAULTS,
)
