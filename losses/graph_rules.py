"""What an uploaded custom-loss graph may contain: the allow-list, and the structural checks.

The SDK's `create_custom_loss` uploads a torch.fx graph as plain data (addendum §3.4). Nothing in
it is ever looked up by the name the client sent: every function, method, attribute and constant
must be one of the names below, and `losses.custom_graph` binds each of *these* names to its
callable. This module is torch-free, so the ingress checks an upload before storing it.

- Functions: elementwise math, reductions, comparisons, shape ops and tensor creation from the
  `torch`, `torch.nn.functional`, `torch.special`, `math` and `operator` modules. Never: in-place
  ops, `operator.setitem`, random sampling, uninitialised memory (`empty*`), anything that
  leaves torch (`item`, `numpy`, `tolist`), autograd hooks, I/O, or `out=` arguments; nor matrix
  products (`matmul`, `einsum`, `outer`), whose cost grows faster than their inputs.
- Sizes are bounded when the graph runs (`custom_graph`): every value is first computed on
  shape-only meta tensors, so a node that would allocate too much fails before it allocates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from configs.errors import UserError

CUSTOM = "custom"  # the loss_fn of a training request that names an uploaded loss
FORMAT = 1
MAX_NODES = 1024
MAX_INPUTS = 16
MAX_DEPTH = 8  # nesting of lists / tuples / dicts inside one argument
MAX_STRING = 256
MAX_INT = 2**63 - 1
INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
LOSS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")

_TORCH = """
abs absolute add all amax amin any arange argmax argmin atan2 cat ceil clamp clamp_max clamp_min clip
concat cos count_nonzero cumprod cumsum diff div divide dot eq exp exp2 expm1 flatten flip floor fmod full
full_like gather ge gt hypot index_select isfinite isinf isnan le lerp log log10 log1p log2 log_softmax
logaddexp logical_and logical_not logical_or logical_xor logsumexp lt masked_fill masked_select max
maximum mean min minimum mul multiply nan_to_num nanmean nansum ne neg negative nonzero ones ones_like pow
prod reciprocal relu remainder reshape round rsqrt sigmoid sign sin softmax sort sqrt square squeeze
stack std sub subtract sum t take_along_dim tanh tensor topk transpose tril triu true_divide trunc
unsqueeze var where xlogy zeros zeros_like
"""
_FUNCTIONAL = """
binary_cross_entropy_with_logits cosine_similarity cross_entropy gelu huber_loss kl_div l1_loss
log_softmax logsigmoid mse_loss nll_loss normalize relu sigmoid silu smooth_l1_loss softmax softplus
"""
_NN_C = "gelu log_sigmoid softplus silu"  # what torch.nn.functional's C-implemented functions trace to
_SPECIAL = "entr expit log1p logit logsumexp xlogy"
_MATH = "ceil exp fabs floor isfinite isinf isnan log log1p log2 log10 sqrt tanh"
_OPERATOR = "abs add and_ eq floordiv ge getitem gt invert le lt mod mul ne neg or_ pos pow sub truediv xor"

FUNCTIONS: frozenset[str] = frozenset(
    [f"torch.{n}" for n in _TORCH.split()]
    + [f"torch.nn.functional.{n}" for n in _FUNCTIONAL.split()]
    + [f"torch._C._nn.{n}" for n in _NN_C.split()]
    + [f"torch.special.{n}" for n in _SPECIAL.split()]
    + [f"math.{n}" for n in _MATH.split()]
    + [f"operator.{n}" for n in _OPERATOR.split()]
    + ["getattr"]
)

METHODS: frozenset[str] = frozenset(
    """
    abs add all amax amin any argmax argmin bfloat16 bool ceil chunk clamp clamp_max clamp_min clip clone
    contiguous cos count_nonzero cumprod cumsum detach diff dim div double eq exp expand expand_as expm1
    flatten flip float floor gather ge gt half index_select int isfinite isinf isnan le lerp log log10
    log1p log2 log_softmax logaddexp logical_and logical_not logical_or logsumexp long lt masked_fill
    masked_select max maximum mean min minimum mul nanmean nansum narrow ne neg new_full new_ones
    new_tensor new_zeros nonzero norm numel
    permute pow prod reciprocal relu repeat reshape reshape_as round rsqrt select sigmoid sign sin size
    softmax sort split sqrt square squeeze std sub sum t tanh tile to topk transpose trunc type type_as unbind
    unflatten unsqueeze var view view_as where xlogy
    """.split()
)

# `values` / `indices`: the fields of what max, min, sort and topk return
ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "T", "mT", "values", "indices"})
DTYPES = frozenset(
    "float32 float float64 double float16 half bfloat16 int64 long int32 int int16 int8 uint8 bool".split()
)
LAYOUTS = frozenset({"strided"})
MEMORY_FORMATS = frozenset({"contiguous_format", "preserve_format"})

# Ops whose result size depends on values, so a meta run cannot give it: custom_graph bounds each
# before it runs (masked_select by its broadcast size, nonzero by numel x ndim; a boolean index is
# turned into its nonzero() tuple first, after which indexing is shape-determined).
MASKED_SELECT = frozenset({"torch.masked_select", "masked_select"})
MAX_PIECES = 4096  # split / chunk / unbind into at most this many tensors
MAX_DIFF_ORDER = 64  # diff's n: each order is a pass over the values
NONZERO = frozenset({"torch.nonzero", "nonzero"})


@dataclass(frozen=True)
class CustomLoss:
    """An uploaded loss as a training request carries it to the compute side (plain data): the
    model actor checks and binds it (once per `key`) and runs it in the request's pass."""

    loss_id: str
    key: str  # a digest of name, inputs and graph
    name: str
    inputs: list[dict[str, Any]]
    graph: dict[str, Any]


@dataclass(frozen=True)
class Ref:
    """An argument that is the value of an earlier node."""

    node: str


@dataclass(frozen=True)
class Constant:
    """A torch constant named in the graph: kind is dtype | device | layout | memory_format."""

    kind: str
    name: str


@dataclass(frozen=True)
class Node:
    op: str  # placeholder | call_function | call_method | output
    name: str
    target: str
    args: tuple
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class Program:
    """A checked graph: nodes in execution order (placeholders first), its loss and metrics refs."""

    name: str
    inputs: tuple[tuple[str, int], ...]  # (name, rank), logprobs first
    nodes: tuple[Node, ...]  # the call nodes, in order
    loss: Ref
    metrics: dict[str, Any]  # key -> Ref (or a literal number)


def check_program(name: Any, inputs: Any, graph: Any) -> Program:
    """The upload as a Program, or a UserError naming what is wrong (never evaluated here)."""
    if not isinstance(name, str) or not LOSS_NAME.fullmatch(name):
        raise UserError("custom loss name must be a Python identifier of at most 128 characters")
    declared = _inputs(inputs)
    if not isinstance(graph, dict) or graph.get("format") != FORMAT or not isinstance(graph.get("nodes"), list):
        raise UserError(f'custom loss graph must be {{"format": {FORMAT}, "nodes": [...]}}')
    raw = graph["nodes"]
    if not 0 < len(raw) <= MAX_NODES:
        raise UserError(f"custom loss graph has {len(raw)} nodes; it needs 1 to {MAX_NODES}")
    seen: set[str] = set()
    calls: list[Node] = []
    output = None
    for index, item in enumerate(raw):
        node = _node(item, index)
        if node.name in seen:
            raise UserError(f"custom loss graph: node name {node.name!r} is used twice")
        if output is not None:
            raise UserError("custom loss graph: the output node must be the last node")
        if index < len(declared):
            if node.op != "placeholder" or node.target != declared[index][0]:
                raise UserError(
                    f"custom loss graph: node {index} must be the placeholder of input {declared[index][0]!r}"
                )
        elif node.op == "placeholder":
            raise UserError(f"custom loss graph: {len(declared)} inputs are declared, but there are more placeholders")
        elif node.op == "output":
            output = node
        else:
            calls.append(_checked_call(node, seen))
        seen.add(node.name)
    if output is None:
        raise UserError("custom loss graph has no output node")
    loss, metrics = _output(output, seen)
    return Program(name=name, inputs=declared, nodes=tuple(calls), loss=loss, metrics=metrics)


def _inputs(inputs: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(inputs, list) or not 0 < len(inputs) <= MAX_INPUTS:
        raise UserError(f"custom loss inputs must be a list of 1 to {MAX_INPUTS} {{name, rank}}")
    declared = []
    for item in inputs:
        if not isinstance(item, dict) or set(item) - {"name", "rank"}:
            raise UserError("each custom loss input is {name, rank}")
        name, rank = item.get("name"), item.get("rank")
        if not isinstance(name, str) or not INPUT_NAME.fullmatch(name):
            raise UserError(f"custom loss input name {str(name)[:64]!r} must match {INPUT_NAME.pattern}")
        if rank not in (0, 1, 2) or isinstance(rank, bool):
            raise UserError(f"custom loss input {name!r} has rank {rank!r}; ranks are 0, 1 or 2")
        declared.append((name, rank))
    if declared[0][0] != "logprobs" or declared[0][1] not in (1, 2):
        raise UserError("the first custom loss input must be logprobs, of rank 1 or 2")
    if len({n for n, _ in declared}) != len(declared):
        raise UserError("custom loss input names must be distinct")
    return tuple(declared)


def _node(item: Any, index: int) -> Node:
    if not isinstance(item, dict):
        raise UserError(f"custom loss graph: node {index} is not an object")
    op, name, target = item.get("op"), item.get("name"), item.get("target")
    if op not in ("placeholder", "call_function", "call_method", "output"):
        raise UserError(
            f"custom loss graph: node {index} has op {str(op)[:32]!r}; allowed are placeholder, "
            "call_function, call_method and output"
        )
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        raise UserError(f"custom loss graph: node {index} needs a name matching {NODE_NAME.pattern}")
    if not isinstance(target, str) or len(target) > MAX_STRING:
        raise UserError(f"custom loss graph: node {name!r} needs a target")
    args, kwargs = item.get("args", []), item.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise UserError(f"custom loss graph: node {name!r} needs args as a list and kwargs as an object")
    return Node(op, name, target, tuple(args), dict(kwargs))


def _checked_call(node: Node, seen: set[str]) -> Node:
    where = f"custom loss graph: node {node.name!r}"
    if node.op == "call_function" and node.target not in FUNCTIONS:
        raise UserError(
            f"{where} calls {node.target[:96]!r}, which is not among the functions a custom loss may "
            "call (elementwise math, reductions, comparisons and shape ops of torch, math and operator)"
        )
    if node.op == "call_method" and node.target not in METHODS:
        raise UserError(f"{where} calls tensor method {node.target[:96]!r}, which a custom loss may not call")
    if "out" in node.kwargs:
        raise UserError(f"{where} passes out=; a custom loss may not write into existing tensors")
    args = tuple(_decode(list(node.args), seen, 0, where))
    kwargs = {key[:MAX_STRING]: _decode(value, seen, 0, where) for key, value in node.kwargs.items()}
    if node.op == "call_method" and not (args and isinstance(args[0], Ref)):
        raise UserError(f"{where}: a method call needs the tensor it is called on as its first argument")
    if node.target == "getattr" and (len(args) != 2 or not isinstance(args[0], Ref) or args[1] not in ATTRIBUTES):
        raise UserError(f"{where} reads an attribute other than {sorted(ATTRIBUTES)}")
    return Node(node.op, node.name, node.target, args, kwargs)


def _decode(value: Any, seen: set[str], depth: int, where: str) -> Any:
    """JSON argument -> Python value with Ref / Constant markers (addendum §3.4's encoding)."""
    if depth > MAX_DEPTH:
        raise UserError(f"{where}: arguments nest deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise UserError(f"{where}: integer argument out of range")
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise UserError(f"{where}: string argument longer than {MAX_STRING}")
        return value
    if isinstance(value, list):
        return [_decode(v, seen, depth + 1, where) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise UserError(f"{where}: an argument object must have exactly one key")
    ((kind, inner),) = value.items()
    if kind == "ref":
        if inner not in seen:
            raise UserError(f"{where} refers to {str(inner)[:64]!r}, which is not an earlier node")
        return Ref(inner)
    if kind == "tuple" and isinstance(inner, list):
        return tuple(_decode(v, seen, depth + 1, where) for v in inner)
    if kind == "dict" and isinstance(inner, dict):
        return {str(k)[:MAX_STRING]: _decode(v, seen, depth + 1, where) for k, v in inner.items()}
    if kind == "slice" and isinstance(inner, list) and len(inner) == 3:
        return slice(*(_decode(v, seen, depth + 1, where) for v in inner))
    if kind == "ellipsis" and inner is True:
        return Ellipsis
    if kind == "float" and inner in ("inf", "-inf", "nan"):
        return float(inner)
    allowed = {"dtype": DTYPES, "layout": LAYOUTS, "memory_format": MEMORY_FORMATS}
    if kind in allowed and inner in allowed[kind]:
        return Constant(kind, inner)
    if kind == "device" and isinstance(inner, str) and len(inner) <= 32:
        return Constant("device", inner)  # every device runs as the pass's own device
    raise UserError(f"{where}: argument {str(value)[:96]} is not one a custom loss may pass")


def _output(node: Node, seen: set[str]) -> tuple[Ref, dict[str, Any]]:
    where = "custom loss graph: the output"
    if len(node.args) != 1:
        raise UserError(f"{where} must be (loss, metrics)")
    value = _decode(node.args[0], seen, 0, where)
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], Ref) and isinstance(value[1], dict)):
        raise UserError(f"{where} must be (loss, metrics) with the loss a node and the metrics a dict")
    for key, metric in value[1].items():
        if not METRIC_KEY.fullmatch(key):
            raise UserError(f"{where}: metric {key[:80]!r} must be named custom/<name>:sum or custom/<name>:mean")
        if not isinstance(metric, (Ref, int, float)) or isinstance(metric, bool):
            raise UserError(f"{where}: metric {key!r} must be a node")
    return value[0], value[1]
