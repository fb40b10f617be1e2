"""What a loss is: a function over target log-probs plus the inputs and config it owns.

- Every loss is a plain sum over tokens and datums (no mean): aggregation is the client's job.
- `fn(logprobs, inputs, config)` sees all datums of a request concatenated along the token axis:
  `logprobs` has the shape of `target_tokens` ((N,) or (N, K)), each input its own leading N.
- A spec owns its allowed inputs and config keys, so validation lives in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from configs.errors import UserError

LossFn = Callable[
    [torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]],
    "torch.Tensor | tuple[torch.Tensor, dict[str, float]]",
]

# Inputs that hold token ids; every other input is a real-valued per-token tensor.
TOKEN_INPUTS = ("target_tokens",)


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor  # scalar: the sum over every token of the request
    metrics: dict[str, float] = field(default_factory=dict)  # "name:reduction" -> value


@dataclass(frozen=True)
class LossSpec:
    """One loss: its function, the inputs it requires or accepts and its config keys with their
    defaults. Requests are validated against the spec before any compute; `fn` returns a scalar
    sum over every token of the request (optionally with metrics)."""

    name: str
    description: str
    fn: LossFn
    required_inputs: tuple[str, ...] = ("target_tokens",)
    optional_inputs: tuple[str, ...] = ()
    config_defaults: Mapping[str, float] = field(default_factory=dict)
    required_config: tuple[str, ...] = ()
    allows_topk: bool = False  # accepts (N, K) target_tokens (top-K distillation)
    needs_datum_index: bool = False  # gets input "datum_index": each token's datum (per-sequence losses)

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.required_inputs + self.optional_inputs

    def resolve_config(self, config: Mapping[str, float | str] | None) -> dict[str, float]:
        """Defaults overlaid with the caller's values; unknown or non-numeric keys are errors."""
        allowed = set(self.config_defaults) | set(self.required_config)
        resolved = dict(self.config_defaults)
        for key, value in (config or {}).items():
            if key not in allowed:
                raise UserError(f"loss {self.name!r} has no config key {key!r}; allowed: {sorted(allowed) or 'none'}")
            if isinstance(value, str) or not math.isfinite(float(value)):
                raise UserError(f"loss {self.name!r} config {key!r} must be a finite number, got {value!r}")
            resolved[key] = float(value)
        missing = [k for k in self.required_config if k not in resolved]
        if missing:
            raise UserError(f"loss {self.name!r} needs loss_fn_config keys {missing}")
        return resolved

    def check_inputs(self, inputs: Mapping[str, np.ndarray], num_tokens: int, datum: int) -> None:
        """Raise a UserError naming the datum and key when an input is missing or ill-shaped."""
        where = f"datum {datum}"
        missing = [k for k in self.required_inputs if k not in inputs]
        if missing:
            raise UserError(f"{where}: loss {self.name!r} needs loss_fn_inputs {missing}")
        targets = inputs["target_tokens"] if "target_tokens" in inputs else None
        for key in self.inputs:
            if key not in inputs:
                continue
            array = inputs[key]
            if array.ndim == 0 or array.shape[0] != num_tokens:
                raise UserError(
                    f"{where}: loss_fn_inputs[{key!r}] has shape {list(array.shape)}, but the model "
                    f"input has {num_tokens} tokens (every input needs leading dimension {num_tokens})"
                )
            self._check_rank(key, array, targets, where)
            if key not in TOKEN_INPUTS and not np.all(np.isfinite(array)):
                raise UserError(f"{where}: loss_fn_inputs[{key!r}] contains NaN or infinity")

    def _check_rank(self, key: str, array: np.ndarray, targets: np.ndarray | None, where: str) -> None:
        if key == "target_tokens":
            if array.ndim == 2 and not self.allows_topk:
                raise UserError(f"{where}: loss {self.name!r} takes 1-D target_tokens, got {list(array.shape)}")
            if array.ndim > 2:
                raise UserError(f"{where}: target_tokens must be (N,) or (N, K), got {list(array.shape)}")
        elif key == "weights" and targets is not None:
            if array.shape != targets.shape:
                raise UserError(
                    f"{where}: weights has shape {list(array.shape)} but target_tokens has "
                    f"{list(targets.shape)}; they must match"
                )
        elif array.ndim != 1:
            raise UserError(f"{where}: loss_fn_inputs[{key!r}] must be 1-D, got {list(array.shape)}")

    def inputs_of(self, data: list, device: torch.device) -> dict[str, torch.Tensor]:
        """A request's loss inputs (targets aside), concatenated over its datums (`actors.work.Datum`),
        and each token's datum as "datum_index" when the loss asks for it."""
        inputs = {
            key: torch.from_numpy(np.concatenate([d.loss_fn_inputs[key] for d in data]).astype(np.float32)).to(device)
            for key in self.inputs
            if key != "target_tokens" and key in data[0].loss_fn_inputs
        }
        if self.needs_datum_index:
            lengths = [len(d.loss_fn_inputs["target_tokens"]) for d in data]
            inputs["datum_index"] = torch.repeat_interleave(torch.arange(len(data)), torch.tensor(lengths)).to(device)
        return inputs

    def __call__(
        self, logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
    ) -> LossOutput:
        out = self.fn(logprobs, inputs, config)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise UserError(f"loss {self.name!r} must return a scalar tensor")
        return LossOutput(loss.reshape(()), dict(metrics))
