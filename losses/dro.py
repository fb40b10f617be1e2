"""dro: -sum(logprobs * A - beta/2 * (logprobs - sampler_logprobs)^2).

`beta` has no documented default, so it is required in loss_fn_config rather than guessed.
"""

from __future__ import annotations

import torch

from losses.importance_sampling import RL_INPUTS
from losses.spec import LossSpec


def dro(logprobs_T: torch.Tensor, inputs, config) -> torch.Tensor:
    log_ratio_T = logprobs_T - inputs["logprobs"]
    objective_T = logprobs_T * inputs["advantages"] - 0.5 * config["beta"] * log_ratio_T.square()
    return -objective_T.sum()


SPEC = LossSpec(
    name="dro",
    description="Direct reward optimisation: -sum(logprobs*A - beta/2 * (logprobs - sampler_logprobs)^2)",
    fn=dro,
    required_inputs=RL_INPUTS,
    required_config=("beta",),
)
