"""Server-side custom losses: a checked graph (`graph_rules.Program`) bound to torch and run per datum
in the same pass as every other loss of the batch.

- Binding: each allow-listed name maps to its callable here, resolved once at import from this
  module's own list; a graph can only name entries of that table.
- Per datum d: `(loss_d, metrics_d) = graph(lp_d, *inputs_d)`, with lp_d the learner log-probs of
  the datum's targets ([T] or [T, K]) and each input as stored (rank 0 a 0-d tensor; int64 or
  float32). Loss = sum of loss_d; metrics are summed, `:mean` keys divided by the datum count.
- Sizes: before a node runs for real it runs on meta tensors (shapes only, no memory); a value over
  `MAX_VALUE_ELEMENTS`, or a request whose values together pass `MAX_REQUEST_ELEMENTS`, fails that
  request before the allocation. Ops whose size depends on values (boolean masks) run for real and
  are measured after; each returns at most its input's size. Python integers stay within 64 bits.
- Any failure is the request's own user error, naming the datum and the node.
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional  # noqa: F401  (bound by name below)

from configs.errors import UserError
from losses import graph_rules as rules
from losses.spec import LossOutput, LossSpec

MAX_VALUE_ELEMENTS = 1 << 24  # one intermediate value: 16M elements (64 MiB of float32)
MAX_REQUEST_ELEMENTS = 1 << 27  # every intermediate of one request together (512 MiB of float32)
CACHE_SIZE = 256


def _resolve(qualified: str) -> Any:
    root, *path = qualified.split(".")
    obj = {"torch": torch, "math": math, "operator": operator}[root]
    for part in path:
        obj = getattr(obj, part)
    return obj


_FUNCTIONS = {name: getattr if name == "getattr" else _resolve(name) for name in rules.FUNCTIONS}
_METHODS = {name: getattr(torch.Tensor, name) for name in rules.METHODS}
_CONSTANTS = {
    "dtype": {name: getattr(torch, name) for name in rules.DTYPES},
    "layout": {"strided": torch.strided},
    "memory_format": {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format},
}


@dataclass
class _Budget:
    left: int = MAX_REQUEST_ELEMENTS


class CompiledLoss:
    def __init__(self, program: rules.Program):
        self.program = program

    def __call__(self, values: list[torch.Tensor], budget: _Budget, datum: int) -> tuple[torch.Tensor, dict]:
        env = {name: value for (name, _), value in zip(self.program.inputs, values)}
        device = values[0].device
        for node in self.program.nodes:
            where = f"custom loss {self.program.name!r}, datum {datum}, node {node.name!r} ({node.target})"
            try:
                env[node.name] = _run(node, env, device, budget)
            except UserError as exc:
                raise UserError(f"{where}: {exc}") from None
            except Exception as exc:  # the graph's own mistake: this request fails, nothing else
                raise UserError(f"{where}: {type(exc).__name__}: {str(exc)[:400]}") from None
        loss = env[self.program.loss.node]
        name = self.program.name
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.is_floating_point():
            shown = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise UserError(f"custom loss {name!r}, datum {datum}: the loss must be a floating scalar, got {shown}")
        metrics = {}
        for key, metric in self.program.metrics.items():
            value = env[metric.node] if isinstance(metric, rules.Ref) else metric
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise UserError(f"custom loss {name!r}, datum {datum}: metric {key!r} must be a scalar")
                value = value.detach().float().item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"custom loss {name!r}, datum {datum}: metric {key!r} must be a number")
            metrics[key] = float(value)
        return loss, metrics


def _run(node: rules.Node, env: dict, device: torch.device, budget: _Budget) -> Any:
    fn = _FUNCTIONS[node.target] if node.op == "call_function" else _METHODS[node.target]
    args = _bind(node.args, env, device)
    kwargs = {key: _bind(value, env, device) for key, value in node.kwargs.items()}
    if node.op == "call_method" and not isinstance(args[0], torch.Tensor):
        raise UserError(f"method {node.target!r} called on a {type(args[0]).__name__}, not a tensor")
    tensors = _has_tensor(args) or _has_tensor(kwargs)
    python_only = node.target.startswith(("operator.", "math.")) and not tensors
    if python_only:
        _check_python_args(node.target, args)
    measured = python_only or node.target == "getattr"
    if not measured:
        try:
            with torch.device("meta"), torch.no_grad():
                _charge(fn(*_meta(args), **_meta(kwargs)), budget)
            measured = True
        except UserError:
            raise
        except Exception:
            if node.target not in rules.DATA_DEPENDENT and (node.op, node.target) != ("call_method", "nonzero"):
                raise
    with torch.device(device):
        value = fn(*args, **kwargs)
    if not measured:
        _charge(value, budget)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > rules.MAX_INT:
        raise UserError("a Python integer left the 64-bit range")
    return value


def _bind(value: Any, env: dict, device: torch.device) -> Any:
    if isinstance(value, rules.Ref):
        return env[value.node]
    if isinstance(value, rules.Constant):
        return device if value.kind == "device" else _CONSTANTS[value.kind][value.name]
    if isinstance(value, list):
        return [_bind(v, env, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_bind(v, env, device) for v in value)
    if isinstance(value, dict):
        return {k: _bind(v, env, device) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_bind(value.start, env, device), _bind(value.stop, env, device), _bind(value.step, env, device))
    return value


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, torch.device):
        return torch.device("meta")
    if isinstance(value, torch.Size):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _meta(v) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_meta(value.start), _meta(value.stop), _meta(value.step))
    return value


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _charge(value: Any, budget: _Budget) -> None:
    """Count a value's elements against the request's budget; too large is a UserError."""
    if isinstance(value, torch.Tensor):
        n = value.numel()
        if n > MAX_VALUE_ELEMENTS:
            raise UserError(f"a value of {n} elements is over the limit of {MAX_VALUE_ELEMENTS}")
        budget.left -= n
        if budget.left < 0:
            raise UserError(f"the request's values together pass the limit of {MAX_REQUEST_ELEMENTS} elements")
    elif isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        for v in value:
            _charge(v, budget)


def _check_python_args(target: str, args: tuple) -> None:
    """Operators and math on plain Python values: numbers only (indexing a shape aside), so no
    operator can build a huge string, list or integer."""
    if target == "operator.getitem":
        container, index = args
        if not isinstance(container, (tuple, list, torch.Size)) or not isinstance(index, (int, slice)):
            raise UserError("indexing is only for tensors, shapes and tuples, with an integer or a slice")
        return
    for arg in args:
        if not isinstance(arg, (int, float, bool)):
            raise UserError(f"{target} takes tensors or numbers, not a {type(arg).__name__}")
    if target == "operator.pow" and all(isinstance(a, int) for a in args):
        base, exponent = args
        if abs(base) > 1 and exponent * max(abs(base).bit_length(), 1) > 64:
            raise UserError("an integer power out of the 64-bit range")


# ---- the loss spec -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphLossSpec(LossSpec):
    """A created custom loss as a LossSpec: its own input rules (any shape per declared rank) and
    per-datum evaluation."""

    compiled: CompiledLoss | None = field(default=None, compare=False)

    @property
    def program(self) -> rules.Program:
        assert self.compiled is not None
        return self.compiled.program

    def resolve_config(self, config: Mapping[str, float | str] | None) -> dict[str, float]:
        if config:
            raise UserError(f"loss_fn custom takes only its loss_id; got config keys {sorted(config)}")
        return {}

    def check_inputs(self, inputs: Mapping[str, np.ndarray], num_tokens: int, datum: int) -> None:
        where, name = f"datum {datum}", self.program.name
        targets = inputs.get("target_tokens")
        lp_rank = self.program.inputs[0][1]
        if targets is None or targets.ndim != lp_rank or targets.shape[0] != num_tokens:
            shape = None if targets is None else list(targets.shape)
            raise UserError(
                f"{where}: loss {name!r} declares logprobs of rank {lp_rank}, so target_tokens must be "
                f"{'[N]' if lp_rank == 1 else '[N, K]'} with N = {num_tokens}; got {shape}"
            )
        for key, rank in self.program.inputs[1:]:
            if key not in inputs:
                raise UserError(f"{where}: loss {name!r} takes loss_fn_inputs[{key!r}], which the datum lacks")
            array = inputs[key]
            if (array.size != 1 or array.ndim > 1) if rank == 0 else array.ndim != rank:
                raise UserError(
                    f"{where}: loss_fn_inputs[{key!r}] has shape {list(array.shape)}, but loss {name!r} "
                    f"declared it with rank {rank}"
                )
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise UserError(f"{where}: loss_fn_inputs[{key!r}] contains NaN or infinity")

    def inputs_of(self, data: list, device: torch.device) -> dict[str, Any]:
        per_datum = []
        for datum in data:
            tensors = []
            for key, rank in self.program.inputs[1:]:
                array = datum.loss_fn_inputs[key]
                tensors.append(torch.tensor(array.reshape(()) if rank == 0 else array))  # a copy, dtype kept
            per_datum.append([t.to(device) for t in tensors])
        return {"datums": per_datum, "lengths": [datum.num_scored for datum in data]}

    def __call__(self, logprobs: torch.Tensor, inputs: Mapping[str, Any], config: Mapping[str, float]) -> LossOutput:
        assert self.compiled is not None
        budget, total, sums = _Budget(), None, {}
        pieces = torch.split(logprobs, inputs["lengths"])
        for d, (lp, values) in enumerate(zip(pieces, inputs["datums"])):
            loss, metrics = self.compiled([lp, *values], budget, d)
            total = loss if total is None else total + loss
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        count = len(pieces)
        return LossOutput(total, {k: v / count if k.endswith(":mean") else v for k, v in sums.items()})


_cache: OrderedDict[str, GraphLossSpec] = OrderedDict()


def graph_loss(key: str, name: str, inputs: Any, graph: Any) -> GraphLossSpec:
    """The spec of an uploaded loss (checked and bound once per process; `key` names the upload)."""
    spec = _cache.get(key)
    if spec is None:
        program = rules.check_program(name, inputs, graph)
        spec = GraphLossSpec(
            name="custom",
            description=f"custom loss {program.name}",
            fn=_unused,
            required_inputs=("target_tokens",),
            allows_topk=program.inputs[0][1] == 2,
            compiled=CompiledLoss(program),
        )
        _cache[key] = spec
        if len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return spec


def _unused(*_: Any) -> Any:
    raise AssertionError("a GraphLossSpec is called through GraphLossSpec.__call__")
