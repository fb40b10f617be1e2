"""gspo: token-level Group Sequence Policy Optimization (Tinker's published definition).

Per datum, over M = {t : sequence_ratio_mask[t] != 0}, with lp the learner's and q the sampler's
log-probs (`logprobs`), A the advantages and sg a stop-gradient:

    log_s = mean_{t in M} (sg(lp_t) - q_t)        # one sequence ratio per datum (0 if M is empty)
    s_t   = exp(log_s + lp_t - sg(lp_t))          # its value, with the gradient of the token's own lp
    loss  = -sum_t min(s_t * A_t, clip(s_t, lo, hi) * A_t)

Without `sequence_ratio_mask` (tinker-cookbook's `rl.train` sends none; its `recipes/rl_loop.py`
does), M is the tokens that carry a sampler log-prob or an advantage: by the cookbook's convention
prompt positions carry neither.

Default thresholds are PPO's absolute bounds 0.8 / 1.2 (as `ppo` and `cispo`); the GSPO paper used
a much tighter band (about 1 - 3e-4 / 1 + 4e-4): set clip_low_threshold / clip_high_threshold.
"""

from __future__ import annotations

import torch

from losses.ppo import CLIP_DEFAULTS
from losses.spec import LossSpec


def gspo(logprobs_T: torch.Tensor, inputs, config):
    if "sequence_ratio_mask" in inputs:
        mask_T = (inputs["sequence_ratio_mask"] != 0).to(logprobs_T.dtype)
    else:
        mask_T = ((inputs["logprobs"] != 0) | (inputs["advantages"] != 0)).to(logprobs_T.dtype)
    datum_T = inputs["datum_index"].long()
    datums = int(datum_T.max()) + 1 if datum_T.numel() else 0
    diff_T = (logprobs_T.detach() - inputs["logprobs"]) * mask_T
    total_D = torch.zeros(datums, dtype=logprobs_T.dtype, device=logprobs_T.device).index_add(0, datum_T, diff_T)
    count_D = torch.zeros(datums, dtype=logprobs_T.dtype, device=logprobs_T.device).index_add(0, datum_T, mask_T)
    log_s_D = torch.where(count_D > 0, total_D / count_D.clamp(min=1), torch.zeros_like(total_D))
    ratio_T = torch.exp(log_s_D[datum_T] + logprobs_T - logprobs_T.detach())
    advantages_T = inputs["advantages"]
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    clipped_T = torch.clamp(ratio_T, low, high)
    objective_T = torch.minimum(ratio_T * advantages_T, clipped_T * advantages_T)
    seq_ratio_D = torch.exp(log_s_D)
    clipped_D = ((seq_ratio_D < low) | (seq_ratio_D > high)).float()
    metrics = {"clipped_sequences:mean": float(clipped_D.mean()) if datums else 0.0}
    return -objective_T.sum(), metrics


SPEC = LossSpec(
    name="gspo",
    description="Group Sequence Policy Optimization (token-level): PPO clipping of a per-sequence ratio",
    fn=gspo,
    required_inputs=("target_tokens", "logprobs", "advantages"),
    optional_inputs=("sequence_ratio_mask",),
    config_defaults=CLIP_DEFAULTS,
    needs_datum_index=True,
)
