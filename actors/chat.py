"""Chat messages -> tokens with the base model's own chat template (the simple JSON routes).

- `prompt_tokens` renders a conversation plus the assistant generation prompt.
- `chat_datum` builds a training datum:
  * cross_entropy: the whole conversation; weight 1 on every assistant reply (its content and
    end-of-turn token), 0 elsewhere; the scored positions start at the first reply.
  * other losses: the conversation up to its last assistant reply is the prompt; the reply is
    `target_tokens` (given, or the reply as rendered) and the per-token inputs (`logprobs`,
    `advantages`, ...) cover exactly those tokens.
- Reply spans are found in one rendering (linear in the conversation): the template is rendered
  once with each message's content replaced by a marker, which shows where every content starts
  and ends; the real rendering is tokenized once, with character offsets, to turn those places
  into token positions. A template that changes the text around contents (so the marked
  rendering does not line up with the real one) falls back to rendering growing prefixes, which
  follows any template whose renderings of a prefix are a prefix of the whole.
"""

from __future__ import annotations

import bisect
import math
import secrets

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
    found = _reply_spans_in_one_rendering(tokenizer, messages)
    return found if found is not None else _reply_spans_by_prefixes(tokenizer, messages)


def _reply_spans_in_one_rendering(tokenizer, messages: Messages) -> tuple[list[int], list[tuple[int, int]]] | None:
    """The linear way; None when the template or tokenizer does not allow it."""
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        return None
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m or not isinstance(m["content"], str):
            return None
    nonce = secrets.token_hex(8)
    markers = [f"@@{nonce}:{i}@@" for i in range(len(messages))]
    marked = [{**m, "content": marker} for m, marker in zip(messages, markers)]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    template = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=False)
    contents, position = [], 0  # (start, end) of each message's content in `text`
    rebuilt = []
    for marker, message in zip(markers, messages):
        at = template.find(marker, position)
        if at < 0:
            return None
        rebuilt.append(template[position:at])
        start = sum(len(piece) for piece in rebuilt)
        rebuilt.append(message["content"])
        contents.append((start, start + len(message["content"])))
        position = at + len(marker)
    rebuilt.append(template[position:])
    if "".join(rebuilt) != text:
        return None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    tokens, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    token_starts = [start for start, _ in offsets]
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = bisect.bisect_left(token_starts, contents[i][0])
        content_end = bisect.bisect_left(token_starts, contents[i][1])
        following = bisect.bisect_left(token_starts, contents[i + 1][0] if i + 1 < len(messages) else len(text))
        eos = getattr(tokenizer, "eos_token_id", None)  # the reply runs through its end-of-turn token
        end = next((p + 1 for p in range(content_end, following) if tokens[p] == eos), content_end)
        spans.append((start, end))
    return tokens, spans


def _reply_spans_by_prefixes(tokenizer, messages: Messages) -> tuple[list[int], list[tuple[int, int]]]:
    """Quadratic in the number of messages (each reply renders its prefix); for odd templates."""
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
