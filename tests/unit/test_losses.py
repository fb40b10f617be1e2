"""Each registered loss against hand-computed values, masks, negative weights and gradients."""

import math

import numpy as np
import pytest
import torch

from configs.errors import UserError
from losses import available_losses, get_loss, register_custom_loss, unregister_custom_loss

LP = [-0.5, -1.0, -2.0]  # learner logprobs of three target tokens
Q = [-0.7, -1.0, -1.5]  # sampler logprobs
ADV = [1.0, -2.0, 0.5]


def t(values, dtype=torch.float64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def run(name, logprobs, inputs, config=None):
    spec = get_loss(name)
    return spec(logprobs, {k: t(v) for k, v in inputs.items()}, spec.resolve_config(config))


def test_forward_backward_cross_entropy_is_weighted_sum_with_negative_weights():
    out = run("cross_entropy", t(LP), {"weights": [1.0, 0.0, -0.5]})
    assert out.loss.item() == pytest.approx(-(1.0 * -0.5 + 0.0 + -0.5 * -2.0))


def test_forward_backward_cross_entropy_without_weights_sums_every_token():
    assert run("cross_entropy", t(LP), {}).loss.item() == pytest.approx(3.5)


def test_forward_backward_cross_entropy_top_k_targets():
    logprobs_NK = t([[-0.1, -2.0], [-0.3, -1.5]])
    weights_NK = [[0.9, 0.1], [0.5, 0.5]]
    expected = -(0.9 * -0.1 + 0.1 * -2.0 + 0.5 * -0.3 + 0.5 * -1.5)
    assert run("cross_entropy", logprobs_NK, {"weights": weights_NK}).loss.item() == pytest.approx(expected)


def test_forward_backward_importance_sampling_matches_hand_computation():
    expected = -sum(math.exp(lp - q) * a for lp, q, a in zip(LP, Q, ADV))
    out = run("importance_sampling", t(LP), {"logprobs": Q, "advantages": ADV})
    assert out.loss.item() == pytest.approx(expected)


def ppo_reference(lo, hi):
    total = 0.0
    for lp, q, a in zip(LP, Q, ADV):
        r = math.exp(lp - q)
        total += min(r * a, min(max(r, lo), hi) * a)
    return -total


@pytest.mark.parametrize("lo,hi", [(0.8, 1.2), (0.9, 1.05)])
def test_forward_backward_ppo_clips_with_configured_thresholds(lo, hi):
    config = {"clip_low_threshold": lo, "clip_high_threshold": hi}
    out = run("ppo", t(LP), {"logprobs": Q, "advantages": ADV}, config)
    assert out.loss.item() == pytest.approx(ppo_reference(lo, hi))
    assert 0.0 <= out.metrics["clip_fraction:mean"] <= 1.0


def test_forward_backward_ppo_default_thresholds_are_0_8_and_1_2():
    out = run("ppo", t(LP), {"logprobs": Q, "advantages": ADV})
    assert out.loss.item() == pytest.approx(ppo_reference(0.8, 1.2))


def test_forward_backward_ppo_gradient_is_zero_where_clipping_binds():
    # r = e^{0.5} ~ 1.65 > 1.2 with A > 0: the clipped branch is selected, so no gradient.
    logprobs = t([-0.5], grad=True)
    spec = get_loss("ppo")
    out = spec(logprobs, {"logprobs": t([-1.0]), "advantages": t([1.0])}, spec.resolve_config({}))
    out.loss.backward()
    assert logprobs.grad.item() == 0.0


def test_forward_backward_cispo_uses_clipped_ratio_as_constant_weight():
    lo, hi = 0.8, 1.2
    expected = -sum(min(max(math.exp(lp - q), lo), hi) * lp * a for lp, q, a in zip(LP, Q, ADV))
    logprobs = t(LP, grad=True)
    out = run("cispo", logprobs, {"logprobs": Q, "advantages": ADV})
    assert out.loss.item() == pytest.approx(expected)
    out.loss.backward()
    expected_grad = [-min(max(math.exp(lp - q), lo), hi) * a for lp, q, a in zip(LP, Q, ADV)]
    assert logprobs.grad.tolist() == pytest.approx(expected_grad)


def test_forward_backward_dro_quadratic_penalty():
    beta = 0.3
    expected = -sum(lp * a - 0.5 * beta * (lp - q) ** 2 for lp, q, a in zip(LP, Q, ADV))
    out = run("dro", t(LP), {"logprobs": Q, "advantages": ADV}, {"beta": beta})
    assert out.loss.item() == pytest.approx(expected)


def test_forward_backward_dro_requires_beta():
    with pytest.raises(UserError, match="beta"):
        get_loss("dro").resolve_config({})


# cispo is left out on purpose: its stop-gradient makes the true derivative differ from its
# gradient; test_forward_backward_cispo_uses_clipped_ratio_as_constant_weight checks that gradient.
@pytest.mark.parametrize("name", ["cross_entropy", "importance_sampling", "ppo", "dro"])
def test_forward_backward_loss_gradients_pass_gradcheck(name):
    spec = get_loss(name)
    config = spec.resolve_config({"beta": 0.2} if name == "dro" else {})
    inputs = {"weights": t([0.5, -1.0, 2.0]), "logprobs": t([-0.6, -0.9, -1.9]), "advantages": t(ADV)}
    inputs = {k: v for k, v in inputs.items() if k in spec.inputs}
    # Stay away from ppo's kinks (ratios near the clip bounds) so finite differences are valid.
    logprobs = t([-0.5, -1.0, -2.0], grad=True)
    assert torch.autograd.gradcheck(lambda lp: spec(lp, inputs, config).loss, (logprobs,))


def test_forward_backward_masked_tokens_have_no_gradient():
    logprobs = t(LP, grad=True)
    run("cross_entropy", logprobs, {"weights": [1.0, 0.0, 1.0]}).loss.backward()
    assert logprobs.grad.tolist() == [-1.0, 0.0, -1.0]


def test_unknown_loss_is_a_user_error_listing_the_available_ones():
    with pytest.raises(UserError, match="cross_entropy"):
        get_loss("crossentropy")


def test_unknown_config_key_is_rejected():
    with pytest.raises(UserError, match="clip_low"):
        get_loss("ppo").resolve_config({"clip_low": 0.5})


def test_check_inputs_names_missing_and_ill_shaped_inputs():
    spec = get_loss("importance_sampling")
    good = {"target_tokens": np.zeros(3, np.int64), "logprobs": np.zeros(3, np.float32)}
    with pytest.raises(UserError, match="advantages"):
        spec.check_inputs(good, 3, 0)
    bad = {**good, "advantages": np.zeros(4, np.float32)}
    with pytest.raises(UserError, match="datum 2.*advantages.*leading dimension 3"):
        spec.check_inputs(bad, 3, 2)
    nan = {**good, "advantages": np.array([0, np.nan, 0], np.float32)}
    with pytest.raises(UserError, match="NaN"):
        spec.check_inputs(nan, 3, 0)


def test_top_k_targets_only_for_cross_entropy():
    targets = {"target_tokens": np.zeros((3, 2), np.int64), "logprobs": np.zeros(3), "advantages": np.zeros(3)}
    with pytest.raises(UserError, match="1-D target_tokens"):
        get_loss("importance_sampling").check_inputs(targets, 3, 0)
    get_loss("cross_entropy").check_inputs({"target_tokens": targets["target_tokens"]}, 3, 0)


def test_register_custom_loss_adds_and_validates():
    def l2_to_target(logprobs, inputs, config):
        return ((logprobs - inputs["goal"]) ** 2).sum() * config["scale"], {"custom/l2:sum": 1.0}

    register_custom_loss("l2", l2_to_target, required_inputs=("target_tokens", "goal"), config_defaults={"scale": 2.0})
    try:
        assert "l2" in available_losses()
        out = run("l2", t([-1.0, -2.0]), {"goal": [-1.0, -1.0]})
        assert out.loss.item() == pytest.approx(2.0)
        assert out.metrics == {"custom/l2:sum": 1.0}
        with pytest.raises(UserError, match="built-in"):
            register_custom_loss("ppo", l2_to_target)
    finally:
        unregister_custom_loss("l2")
    with pytest.raises(UserError):
        get_loss("l2")


def test_stable_reinforce_matches_hand_computed_values_and_gradient():
    """Thinker's definition: -sum keep * min(r, cap) * A * lp + kl_coeff * sum k3, weights detached,
    prompt positions (sampled_mask 0) out; r = exp(lp - q) with q the server's sampler log-probs."""
    lp = [-0.5, -1.0, -2.0, -0.3, -4.0]
    q = [-0.7, -1.0, -3.0, -0.3, -0.5]  # ratios e^0.2, 1, e^1 (over the cap 2), -, e^-3.5 (under 0.125: masked)
    adv = [1.0, -2.0, 0.5, 0.0, 3.0]
    mask = [1.0, 1.0, 1.0, 0.0, 1.0]  # position 3 is a prompt token
    config = {"kl_coeff": 0.1}
    logprobs = t(lp, grad=True)
    out = run("stable_reinforce", logprobs, {"sampler_logprobs": q, "sampled_mask": mask, "advantages": adv}, config)
    r = [math.exp(a - b) for a, b in zip(lp, q)]
    keep = [1.0, 1.0, 1.0, 0.0, 0.0]
    weight = [min(x, 2.0) for x in r]
    policy = -sum(k * w * a * x for k, w, a, x in zip(keep, weight, adv, lp))
    k3 = [(math.exp(b - a) - (b - a) - 1.0) * k for a, b, k in zip(lp, q, keep)]
    assert out.loss.item() == pytest.approx(policy + 0.1 * sum(k3))
    assert out.metrics == pytest.approx(
        {"masked_tokens:sum": 1.0, "truncated_tokens:sum": 1.0, "kl_sampler:sum": sum(k3), "sampled_tokens:sum": 4.0}
    )
    out.loss.backward()
    # d/dlp: -keep*w*A (the weight is a constant) + kl_coeff * keep * (1 - exp(q - lp))
    expected = [-k * w * a + 0.1 * k * (1.0 - math.exp(b - x)) for k, w, a, b, x in zip(keep, weight, adv, q, lp)]
    assert logprobs.grad.tolist() == pytest.approx(expected)


def test_stable_reinforce_takes_no_sampler_logprobs_from_the_client():
    spec = get_loss("stable_reinforce")
    assert {"sampler_logprobs", "sampled_mask"} <= set(spec.required_inputs)
    assert spec.resolve_config({}) == {"ratio_cap": 2.0, "mask_low": 0.125, "mask_high": 8.0, "kl_coeff": 0.0}


def test_gspo_uses_one_sequence_ratio_per_datum_with_each_tokens_own_gradient():
    lp = [-0.5, -1.0, -2.0, -0.2, -0.4]
    q = [-0.9, -1.0, -2.2, -0.5, -0.4]
    adv = [0.0, 1.0, 1.0, -1.0, -1.0]
    seq_mask = [0.0, 1.0, 1.0, 1.0, 0.0]  # datum 0: tokens 0-2 (prompt at 0); datum 1: tokens 3-4
    datum = [0.0, 0.0, 0.0, 1.0, 1.0]
    logprobs = t(lp, grad=True)
    inputs = {"logprobs": q, "advantages": adv, "sequence_ratio_mask": seq_mask, "datum_index": datum}
    out = run("gspo", logprobs, inputs, {"clip_low_threshold": 0.9, "clip_high_threshold": 1.2})
    log_s = [((-1.0 + 1.0) + (-2.0 + 2.2)) / 2, (-0.2 + 0.5) / 1]  # 0.1 and 0.3
    s = [math.exp(log_s[int(d)]) for d in datum]  # e^0.1 ~ 1.105 (inside), e^0.3 ~ 1.35 (over 1.2)
    objective = [min(x * a, min(max(x, 0.9), 1.2) * a) for x, a in zip(s, adv)]
    assert out.loss.item() == pytest.approx(-sum(objective))
    assert out.metrics == {"clipped_sequences:mean": 0.5}
    out.loss.backward()
    # datum 0 unclipped: -s*A per token; datum 1 with A < 0 and s over the band: min picks s*A, gradient -s*A
    assert logprobs.grad.tolist() == pytest.approx([-x * a for x, a in zip(s, adv)])


def test_gspo_without_a_mask_takes_the_tokens_with_a_sampler_logprob_or_advantage():
    """What tinker-cookbook's rl.train sends: no sequence_ratio_mask, prompt positions at 0 / 0."""
    lp, q, adv = [-0.5, -1.0, -2.0], [0.0, -1.0, -2.2], [0.0, 1.0, 1.0]
    explicit = {"logprobs": q, "advantages": adv, "sequence_ratio_mask": [0.0, 1.0, 1.0], "datum_index": [0.0] * 3}
    implicit = {k: v for k, v in explicit.items() if k != "sequence_ratio_mask"}
    assert run("gspo", t(lp), implicit).loss.item() == pytest.approx(run("gspo", t(lp), explicit).loss.item())


def test_gspo_with_an_empty_mask_has_ratio_one_not_nan():
    inputs = {"logprobs": [-1.0, -2.0], "advantages": [1.0, 1.0], "sequence_ratio_mask": [0.0, 0.0]}
    out = run("gspo", t([-0.5, -1.0]), {**inputs, "datum_index": [0.0, 0.0]})
    assert out.loss.item() == pytest.approx(-2.0)


def test_stable_reinforce_far_off_policy_tokens_cannot_make_nan():
    """A sampled token the learner finds 200 nats less likely than the sampler did is masked: no
    overflow of exp(q - lp) into the loss or the gradient, with or without kl_coeff."""
    for kl in (0.0, 0.5):
        logprobs = t([-201.0, -1.0], dtype=torch.float32, grad=True)
        inputs = {"sampler_logprobs": [-1.0, -1.1], "sampled_mask": [1.0, 1.0], "advantages": [1.0, 1.0]}
        spec = get_loss("stable_reinforce")
        out = spec(
            logprobs, {k: t(v, dtype=torch.float32) for k, v in inputs.items()}, spec.resolve_config({"kl_coeff": kl})
        )
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(logprobs.grad).all()
        assert out.metrics["masked_tokens:sum"] == 1.0
