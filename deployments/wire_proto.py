"""The protobuf codec: ForwardBackwardRequest in; ForwardBackwardOutput and SampleResponse out.

- The schema is the SDK's own `tinker_public_pb2`, loaded straight from the installed `tinker`
  package's file: importing `tinker` itself would pull torch into the ingress.
- Token chunks are int32 little-endian bytes; tensors are dense bytes or 2-D sparse CSR (pad 0),
  which is densified here. Only text chunks are accepted (images and audio are user errors).
- Output tensors: one ArrayRecord for the whole batch; BatchedTensor offsets are *byte* offsets.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import numpy as np
from google.protobuf.message import DecodeError

from actors.metadata.sequences import Span
from actors.work import Datum, ForwardBackwardResult, ForwardBackwardWork, SampleResult
from configs.errors import LimitExceededError, UserError
from losses.graph_rules import CUSTOM


def _load_schema() -> ModuleType:
    spec = importlib.util.find_spec("tinker")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the tinker package (tinker==0.38.0) is required for its protobuf schema")
    path = f"{list(spec.submodule_search_locations)[0]}/proto/tinker_public_pb2.py"
    module_spec = importlib.util.spec_from_file_location("thinker_tinker_public_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


pb = _load_schema()
TOPK_EMPTY_LOGPROB = -99999.0  # with token 0: an empty top-k slot (the SDK reads a row of them as None)

_NUMPY_DTYPES = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
}


def parse_forward_backward(body: bytes) -> pb.ForwardBackwardRequest:
    """Parse the wire message; an unparseable body is a UserError (answered with 400)."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise UserError(f"body is not a valid ForwardBackwardRequest protobuf: {exc}") from None
    if not msg.model_id:
        raise UserError("ForwardBackwardRequest.model_id is empty")
    return msg


def to_work(msg: pb.ForwardBackwardRequest, forward_only: bool, max_datums: int, max_topk: int) -> ForwardBackwardWork:
    """The compute-side request; datum-level problems raise UserError naming the datum. Sizes are
    checked before anything is expanded: at most `max_datums` datums, loss inputs of exactly
    [tokens] or [tokens, K <= max_topk] (a sparse tensor cannot declare more than that)."""
    if len(msg.data) > max_datums:
        raise LimitExceededError(f"datums in the request: {len(msg.data)} is over the limit of {max_datums}")
    return ForwardBackwardWork(
        model_id=msg.model_id,
        seq_id=msg.seq_id or None,
        data=[_datum(d, i, max_topk, msg.loss_fn == CUSTOM) for i, d in enumerate(msg.data)],
        loss_fn=msg.loss_fn,
        loss_fn_config=_loss_config(msg),
        forward_only=forward_only or msg.forward_only,
    )


MAX_RUNS = 4096  # provenance runs per datum field


def spans_of(msg: pb.ForwardBackwardRequest) -> list[tuple[list[Span], list[Span]] | None]:
    """Each datum's provenance runs (model input, targets); None for a datum without any."""
    out = []
    for i, datum in enumerate(msg.data):
        if max(len(datum.model_input_spans), len(datum.loss_fn_input_spans)) > MAX_RUNS:
            raise LimitExceededError(f"datum {i}: provenance runs per field: over the limit of {MAX_RUNS}")
        if not datum.model_input_spans and not datum.loss_fn_input_spans:
            out.append(None)
            continue
        out.append((_runs(datum.model_input_spans), _runs(datum.loss_fn_input_spans)))
    return out


def _runs(spans) -> list[Span]:
    runs = []
    for span in spans:
        kind = span.WhichOneof("span")
        if kind is None:
            raise UserError("a provenance span is empty (neither prompt_tokens nor sampled_tokens)")
        run = getattr(span, kind)
        runs.append(Span("prompt" if kind == "prompt_tokens" else "sampled", run.sequence_id, run.offset, run.length))
    return runs


def _loss_config(msg: pb.ForwardBackwardRequest) -> dict[str, float | str]:
    """v2 (number or text) wins; the legacy numeric map fills keys only it has."""
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else float(value.number)
    return config


def _datum(msg: pb.Datum, index: int, max_topk: int, any_shape: bool = False) -> Datum:
    """With `any_shape` (a custom loss's inputs, other than its targets), an input may have any shape
    of rank <= 2 and at most tokens x max_topk values."""
    pieces = []
    for chunk in msg.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise UserError(f"datum {index}: {kind or 'empty'} chunks are not supported (text only)")
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise UserError(f"datum {index}: token bytes must be int32s (a multiple of 4 bytes), got {len(raw)}")
        pieces.append(np.frombuffer(raw, dtype="<i4"))
    tokens = np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)
    inputs = {}
    for name, tensor in msg.loss_fn_inputs.items():
        try:
            if any_shape and name != "target_tokens":
                inputs[name] = tensor_to_numpy(tensor, max_values=max(len(tokens), 1) * max_topk)
            else:
                inputs[name] = tensor_to_numpy(tensor, max_shape=(len(tokens), max_topk))
        except ValueError as exc:
            raise UserError(f"datum {index}: loss_fn_inputs[{str(name)[:64]!r}]: {exc}") from None
    return Datum(tokens=tokens, loss_fn_inputs=inputs)


def tensor_to_numpy(
    msg: pb.Tensor, max_shape: tuple[int, int] | None = None, max_values: int | None = None
) -> np.ndarray:
    """Dense or CSR tensor -> numpy (int64 for integer dtypes, float32 otherwise). With
    `max_shape` (rows, columns), a declared shape other than [rows] or [rows, <= columns] is refused;
    with `max_values`, a shape of rank > 2 or more values than that."""
    dtype = _NUMPY_DTYPES.get(msg.dtype)
    if dtype is None:
        raise ValueError(f"unsupported dtype {msg.dtype}")
    shape = tuple(int(s) for s in msg.shape)
    if max_shape is not None and shape:
        rows, columns = max_shape
        if shape[0] != rows or len(shape) > 2 or (len(shape) == 2 and not 1 <= shape[1] <= columns):
            raise ValueError(f"shape {list(shape)[:4]} must be [{rows}] or [{rows}, K] with 1 <= K <= {columns}")
    if max_values is not None:
        if len(shape) > 2 or min(shape, default=0) < 0 or int(np.prod(shape, dtype=object)) > max_values:
            raise ValueError(f"shape {list(shape)[:4]} must have rank <= 2 and at most {max_values} values")
        if not shape and len(msg.dense) > max_values * dtype.itemsize:
            raise ValueError(f"more than {max_values} values")
    if msg.HasField("sparse_csr"):
        array = _densify(msg.sparse_csr, dtype, shape)
    else:
        if len(msg.dense) % dtype.itemsize:
            raise ValueError(f"{len(msg.dense)} bytes are not a whole number of {dtype.itemsize}-byte values")
        flat = np.frombuffer(msg.dense, dtype=dtype)
        if not shape:
            shape = flat.shape
        if int(np.prod(shape)) != flat.size:
            raise ValueError(f"{flat.size} values do not fill shape {list(shape)}")
        array = flat.reshape(shape)
    return array.astype(np.int64 if dtype.kind == "i" else np.float32)


def _densify(csr: pb.SparseCsr, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) != 2 or min(shape) < 0:
        raise ValueError(f"sparse tensors must be 2-D, got shape {list(shape)[:4]}")
    if len(csr.values) % dtype.itemsize or len(csr.crow_indices) % 8 or len(csr.col_indices) % 8:
        raise ValueError("sparse CSR buffers are not whole numbers of values")
    values = np.frombuffer(csr.values, dtype=dtype)
    crow = np.frombuffer(csr.crow_indices, dtype="<i8")
    cols = np.frombuffer(csr.col_indices, dtype="<i8")
    rows, width = shape
    if crow.size != rows + 1 or cols.size != values.size or (crow.size and crow[-1] != values.size):
        raise ValueError("inconsistent sparse CSR indices")
    if cols.size and (cols.min() < 0 or cols.max() >= width) or np.any(np.diff(crow) < 0):
        raise ValueError("sparse CSR indices out of range")
    dense = np.zeros(shape, dtype=dtype)
    row_of = np.repeat(np.arange(rows), np.diff(crow))
    dense[row_of, cols] = values
    return dense


def encode_forward_backward_output(result: ForwardBackwardResult) -> bytes:
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in result.metrics.items():
        out.metrics[key] = float(value)
    record = out.loss_fn_outputs.add()
    record.num_datums = len(result.loss_fn_outputs)
    names = result.loss_fn_outputs[0].keys() if result.loss_fn_outputs else ()
    for name in names:
        arrays = [np.ascontiguousarray(o[name], dtype="<f4") for o in result.loss_fn_outputs]
        field = record.fields[name]
        field.dtype = pb.DTYPE_FLOAT32
        field.trailing_shape.extend(arrays[0].shape[1:])
        field.data = b"".join(a.tobytes() for a in arrays)
        field.offsets = np.cumsum([0] + [a.nbytes for a in arrays], dtype="<i8").tobytes()
    return out.SerializeToString()


def encode_sample_response(result: SampleResult, prompt_logprobs_last_n: int | None = None) -> bytes:
    """SampleResponse: one SampledSequence per sample (tokens int32, logprobs float32, stop reason),
    plus prompt logprobs (NaN where not scored) and top-k prompt logprobs when asked for."""
    out = pb.SampleResponse(prompt_cache_hit_tokens=0)
    for sequence in result.sequences:
        seq = out.sequences.add()
        seq.stop_reason = pb.STOP_REASON_STOP if sequence.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        seq.tokens = np.ascontiguousarray(sequence.tokens, dtype="<i4").tobytes()
        seq.logprobs = np.ascontiguousarray(sequence.logprobs, dtype="<f4").tobytes()
    if result.prompt_logprobs is not None:
        scores = np.array(result.prompt_logprobs, dtype="<f4")
        if prompt_logprobs_last_n is not None:
            scores[: len(scores) - prompt_logprobs_last_n] = np.nan
        out.prompt_logprobs = scores.tobytes()
    if result.topk_prompt_ids is not None:
        ids = np.array(result.topk_prompt_ids, dtype="<i4")
        lps = np.array(result.topk_prompt_logprobs, dtype="<f4")
        if prompt_logprobs_last_n is not None:
            ids[: len(ids) - prompt_logprobs_last_n] = 0
            lps[: len(lps) - prompt_logprobs_last_n] = TOPK_EMPTY_LOGPROB
        out.topk_prompt_logprobs.length, out.topk_prompt_logprobs.k = ids.shape
        out.topk_prompt_logprobs.token_ids = ids.tobytes()
        out.topk_prompt_logprobs.logprobs = lps.tobytes()
    if result.target_prompt_logprobs is not None:
        _fill_target_prompt(out.target_prompt_logprobs, result.target_prompt_logprobs, result.target_prompt_layout)
    return out.SerializeToString()


def _fill_target_prompt(tensor: pb.Tensor, values: np.ndarray, layout: tuple | None) -> None:
    """float32 log-probs in the request's layout: dense [rows, K] (0.0 where nothing was asked), or
    the same CSR crow/col indices with the log-probs as values."""
    tensor.dtype = pb.DTYPE_FLOAT32
    tensor.shape.extend(values.shape)
    if layout is None:
        tensor.dense = np.ascontiguousarray(values, dtype="<f4").tobytes()
        return
    crow, col = layout
    rows = np.repeat(np.arange(values.shape[0]), np.diff(crow))
    tensor.sparse_csr.values = np.ascontiguousarray(values[rows, col], dtype="<f4").tobytes()
    tensor.sparse_csr.crow_indices = np.ascontiguousarray(crow, dtype="<i8").tobytes()
    tensor.sparse_csr.col_indices = np.ascontiguousarray(col, dtype="<i8").tobytes()
