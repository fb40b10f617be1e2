"""ppo: -sum(min(r * A, clip(r, lo, hi) * A)), gradient only through the selected branch.

Thresholds are absolute ratio bounds (0.8 / 1.2 by default); per-token threshold tensors in
loss_fn_inputs override the config values.
"""

from __future__ import annotations

import torch

from losses.importance_sampling import RL_INPUTS, importance_ratio
from losses.spec import LossSpec

CLIP_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
CLIP_INPUTS = tuple(CLIP_DEFAULTS)


def clip_bounds(inputs, config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) as tensors broadcastable to `like`: per-token inputs win over config values."""
    bounds = []
    for key in CLIP_INPUTS:
        value = inputs[key] if key in inputs else config[key]
        bounds.append(torch.as_tensor(value, dtype=like.dtype, device=like.device))
    return bounds[0], bounds[1]


def ppo(logprobs_T: torch.Tensor, inputs, config):
    ratio_T = importance_ratio(logprobs_T, inputs)
    advantages_T = inputs["advantages"]
    low, high = clip_bounds(inputs, config, ratio_T)
    clipped_T = torch.clamp(ratio_T, low, high)
    objective_T = torch.minimum(ratio_T * advantages_T, clipped_T * advantages_T)
    clipped = (clipped_T * advantages_T < ratio_T * advantages_T).float()
    metrics = {"clip_fraction:mean": float(clipped.mean()) if clipped.numel() else 0.0}
    return -objective_T.sum(), metrics


SPEC = LossSpec(
    name="ppo",
    description="Proximal Policy Optimization with clipping for RL: -sum(min(r*A, clip(r)*A))",
    fn=ppo,
    required_inputs=RL_INPUTS,
    optional_inputs=CLIP_INPUTS,
    config_defaults=CLIP_DEFAULTS,
)
