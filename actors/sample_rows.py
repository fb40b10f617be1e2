"""From a sampling request to generation rows: validation, defaults and per-sample generators.

- A row stops at its stop tokens, its stop strings, and EOS unless `stop_at_eos` is off
  (Tinker's `stop=[]`: decode until max_tokens).
- Each of a request's samples gets its own generator, seeded from (seed, sample index), so the
  same seed gives the same output, however the request is batched.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from actors.generation import CANCELLED, GenRow
from actors.work import SampleWork
from configs.errors import UserError

MAX_TOPK_PROMPT_LOGPROBS = 64


@dataclass(frozen=True)
class SampleLimits:
    vocab_size: int
    max_seq_len: int
    default_max_tokens: int
    max_rows: int
    eos_ids: frozenset[int]
    can_decode: bool
    device: torch.device
    cancelled: Callable[[str], bool] | None = None  # request id -> whether its client cancelled it


def to_rows(work: SampleWork, key: str, limits: SampleLimits) -> list[GenRow]:
    cancelled = None
    if work.request_id is not None and limits.cancelled is not None:
        request_id, check = work.request_id, limits.cancelled
        if check(request_id):
            raise UserError(CANCELLED)
        cancelled = lambda: check(request_id)  # noqa: E731
    _check_prompt(work.prompt, limits)
    params = work.params
    if not 1 <= work.num_samples <= limits.max_rows:
        raise UserError(f"num_samples must be between 1 and {limits.max_rows}, got {work.num_samples}")
    finite = math.isfinite(params.temperature) and math.isfinite(params.top_p)
    if not finite or params.temperature < 0 or not 0 < params.top_p <= 1 or (params.top_k < 1 and params.top_k != -1):
        raise UserError("sampling needs a finite temperature >= 0, 0 < top_p <= 1 and top_k = -1 or >= 1")
    if params.max_tokens is not None and params.max_tokens < 1:
        raise UserError(f"max_tokens must be at least 1, got {params.max_tokens}")
    if params.stop_strings and not limits.can_decode:
        raise UserError("stop strings need a tokenizer, and this base model has none; use stop token ids")
    if params.stop_tokens and any(not 0 <= t < limits.vocab_size for t in params.stop_tokens):
        raise UserError(f"stop token ids must be in [0, {limits.vocab_size})")
    if not 0 <= work.topk_prompt_logprobs <= MAX_TOPK_PROMPT_LOGPROBS:
        raise UserError(f"topk_prompt_logprobs must be between 0 and {MAX_TOPK_PROMPT_LOGPROBS}")
    if work.target_prompt_ids is not None:
        _check_target_prompt(work.target_prompt_ids, len(work.prompt), limits.vocab_size)
    room = limits.max_seq_len - len(work.prompt)
    max_tokens = min(params.max_tokens or limits.default_max_tokens, room)
    stops = frozenset(params.stop_tokens) | (limits.eos_ids if params.stop_at_eos else frozenset())
    seed = params.seed if params.seed is not None else secrets.randbits(62)
    return [
        GenRow(
            key=key,
            prompt=work.prompt,
            params=params,
            max_tokens=max_tokens,
            stop_tokens=stops,
            generator=torch.Generator(device=limits.device).manual_seed((seed * 1_000_003 + i) % 2**63),
            prompt_logprobs=work.prompt_logprobs and i == 0,
            topk_prompt=work.topk_prompt_logprobs if i == 0 else 0,
            target_prompt=work.target_prompt_ids if i == 0 else None,
            cancelled=cancelled,
        )
        for i in range(work.num_samples)
    ]


def _check_target_prompt(ids: np.ndarray, prompt_length: int, vocab_size: int) -> None:
    if ids.ndim != 2 or ids.shape[0] != prompt_length - 1 or ids.shape[1] < 1:
        raise UserError(
            f"target_prompt_logprobs must have shape [len(prompt) - 1, K] = [{prompt_length - 1}, K >= 1], "
            f"got {list(ids.shape)}"
        )
    if ids.size and (ids.min() < -1 or ids.max() >= vocab_size):
        raise UserError(f"target_prompt_logprobs token ids must be in [0, {vocab_size}) (or -1 for none)")
    if not np.any(ids >= 0):
        raise UserError("target_prompt_logprobs asks for no token id (every cell is -1)")


def _check_prompt(prompt: np.ndarray, limits: SampleLimits) -> None:
    if prompt.ndim != 1 or prompt.size == 0:
        raise UserError("the prompt must be a non-empty list of tokens")
    if not np.issubdtype(prompt.dtype, np.integer) or prompt.min() < 0 or prompt.max() >= limits.vocab_size:
        raise UserError(f"prompt token ids must be integers in [0, {limits.vocab_size})")
    if len(prompt) >= limits.max_seq_len:
        raise UserError(f"the prompt has {len(prompt)} tokens; this model holds at most {limits.max_seq_len - 1}")
