"""Turning a request's datums into one pass, and log-probs back into per-datum arrays.

- Two layouts of a pass. `pack_pass`: rows right-padded to the longest (with causal attention a
  padded row's real positions never see the pad, so no attention mask is needed and positions stay
  0..N-1). `pack_flat`: every row back to back in one [1, N] sequence, positions restarting at 0
  per row, for attention that keeps to each row (`actors.hf.packed_attention`): no padding.
- Both list the scored positions in the same order (row by row), so a request's span and log-probs
  are the same whichever layout ran.
- Everything is validated before any compute, so a bad datum fails the request without
  touching any adapter's gradients.
- One pass may hold several requests (different adapters, losses and target shapes): each keeps
  a span of the flattened scored positions; its loss inputs are concatenated over its datums
  along the token axis, matching `losses.spec`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actors.work import Datum, ForwardBackwardResult
from configs.errors import RequestTooLargeError, UserError
from losses.spec import LossOutput, LossSpec


@dataclass
class RequestSpan:
    """One request's part of a pass: its scored positions in the flattened batch."""

    first: int  # offset of its first scored position in the flattened [sum N, K] view
    lengths: list[int]  # scored positions per datum
    k: int  # candidates per position (1 for plain targets)
    topk: bool  # targets were (N, K)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)


@dataclass
class PassBatch:
    tokens_BT: torch.Tensor  # int64, right-padded with 0
    targets_BTK: torch.Tensor  # int64, K = the largest K of the pass
    mask_BT: torch.Tensor  # bool, True on scored positions
    row_keys: list[str]  # each row's adapter
    spans: list[RequestSpan]  # one per request, in order


@dataclass
class FlatBatch:
    tokens_1N: torch.Tensor  # int64, every row's tokens back to back
    positions_1N: torch.Tensor  # int64, restarting at 0 on every row
    row_lengths: list[int]  # tokens per row, in order (they sum to N)
    scored_S: torch.Tensor  # int64 indices into N of the scored positions, row by row
    targets_SK: torch.Tensor  # int64, K = the largest K of the pass
    row_keys: list[str]  # each row's adapter
    spans: list[RequestSpan]  # one per request, in order


def validate_data(data: list[Datum], spec: LossSpec, vocab_size: int, max_seq_len: int, max_batch_tokens: int) -> None:
    if not data:
        raise UserError("forward_backward needs at least one datum")
    total = 0
    trailing = set()
    for i, datum in enumerate(data):
        n = int(datum.tokens.shape[0]) if datum.tokens.ndim == 1 else -1
        if n < 1:
            raise UserError(f"datum {i}: model_input must be a non-empty 1-D token list")
        if n > max_seq_len:
            raise UserError(f"datum {i}: {n} tokens exceed this model's maximum of {max_seq_len}")
        if not 0 <= datum.loss_from < n:
            raise UserError(f"datum {i}: nothing to score (loss_from {datum.loss_from}, {n} tokens)")
        _check_token_range(datum.tokens, vocab_size, f"datum {i}: model_input")
        spec.check_inputs(datum.loss_fn_inputs, datum.num_scored, i)
        _check_token_range(datum.loss_fn_inputs["target_tokens"], vocab_size, f"datum {i}: target_tokens")
        trailing.add(datum.loss_fn_inputs["target_tokens"].shape[1:])
        total += n
    if len(trailing) > 1:
        raise UserError("all datums of a request need target_tokens of one shape kind: all (N,) or all (N, K)")
    for key in spec.optional_inputs:
        present = sum(key in d.loss_fn_inputs for d in data)
        if 0 < present < len(data):
            raise UserError(f"loss_fn_inputs[{key!r}] must be given for every datum or for none")
    if total > max_batch_tokens:
        raise RequestTooLargeError(f"request carries {total} tokens, more than max_batch_tokens={max_batch_tokens}")


def _check_token_range(tokens: np.ndarray, vocab_size: int, what: str) -> None:
    if not np.issubdtype(tokens.dtype, np.integer):
        raise UserError(f"{what} must hold integer token ids, got {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise UserError(f"{what} has token ids outside [0, {vocab_size})")


def pack_pass(requests: list[tuple[str, list[Datum]]], device: torch.device) -> PassBatch:
    """Pad every request's validated datums (see `validate_data`) into one batch."""
    data = [datum for _, request in requests for datum in request]
    k_max = max(_candidates(d) for d in data)
    B, T = len(data), max(int(d.tokens.shape[0]) for d in data)
    tokens = np.zeros((B, T), dtype=np.int64)
    targets = np.zeros((B, T, k_max), dtype=np.int64)
    mask = np.zeros((B, T), dtype=bool)
    for row, datum in enumerate(data):
        n, start, k = int(datum.tokens.shape[0]), datum.loss_from, _candidates(datum)
        tokens[row, :n] = datum.tokens
        targets[row, start:n, :k] = datum.loss_fn_inputs["target_tokens"].reshape(n - start, k)
        mask[row, start:n] = True
    return PassBatch(
        tokens_BT=torch.from_numpy(tokens).to(device),
        targets_BTK=torch.from_numpy(targets).to(device),
        mask_BT=torch.from_numpy(mask).to(device),
        row_keys=[key for key, request in requests for _ in request],
        spans=_spans(requests),
    )


def pack_flat(requests: list[tuple[str, list[Datum]]], device: torch.device) -> FlatBatch:
    """Concatenate every request's validated datums (see `validate_data`) into one sequence."""
    data = [datum for _, request in requests for datum in request]
    k_max = max(_candidates(d) for d in data)
    lengths = [int(d.tokens.shape[0]) for d in data]
    starts = np.cumsum([0, *lengths[:-1]])
    scored = np.concatenate([np.arange(s + d.loss_from, s + n) for s, n, d in zip(starts, lengths, data)])
    targets = np.zeros((len(scored), k_max), dtype=np.int64)
    first = 0
    for datum in data:
        n, k = datum.num_scored, _candidates(datum)
        targets[first : first + n, :k] = datum.loss_fn_inputs["target_tokens"].reshape(n, k)
        first += n
    return FlatBatch(
        tokens_1N=torch.from_numpy(np.concatenate([d.tokens for d in data]).astype(np.int64)[None]).to(device),
        positions_1N=torch.from_numpy(np.concatenate([np.arange(n) for n in lengths])[None]).to(device),
        row_lengths=lengths,
        scored_S=torch.from_numpy(scored).to(device),
        targets_SK=torch.from_numpy(targets).to(device),
        row_keys=[key for key, request in requests for _ in request],
        spans=_spans(requests),
    )


def _spans(requests: list[tuple[str, list[Datum]]]) -> list[RequestSpan]:
    spans, first = [], 0
    for _, request in requests:
        lengths = [d.num_scored for d in request]
        k = _candidates(request[0])
        spans.append(RequestSpan(first, lengths, k, request[0].loss_fn_inputs["target_tokens"].ndim == 2))
        first += sum(lengths)
    return spans


def _candidates(datum: Datum) -> int:
    targets = datum.loss_fn_inputs["target_tokens"]
    return int(targets.shape[1]) if targets.ndim == 2 else 1


def loss_inputs(data: list[Datum], spec: LossSpec, device: torch.device) -> dict[str, torch.Tensor]:
    """The request's loss inputs as its spec takes them (see `LossSpec.inputs_of`)."""
    return spec.inputs_of(data, device)


def request_logprobs(span: RequestSpan, flat_NK: torch.Tensor) -> torch.Tensor:
    """The request's scored positions (of `values_BTK[mask_BT]`, or a packed pass's `values_SK`) in
    datum order: [sum N], or [sum N, K] for top-K targets."""
    flat = flat_NK[span.first : span.first + span.num_tokens, : span.k]
    return flat if span.topk else flat[:, 0]


def request_result(span: RequestSpan, logprobs: torch.Tensor, out: LossOutput) -> ForwardBackwardResult:
    """A request's answer from its part of a pass: per-datum log-probs, `loss:sum` and its loss's metrics."""
    return ForwardBackwardResult(
        loss_fn_outputs=[{"logprobs": lp} for lp in split_by_datum(span, logprobs)],
        metrics={"loss:sum": float(out.loss.detach()), **out.metrics},
    )


def split_by_datum(span: RequestSpan, flat: torch.Tensor) -> list[np.ndarray]:
    return [t.numpy() for t in torch.split(flat.detach().to("cpu", torch.float32), span.lengths)]
