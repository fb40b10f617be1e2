"""stable_reinforce: Thinker's own off-policy-stable REINFORCE (the hosted objective is unpublished).

Per sampled token t (the positions that provenance spans mark as sampled; `sampled_mask` 1), with
lp = the learner's log-prob, q = the sampler's log-prob **recorded by this server at sampling
time** (`sampler_logprobs`, never the client's), A = the advantage and r = exp(sg(lp) - q):

    w_t    = min(r_t, ratio_cap)                          # truncated importance weight, detached
    keep_t = mask_low <= r_t <= mask_high                 # tokens too far off-policy get no gradient
    k3_t   = exp(q_t - lp_t) - (q_t - lp_t) - 1           # KL(learner || sampler) estimator, >= 0
    loss   = -sum_t keep_t * w_t * A_t * lp_t  +  kl_coeff * sum_t keep_t * k3_t

Prompt positions (sampled_mask 0) carry nothing (their advantages must be 0); masked tokens are out
of the KL term too (their exp(q - lp) could overflow). Defaults:
ratio_cap 2.0, mask_low 0.125, mask_high 8.0, kl_coeff 0.0. `sampler_logprobs` and
`sampled_mask` are filled in by the server from the spans; a client cannot send them.
"""

from __future__ import annotations

import torch

from losses.spec import LossSpec

SERVER_INPUTS = ("sampler_logprobs", "sampled_mask")  # filled in from provenance spans, never by a client
DEFAULTS = {"ratio_cap": 2.0, "mask_low": 0.125, "mask_high": 8.0, "kl_coeff": 0.0}


def stable_reinforce(logprobs_T: torch.Tensor, inputs, config):
    sampled_T = inputs["sampled_mask"]
    sampler_T = inputs["sampler_logprobs"]
    ratio_T = torch.exp(logprobs_T.detach() - sampler_T)
    weight_T = torch.clamp(ratio_T, max=config["ratio_cap"])
    keep_T = ((ratio_T >= config["mask_low"]) & (ratio_T <= config["mask_high"])).to(logprobs_T.dtype) * sampled_T
    policy = -(keep_T * weight_T * inputs["advantages"] * logprobs_T).sum()
    log_diff_T = torch.where(keep_T > 0, sampler_T - logprobs_T, torch.zeros_like(logprobs_T))
    kl_T = (torch.exp(log_diff_T) - log_diff_T - 1.0) * keep_T
    loss = policy + config["kl_coeff"] * kl_T.sum() if config["kl_coeff"] else policy
    sampled = float(sampled_T.sum())
    metrics = {
        "masked_tokens:sum": float(sampled - keep_T.sum()),
        "truncated_tokens:sum": float(((ratio_T > config["ratio_cap"]) * sampled_T).sum()),
        "kl_sampler:sum": float(kl_T.detach().sum()),
        "sampled_tokens:sum": sampled,
    }
    return loss, metrics


SPEC = LossSpec(
    name="stable_reinforce",
    description=(
        "Thinker's off-policy-stable REINFORCE: truncated, detached importance weights against the "
        "server-recorded sampler log-probs, far off-policy tokens masked, optional kl_coeff"
    ),
    fn=stable_reinforce,
    required_inputs=("target_tokens", "advantages", *SERVER_INPUTS),
    optional_inputs=("logprobs",),
    config_defaults=DEFAULTS,
)
