"""Loss functions: what is optimised. Knows nothing of LoRA, Ray or HTTP.

Imported lazily: `losses.graph_rules` (the custom-loss allow-list) is torch-free, and the
ingress imports it without pulling torch in through this package.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "LossOutput": "losses.spec",
    "LossSpec": "losses.spec",
    "available_losses": "losses.registry",
    "get_loss": "losses.registry",
    "loss_spec": "losses.registry",
    "register_custom_loss": "losses.registry",
    "unregister_custom_loss": "losses.registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'losses' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
