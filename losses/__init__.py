"""Loss functions: what is optimised. Knows nothing of LoRA, Ray or HTTP."""

from losses.registry import available_losses, get_loss, register_custom_loss, unregister_custom_loss
from losses.spec import LossOutput, LossSpec

__all__ = [
    "LossOutput",
    "LossSpec",
    "available_losses",
    "get_loss",
    "register_custom_loss",
    "unregister_custom_loss",
]
