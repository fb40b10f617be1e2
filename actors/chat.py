"""Chat messages -> tokens with the base model's own chat template (the simple JSON routes).

- `prompt_tokens` renders a conversation plus the assistant generation prompt.
- `chat_datum` builds a training datum:
  * cross_entropy: the whole conversation; weight 1 on every assistant reply (its content and
    end-of-turn token), 0 elsewhere; the scored positions start at the first reply.
  * other losses: the conversation up to its last assistant reply is the prompt; the reply is
    `target_tokens` (given, or the reply as rendered) and the per-token inputs (`logprobs`,
    `advantages`, ...) cover exactly those tokens.
- Reply spans come from rendering growing prefixes of the conversation, so they follow any
  template whose renderings of a prefix are a prefix of the whole (ChatML and its kin).
"""

from __future__ import annotations

import math

import numpy as np

from actors.work import Datum
from configs.errors import UserError

Messages = list[dict[str, str]]


def _render(tokenizer, messages: Messages, generation_prompt: bool) -> list[int]:
    if tokenizer is None:
        raise UserError("this base model has no tokenizer, so it cannot take chat messages; send token ids")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError("each message needs a 'role' and a 'content'")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_tokens(tokenizer, messages: Messages) -> np.ndarray:
    if not messages:
        raise UserError("messages must not be empty")
    return np.asarray(_render(tokenizer, messages, generation_prompt=True), dtype=np.int64)


def _reply_spans(tokenizer, messages: Messages) -> tuple[list[int], list[tuple[int, int]]]:
    """All tokens, and the [start, end) token span of each assistant reply."""
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True)) if i else 0
        end = len(_render(tokenizer, messages[: i + 1], generation_prompt=False))
        spans.append((start, _through_end_of_turn(tokenizer, full, start, end)))
    return full, spans


def _through_end_of_turn(tokenizer, tokens: list[int], start: int, end: int) -> int:
    """Cut a reply span after its end-of-turn token (the template's trailing newline is not trained)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    for position in range(start, end):
        if tokens[position] == eos:
            return position + 1
    return end


def chat_datum(tokenizer, messages: Messages, loss_fn: str, inputs: dict[str, np.ndarray]) -> Datum:
    if loss_fn == "cross_entropy" and "target_tokens" not in inputs:
        return _supervised_datum(tokenizer, messages)
    if not messages or messages[-1]["role"] != "assistant":
        raise UserError(f"{loss_fn} on chat data needs the conversation to end with the assistant reply")
    prompt = _render(tokenizer, messages[:-1], generation_prompt=True)
    if "target_tokens" in inputs:
        reply = [int(t) for t in inputs["target_tokens"]]
    else:
        full, spans = _reply_spans(tokenizer, messages)
        reply = full[spans[-1][0] : spans[-1][1]]
    sequence = np.asarray(prompt + reply, dtype=np.int64)
    scored = {**inputs, "target_tokens": np.asarray(reply, dtype=np.int64)}
    return Datum(tokens=sequence[:-1], loss_fn_inputs=scored, loss_from=len(prompt) - 1)


def _supervised_datum(tokenizer, messages: Messages) -> Datum:
    full, spans = _reply_spans(tokenizer, messages)
    if not spans:
        raise UserError("cross_entropy on chat data needs at least one assistant message to learn")
    weights = np.zeros(len(full), dtype=np.float32)
    for start, end in spans:
        weights[start:end] = 1.0
    first = max(spans[0][0] - 1, 0)  # the position that predicts the first reply token
    tokens = np.asarray(full, dtype=np.int64)
    return Datum(
        tokens=tokens[:-1],
        loss_fn_inputs={"target_tokens": tokens[first + 1 :], "weights": weights[first + 1 :]},
        loss_from=first,
    )


def likelihood_metrics(data: list[Datum], logprobs: list[np.ndarray]) -> dict[str, float]:
    """mean_nll and perplexity over the trained tokens (weighted by cross_entropy weights if any)."""
    total, count = 0.0, 0.0
    for datum, lp in zip(data, logprobs):
        lp = lp.astype(np.float64)
        weights = datum.loss_fn_inputs.get("weights", np.ones_like(lp))
        total -= float((weights * lp).sum())
        count += float(weights.sum())
    mean_nll = total / count if count else 0.0
    return {"mean_nll:mean": mean_nll, "perplexity:mean": math.exp(min(mean_nll, 700.0)), "num_tokens:sum": count}
