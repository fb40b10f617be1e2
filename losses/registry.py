"""The explicit loss registry: built-in specs plus losses registered in-process.

- `get_loss(name)` is the only lookup; an unknown name is a UserError listing what exists
  (never a silent fallback to cross_entropy).
- `register_custom_loss` adds a loss to this process; model actors import the modules named
  in their config's `custom_losses` at start, which is where such calls belong in a deployment.
"""

from __future__ import annotations

from collections.abc import Mapping

from configs.errors import UserError
from losses import cispo, cross_entropy, dro, gspo, importance_sampling, ppo, stable_reinforce
from losses.graph_rules import CUSTOM, CustomLoss
from losses.spec import LossFn, LossSpec

BUILTIN_LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        cross_entropy.SPEC,
        importance_sampling.SPEC,
        ppo.SPEC,
        cispo.SPEC,
        dro.SPEC,
        gspo.SPEC,
        stable_reinforce.SPEC,
    )
}
_custom_losses: dict[str, LossSpec] = {}


def get_loss(name: str) -> LossSpec:
    spec = BUILTIN_LOSSES.get(name) or _custom_losses.get(name)
    if spec is None:
        raise UserError(f"unknown loss function {name!r}; available: {sorted(available_losses())}")
    return spec


def loss_spec(loss_fn: str, custom: CustomLoss | None = None) -> LossSpec:
    """The spec a training request names: a registered loss, or `custom` with the uploaded loss
    the request carries (see `losses.custom_graph`)."""
    if loss_fn != CUSTOM:
        return get_loss(loss_fn)
    if custom is None:
        raise UserError("loss_fn custom needs the loss_id of a loss made with create_custom_loss")
    from losses.custom_graph import graph_loss

    return graph_loss(custom.key, custom.name, custom.inputs, custom.graph)


def available_losses() -> dict[str, str]:
    """name -> description, built-ins first."""
    return {name: spec.description for name, spec in {**BUILTIN_LOSSES, **_custom_losses}.items()}


def register_custom_loss(
    name: str,
    fn: LossFn,
    *,
    required_inputs: tuple[str, ...] = ("target_tokens",),
    optional_inputs: tuple[str, ...] = (),
    config_defaults: Mapping[str, float] | None = None,
    description: str = "",
) -> LossSpec:
    """Register `fn(logprobs, inputs, config) -> loss | (loss, metrics)` under `name`.

    The loss must be a sum over tokens, like the built-ins. Re-registering a custom name
    replaces it; built-in names cannot be replaced.
    """
    if name in BUILTIN_LOSSES or name == CUSTOM:
        raise UserError(f"{name!r} is a built-in loss and cannot be replaced")
    if "target_tokens" not in required_inputs:
        raise UserError("a custom loss needs target_tokens among its required inputs")
    spec = LossSpec(
        name=name,
        description=description or f"custom loss {name}",
        fn=fn,
        required_inputs=tuple(required_inputs),
        optional_inputs=tuple(optional_inputs),
        config_defaults=dict(config_defaults or {}),
    )
    _custom_losses[name] = spec
    return spec


def unregister_custom_loss(name: str) -> None:
    _custom_losses.pop(name, None)
