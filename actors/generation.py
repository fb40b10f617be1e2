"""Sampling a token for each row, and the static batch: many requests, each with its own adapter,
in one decode loop that ends with its longest row (`actors.decoding` is the continuous one).

- `sample_step` samples every row at once (temperature, then top-k / top-p where asked, then the
  inverse CDF at one uniform draw from the row's own generator), so a row's tokens depend on its
  seed, never on its batch-mates.
- Prompts are left-padded into one batch (attention mask + explicit positions); each row is
  routed to its adapter through the LoRA layers, so requests for different adapters decode
  together.
- Each row keeps its own sampling parameters and random generator (same seed, same output).
- Reported logprobs are the model's own log-softmax at the sampled token, before temperature
  and truncation (as vLLM reports by default): on-policy they equal the learner's logprobs.
- Stop tokens and stop strings are part of the returned tokens; in the static batch a finished
  row keeps its slot (fed padding) until every row is done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from actors.lora import Routing
from actors.work import SampledSequence, SampleResult, SamplingParams
from configs.errors import ThinkerError, UserError

TOPK_SENTINEL = (0, -99999.0)  # an empty top-k slot, as the Tinker wire expects


@dataclass
class GenRow:
    key: str  # LoRA routing key ("" = the base model)
    prompt: np.ndarray  # int64 [L]
    params: SamplingParams
    max_tokens: int
    stop_tokens: frozenset[int]
    generator: torch.Generator
    prompt_logprobs: bool = False
    topk_prompt: int = 0
    target_prompt: np.ndarray | None = None  # int64 [L - 1, K]: ids to score at positions 1..L-1 (-1: none)
    cancelled: Callable[[], bool] | None = None  # its client gave up on it: stop sampling it


@dataclass
class GenOutput:
    sequence: SampledSequence
    prompt_logprobs: np.ndarray | None = None
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    target_logprobs: np.ndarray | None = None  # float32 [L - 1, K] for target_prompt (0 where -1)
    error: ThinkerError | None = None  # this row could not be sampled (its request fails; the others go on)


@dataclass
class RowState:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None
    error: ThinkerError | None = None


@torch.no_grad()
def generate(model, routing: Routing, rows: list[GenRow], decode=None) -> list[GenOutput]:
    """Sample every row; `decode(tokens) -> str` is needed only for rows with stop strings."""
    device = next(model.parameters()).device
    ids, mask, positions = left_padded([r.prompt for r in rows], device)
    width = ids.shape[1]
    routing.set([row.key for row in rows])
    cache = DynamicCache()
    want_prompt = any(scores_prompt(r) for r in rows)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=0 if want_prompt else 1,
    )
    prompt_outputs = [prompt_scores(out.logits[i], row, width - len(row.prompt)) for i, row in enumerate(rows)]
    states = [RowState() for _ in rows]
    logits = out.logits[:, -1, :].float()
    for _ in range(max(r.max_tokens for r in rows)):
        sample_step(logits, rows, states, decode)
        if all(s.stop_reason is not None for s in states):
            break
        step_ids = torch.tensor(
            [[s.tokens[-1] if s.stop_reason is None and s.tokens else 0] for s in states], device=device
        )
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        logits = out.logits[:, -1, :].float()
    return [finish(state, prompt) for state, prompt in zip(states, prompt_outputs)]


def left_padded(prompts: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts as one batch, right-aligned: (ids, attention mask, positions), each [prompts, longest];
    positions count from each prompt's first token."""
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - lengths[i] :] = torch.from_numpy(np.array(prompt, dtype=np.int64))
        mask[i, width - lengths[i] :] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def sample_step(logits_BV: torch.Tensor, rows: list[GenRow], states: list[RowState], decode) -> None:
    """One token for every row still sampling; a row that cannot be sampled stops with its error."""
    logprobs_BV = torch.log_softmax(logits_BV, dim=-1)
    finite = torch.isfinite(logits_BV).all(-1).tolist()
    active = []
    for i, (row, state) in enumerate(zip(rows, states)):
        if state.stop_reason is not None:
            continue
        if row.cancelled is not None and row.cancelled():  # the row stops; the batch goes on without it
            state.error, state.stop_reason = UserError(CANCELLED), "error"
        elif not finite[i]:  # the adapter's weights diverged: the user's to fix
            state.error = UserError(
                "sampling failed: the model's next-token logits are not finite (NaN or inf): this adapter's "
                "weights have diverged (e.g. too large a learning rate); sample an earlier checkpoint"
            )
            state.stop_reason = "error"
        else:
            active.append(i)
    if not active:
        return
    tokens = _choose(logits_BV[active], [rows[i].params for i in active], [rows[i].generator for i in active])
    chosen = [(i, t) for i, t in zip(active, tokens) if t >= 0]
    logprobs = logprobs_BV[[i for i, _ in chosen], [t for _, t in chosen]].tolist() if chosen else []
    for i, token in zip(active, tokens):
        row, state = rows[i], states[i]
        if token < 0:  # no finite probability left: this row alone stops
            # finite logits so large that dividing by the temperature overflows: a diverged adapter
            state.error = UserError(
                f"sampling failed: the next-token logits are too large for temperature {row.params.temperature} "
                "(this adapter's weights may have diverged; sample an earlier checkpoint or a higher temperature)"
            )
            state.stop_reason = "error"
            continue
        state.tokens.append(token)
        state.logprobs.append(logprobs.pop(0))
        if token in row.stop_tokens or _hit_stop_string(state.tokens, row.params.stop_strings, decode):
            state.stop_reason = "stop"
        elif len(state.tokens) >= row.max_tokens:
            state.stop_reason = "length"


CANCELLED = "this sample was cancelled by its client (cancel_future)"
GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (dividing by them overflows)


def _choose(logits_AV: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """A token per row (-1: the row has no finite distribution), all rows at once: temperature,
    then top-k and top-p for the rows that ask, then inverse-CDF sampling with one uniform draw
    from each row's own generator (so a row's tokens do not depend on its batch-mates)."""
    greedy = [p.temperature < GREEDY_BELOW for p in params]
    temperature = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], device=logits_AV.device)
    scaled = logits_AV / temperature[:, None]
    for i, p in enumerate(params):
        if not greedy[i] and (0 < p.top_k < scaled.shape[-1] or p.top_p < 1.0):
            scaled[i] = _truncated(scaled[i], p)
    probs = torch.softmax(scaled, dim=-1)
    cdf = probs.cumsum(-1)
    valid = (torch.isfinite(probs).all(-1) & (cdf[:, -1] > 0)).tolist()
    draws = [torch.rand((), generator=gen, device=gen.device) if not g else None for gen, g in zip(generators, greedy)]
    u = torch.stack([d if d is not None else torch.zeros((), device=cdf.device) for d in draws]).to(cdf.device)
    sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)
    argmax = logits_AV.argmax(-1)
    picked = torch.where(torch.tensor(greedy, device=cdf.device), argmax, sampled).tolist()
    return [t if (valid[i] or greedy[i]) else -1 for i, t in enumerate(picked)]


def _truncated(scaled_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    if 0 < params.top_k < scaled_V.shape[-1]:
        kth = torch.topk(scaled_V, params.top_k).values[-1]
        scaled_V = scaled_V.masked_fill(scaled_V < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled_V, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keeps at least one
        scaled_V = scaled_V.scatter(0, order[drop], float("-inf"))
    return scaled_V


def _hit_stop_string(tokens: list[int], stops: tuple[str, ...], decode) -> bool:
    if not stops:
        return False
    text = decode(tokens)
    return any(stop in text for stop in stops)


def prompt_scores(logits_TV: torch.Tensor, row: GenRow, first: int) -> GenOutput:
    """log p(prompt[i] | prompt[:i]) for the row (NaN at 0) and the top-k alternatives;
    `first` is the position of the row's first prompt token in `logits_TV`."""
    if not scores_prompt(row):
        return GenOutput(sequence=None)
    n = len(row.prompt)
    logprobs_TV = torch.log_softmax(logits_TV[first : first + n - 1].float(), dim=-1)  # predicts 1..n-1
    targets = torch.as_tensor(np.asarray(row.prompt[1:], dtype=np.int64), device=logprobs_TV.device)
    scores = np.full(n, np.nan, dtype=np.float32)
    scores[1:] = logprobs_TV.gather(-1, targets[:, None])[:, 0].cpu().numpy()
    output = GenOutput(sequence=None, prompt_logprobs=scores if row.prompt_logprobs else None)
    if row.topk_prompt:
        k = min(row.topk_prompt, logprobs_TV.shape[-1])
        top = torch.topk(logprobs_TV, k, dim=-1)
        ids = np.full((n, row.topk_prompt), TOPK_SENTINEL[0], dtype=np.int32)
        lps = np.full((n, row.topk_prompt), TOPK_SENTINEL[1], dtype=np.float32)
        ids[1:, :k] = top.indices.cpu().numpy()
        lps[1:, :k] = top.values.cpu().numpy()
        output.topk_ids, output.topk_logprobs = ids, lps
    if row.target_prompt is not None:
        wanted = torch.as_tensor(row.target_prompt, device=logprobs_TV.device)
        picked = logprobs_TV.gather(-1, wanted.clamp(min=0))
        output.target_logprobs = torch.where(wanted >= 0, picked, torch.zeros_like(picked)).cpu().numpy()
    return output


def scores_prompt(row: GenRow) -> bool:
    """Whether the row needs the prefill's logits at every prompt position."""
    return row.prompt_logprobs or bool(row.topk_prompt) or row.target_prompt is not None


def finish(state: RowState, prompt: GenOutput) -> GenOutput:
    prompt.sequence = SampledSequence(
        tokens=np.asarray(state.tokens, dtype=np.int32),
        logprobs=np.asarray(state.logprobs, dtype=np.float32),
        stop_reason=state.stop_reason or "length",
    )
    prompt.error = state.error
    return prompt


def sample_result(outputs: list[GenOutput]) -> SampleResult | ThinkerError:
    """A request's answer from its rows' outputs (the first row carries the prompt's scores), or
    the error of a row that could not be sampled."""
    failed = next((o.error for o in outputs if o.error), None)
    if failed is not None:
        return failed
    return SampleResult(
        sequences=[o.sequence for o in outputs],
        prompt_logprobs=outputs[0].prompt_logprobs,
        topk_prompt_ids=outputs[0].topk_ids,
        topk_prompt_logprobs=outputs[0].topk_logprobs,
        target_prompt_logprobs=outputs[0].target_logprobs,
    )


def generate_uncached(next_logits, rows: list[GenRow], decode=None) -> list[GenOutput]:
    """The same sampling without a KV cache, for backends that run whole sequences each step.

    `next_logits(tokens [rows, T] right-padded, lengths, all_positions)` returns logits at every
    row's last token ([rows, V]), or at every position ([rows, T, V]) when asked.
    """
    lengths = [len(r.prompt) for r in rows]
    sequences = [list(np.asarray(r.prompt, dtype=np.int64)) for r in rows]
    if any(scores_prompt(r) for r in rows):
        logits = next_logits(_right_padded(sequences), lengths, True)
        prompts = [prompt_scores(logits[i], row, 0) for i, row in enumerate(rows)]
    else:
        prompts = [GenOutput(sequence=None) for _ in rows]
    states = [RowState() for _ in rows]
    for _ in range(max(r.max_tokens for r in rows)):
        current = [len(s) for s in sequences]
        sample_step(next_logits(_right_padded(sequences), current, False).float(), rows, states, decode)
        if all(s.stop_reason is not None for s in states):
            break
        for sequence, state in zip(sequences, states):
            if state.stop_reason is None:
                sequence.append(state.tokens[-1])
    return [finish(state, prompt) for state, prompt in zip(states, prompts)]


def _right_padded(sequences: list[list[int]]) -> np.ndarray:
    width = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), width), dtype=np.int64)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = s
    return tokens
