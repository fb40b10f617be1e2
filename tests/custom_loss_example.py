"""A custom loss module, as a user would list it in a model's `custom_losses` config."""

from losses import register_custom_loss


def weighted_squared_logprob(logprobs, inputs, config):
    """sum(scale * w * lp^2): a toy loss that is still a sum over tokens."""
    return (config["scale"] * inputs["weights"] * logprobs.square()).sum(), {"custom/squares:sum": 1.0}


register_custom_loss(
    "weighted_squared_logprob",
    weighted_squared_logprob,
    required_inputs=("target_tokens", "weights"),
    config_defaults={"scale": 1.0},
    description="toy: sum(scale * weights * logprobs^2)",
)
