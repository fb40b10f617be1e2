"""Server-side custom losses: a checked graph (`graph_rules.Program`) bound to torch and run per datum
in the same pass as every other loss of the batch.

- Binding: each allow-listed name maps to its callable here, resolved once at import from this
  module's own list; a graph can only name entries of that table. The few allowed functions that
  take `out` or `inplace` positionally are bound through wrappers that never pass them.
- Per datum d: `(loss_d, metrics_d) = graph(lp_d, *inputs_d)`, with lp_d the learner log-probs of
  the datum's targets ([T] or [T, K]) and each input as stored (rank 0 a 0-d tensor; int64 or
  float32). Loss = sum of loss_d; metrics are summed, `:mean` keys divided by the datum count.
- Isolation: the graph runs on the CPU on its own copies (lp_d copied off the pass's shared
  log-probs, with the gradient flowing back through the copy), whatever device the pass is on: a
  bad index can never trip a device-side assert, and no write can reach a batch-mate's values.
  Every device a graph names is the CPU.
- Sizes: before a node runs for real it runs on meta tensors (shapes only, no memory); a value (or
  the broadcast of an op's inputs) over `MAX_VALUE_ELEMENTS`, or a request whose values together
  pass `MAX_REQUEST_ELEMENTS`, fails that request before the allocation. Value-dependent sizes are
  bounded first: `masked_select` by its broadcast size, `nonzero` by numel x ndim, and a boolean
  index becomes its `nonzero()` tuple. Python operators take numbers only (indexing a shape aside)
  and integers stay within 64 bits. A request's graph runs at most `MAX_SECONDS` in all.
- Gradient: each request's graph is differentiated on its own, inside its own error handling
  (`torch.autograd.grad` to its copy of the log-probs), and hands the pass a linear stand-in with
  the same value and gradient, so a loss whose backward fails (or runs long) fails alone, and
  what autograd saved is freed before the next request. An op is charged its inputs as well as
  its output, as its backward writes gradients of their size.
- Any failure is the request's own user error, naming the datum and the node.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from cachetools import LRUCache

from configs.errors import UserError
from losses import graph_rules as rules
from losses.spec import LossOutput, LossSpec

MAX_VALUE_ELEMENTS = 1 << 24  # one intermediate value: 16M elements (64 MiB of float32)
MAX_REQUEST_ELEMENTS = 1 << 27  # every intermediate of one request together (512 MiB of float32)
MAX_SECONDS = 20.0  # one request's graph, every datum together
CACHE_SIZE = 256
CPU = torch.device("cpu")


def _resolve(qualified: str) -> Any:
    root, *path = qualified.split(".")
    obj = {"torch": torch, "math": math, "operator": operator}[root]
    for part in path:
        obj = getattr(obj, part)
    return obj


def _normalize(input, p=2.0, dim=1, eps=1e-12, out=None):  # noqa: A002  (out is never passed on)
    return F.normalize(input, p, dim, eps)


def _relu(input, inplace=False):  # noqa: A002
    return F.relu(input)


def _silu(input, inplace=False):  # noqa: A002
    return F.silu(input)


_NEVER_IN_PLACE = {
    "torch.nn.functional.normalize": _normalize,
    "torch.nn.functional.relu": _relu,
    "torch.nn.functional.silu": _silu,
}
_FUNCTIONS = {
    name: getattr if name == "getattr" else _NEVER_IN_PLACE.get(name) or _resolve(name) for name in rules.FUNCTIONS
}
_METHODS = {name: getattr(torch.Tensor, name) for name in rules.METHODS}
_CONSTANTS = {
    "dtype": {name: getattr(torch, name) for name in rules.DTYPES},
    "layout": {"strided": torch.strided},
    "memory_format": {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format},
}


@dataclass
class _Budget:
    left: int = MAX_REQUEST_ELEMENTS
    deadline: float = field(default_factory=lambda: time.monotonic() + MAX_SECONDS)


class CompiledLoss:
    def __init__(self, program: rules.Program):
        self.program = program

    def __call__(self, values: list[torch.Tensor], budget: _Budget, datum: int) -> tuple[torch.Tensor, dict]:
        env = {name: value for (name, _), value in zip(self.program.inputs, values)}
        for node in self.program.nodes:
            where = f"custom loss {self.program.name!r}, datum {datum}, node {node.name!r} ({node.target})"
            if time.monotonic() > budget.deadline:
                raise UserError(f"{where}: the request's graph ran longer than {MAX_SECONDS:.0f} s")
            try:
                env[node.name] = _run(node, env, budget)
            except UserError as exc:
                raise UserError(f"{where}: {exc}") from None
            except Exception as exc:  # the graph's own mistake: this request fails, nothing else
                raise UserError(f"{where}: {type(exc).__name__}: {str(exc)[:400]}") from None
        loss = env[self.program.loss.node]
        name = self.program.name
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.is_floating_point():
            shown = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise UserError(f"custom loss {name!r}, datum {datum}: the loss must be a floating scalar, got {shown}")
        if loss.device != CPU:
            raise UserError(f"custom loss {name!r}, datum {datum}: the loss must stay on the loss's own device")
        metrics = {}
        for key, metric in self.program.metrics.items():
            value = env[metric.node] if isinstance(metric, rules.Ref) else metric
            if isinstance(value, torch.Tensor):
                if value.numel() != 1 or value.device != CPU:
                    raise UserError(f"custom loss {name!r}, datum {datum}: metric {key!r} must be a scalar")
                value = value.detach().float().item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"custom loss {name!r}, datum {datum}: metric {key!r} must be a number")
            metrics[key] = float(value)
        return loss, metrics


def _run(node: rules.Node, env: dict, budget: _Budget) -> Any:
    fn = _FUNCTIONS[node.target] if node.op == "call_function" else _METHODS[node.target]
    args = _bind(node.args, env)
    kwargs = {key: _bind(value, env) for key, value in node.kwargs.items()}
    if "device" in kwargs:
        kwargs["device"] = CPU
    if node.op == "call_method":
        if not isinstance(args[0], torch.Tensor):
            raise UserError(f"method {node.target!r} called on a {type(args[0]).__name__}, not a tensor")
        if node.target == "to":  # .to("cuda"), .to("meta"): every device is the CPU here
            args = tuple(CPU if isinstance(a, (str, torch.device)) else a for a in args)
        if node.target == "type" and (len(args) != 2 or kwargs or not isinstance(args[1], torch.dtype)):
            raise UserError("type() takes one dtype (e.g. torch.float32) in a custom loss")
    _check_counts(node.target, args, kwargs)
    if node.target.startswith(("operator.", "math.")):
        _check_python_args(node.target, args)
    if node.target == "operator.getitem" and isinstance(args[0], torch.Tensor):
        args = (args[0], _mask_free_index(args[1], budget))
    if node.target in rules.MASKED_SELECT:
        _charge_shape(_broadcast(args, kwargs), budget)
        measured = True
    elif node.target in rules.NONZERO:
        _charge_shape((args[0].numel(), max(args[0].ndim, 1)), budget)
        measured = True
    elif node.target == "getattr" or not (_tensors(args) or _tensors(kwargs) or node.target.startswith("torch")):
        measured = True  # plain Python values: bounded by _check_python_args
    else:
        hidden = _broadcast(args, kwargs)  # what elementwise work over the inputs spans
        if hidden is not None and math.prod(hidden) > MAX_VALUE_ELEMENTS:
            raise UserError(f"its inputs broadcast to {math.prod(hidden)} elements, over {MAX_VALUE_ELEMENTS}")
        with torch.device("meta"), torch.no_grad():
            _charge(fn(*_meta(args), **_meta(kwargs)), budget)
        if torch.is_grad_enabled():  # its backward writes gradients the size of its inputs
            for tensor in _tensors(args) + _tensors(kwargs):
                if tensor.requires_grad:
                    _charge_shape(tuple(tensor.shape), budget)
        measured = True
    with torch.device(CPU):
        value = fn(*args, **kwargs)
    if not measured:
        _charge(value, budget)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > rules.MAX_INT:
        raise UserError("a Python integer left the 64-bit range")
    return value


def _bind(value: Any, env: dict) -> Any:
    if isinstance(value, rules.Ref):
        return env[value.node]
    if isinstance(value, rules.Constant):
        return CPU if value.kind == "device" else _CONSTANTS[value.kind][value.name]
    if isinstance(value, list):
        return [_bind(v, env) for v in value]
    if isinstance(value, tuple):
        return tuple(_bind(v, env) for v in value)
    if isinstance(value, dict):
        return {k: _bind(v, env) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_bind(value.start, env), _bind(value.stop, env), _bind(value.step, env))
    return value


def _mask_free_index(index: Any, budget: _Budget) -> Any:
    """A tensor index with every boolean mask replaced by its nonzero() tuple (the same selection;
    a 0-d mask by the Python bool it holds), so the indexing's size follows from shapes; each
    nonzero is bounded before it runs."""
    parts = index if isinstance(index, tuple) else (index,)
    if not any(isinstance(p, torch.Tensor) and p.dtype in (torch.bool, torch.uint8) for p in parts):
        return index
    out: list = []
    for part in parts:
        if isinstance(part, torch.Tensor) and part.dtype in (torch.bool, torch.uint8):
            if part.ndim == 0:
                out.append(bool(part))
                continue
            _charge_shape((part.numel(), part.ndim), budget)
            out.extend(part.bool().nonzero(as_tuple=True))
        else:
            out.append(part)
    return tuple(out)


def _check_counts(target: str, args: tuple, kwargs: dict) -> None:
    """Ops whose cost grows with an argument rather than with their values: diff's order and the
    number of tensors split / chunk / unbind make, checked before anything runs."""
    name = target.rsplit(".", 1)[-1]
    if name == "diff":
        n = kwargs.get("n", args[1] if len(args) > 1 else 1)
        if not isinstance(n, int) or not 0 <= n <= rules.MAX_DIFF_ORDER:
            raise UserError(f"diff's n must be an integer in [0, {rules.MAX_DIFF_ORDER}]")
        return
    if name not in ("split", "chunk", "unbind") or not args or not isinstance(args[0], torch.Tensor):
        return
    tensor = args[0]
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    if not isinstance(dim, int) or not -max(tensor.ndim, 1) <= dim < max(tensor.ndim, 1) or tensor.ndim == 0:
        return  # torch refuses it itself
    size = tensor.shape[dim]
    if name == "unbind":
        pieces = size
    else:
        spec = kwargs.get("split_size_or_sections", kwargs.get("split_size", kwargs.get("chunks")))
        spec = args[1] if spec is None and len(args) > 1 else spec
        if isinstance(spec, (list, tuple)):
            pieces = len(spec)
        elif isinstance(spec, int) and spec > 0:
            pieces = spec if name == "chunk" else -(-size // spec)
        else:
            return  # torch refuses it itself
    if pieces > rules.MAX_PIECES:
        raise UserError(f"{name} would make {pieces} tensors, over the limit of {rules.MAX_PIECES}")


def _broadcast(args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """The broadcast shape of an op's tensor arguments (None when they do not broadcast together)."""
    shapes = [t.shape for t in _tensors(args) + _tensors(kwargs)]
    if len(shapes) < 2:
        return None
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        return None


def _tensors(values: Any) -> list[torch.Tensor]:
    """The tensors in an op's arguments (a tuple, list or dict of them, nested)."""
    found = []
    for value in values.values() if isinstance(values, dict) else values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple, dict)) and not isinstance(value, torch.Size):
            found.extend(_tensors(value))
    return found


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


def _charge(value: Any, budget: _Budget) -> None:
    """Count a value's elements against the request's budget; too large is a UserError."""
    if isinstance(value, torch.Tensor):
        _charge_shape(tuple(value.shape), budget)
    elif isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        for v in value:
            _charge(v, budget)


def _charge_shape(shape: tuple[int, ...] | None, budget: _Budget) -> None:
    n = math.prod(shape) if shape else 1
    if n > MAX_VALUE_ELEMENTS:
        raise UserError(f"a value of {n} elements is over the limit of {MAX_VALUE_ELEMENTS}")
    budget.left -= n
    if budget.left < 0:
        raise UserError(f"the request's values together pass the limit of {MAX_REQUEST_ELEMENTS} elements")


def _check_python_args(target: str, args: tuple) -> None:
    """Operators take tensors or numbers (and indexing a shape or tuple), so no operator can build
    a huge string, list or integer; math takes numbers."""
    if target == "operator.getitem":
        container, index = args
        if isinstance(container, torch.Tensor):
            return
        if not isinstance(container, (tuple, list, torch.Size)) or not isinstance(index, (int, slice)):
            raise UserError("indexing is only for tensors, shapes and tuples, with an integer or a slice")
        return
    allowed = (int, float, bool) if target.startswith("math.") else (int, float, bool, torch.Tensor)
    for arg in args:
        if not isinstance(arg, allowed):
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
        """Per datum, the declared inputs as CPU tensors of their own (the graph runs on the CPU)."""
        per_datum = []
        for datum in data:
            tensors = []
            for key, rank in self.program.inputs[1:]:
                array = datum.loss_fn_inputs[key]
                tensors.append(torch.tensor(array.reshape(()) if rank == 0 else array))  # a copy, dtype kept
            per_datum.append(tensors)
        return {"datums": per_datum, "lengths": [datum.num_scored for datum in data]}

    def __call__(self, logprobs: torch.Tensor, inputs: Mapping[str, Any], config: Mapping[str, float]) -> LossOutput:
        """The request's loss over its datums. With gradients on, the graph is differentiated here
        (its own backward, its own failure) and the pass gets `value + <logprobs, g> - sg(...)`: the
        same value and the same gradient, linear in the pass's log-probs, so the pass's backward
        cannot fail on it."""
        assert self.compiled is not None
        budget, total, sums = _Budget(), None, {}
        training = torch.is_grad_enabled() and logprobs.requires_grad
        own = logprobs.detach().to(CPU, copy=True).requires_grad_(training)  # its own copy, a leaf
        with torch.set_grad_enabled(training):
            for d, (lp, values) in enumerate(zip(torch.split(own, inputs["lengths"]), inputs["datums"])):
                loss, metrics = self.compiled([lp, *values], budget, d)
                total = loss if total is None else total + loss
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
        count = len(inputs["lengths"])
        metrics = {k: v / count if k.endswith(":mean") else v for k, v in sums.items()}
        value = total.detach().to(logprobs.device)
        if not training:
            return LossOutput(value, metrics)
        if not total.requires_grad:  # the loss does not depend on the log-probs: gradient 0
            return LossOutput(value, metrics)
        try:
            (grad,) = torch.autograd.grad(total, own)
        except Exception as exc:
            message = f"{type(exc).__name__}: {str(exc)[:400]}"
            raise UserError(f"custom loss {self.program.name!r}: its gradient failed: {message}") from None
        if not torch.isfinite(grad).all():
            raise UserError(f"custom loss {self.program.name!r}: its gradient is not finite")
        linear = (logprobs * grad.to(logprobs.device, logprobs.dtype)).sum()
        return LossOutput(value + linear - linear.detach(), metrics)


_cache: LRUCache = LRUCache(CACHE_SIZE)


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
    return spec


def _unused(*_: Any) -> Any:
    raise AssertionError("a GraphLossSpec is called through GraphLossSpec.__call__")
