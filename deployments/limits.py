"""Per-request limits, checked at the ingress before any work is queued.

- Each check raises LimitExceededError (a 400 naming the limit and its value, never 429); the
  routes turn a failure on a sequenced request into a failed future that frees its seq_id.
- Token limits come from the base model (`max_seq_len` per datum, `max_batch_tokens` per
  request); the rest from the config's `limits` (`RequestLimits`).
- Cheap checks come first, so an oversized request is refused before it is decoded further.
"""

from __future__ import annotations

import json
from typing import Any

from actors.work import ForwardBackwardWork, ModelDescription
from configs.errors import LimitExceededError
from configs.schema import RequestLimits


class Limits:
    def __init__(self, limits: RequestLimits):
        self.config = limits

    def check_count(self, what: str, count: int, limit: int, name: str) -> None:
        if count > limit:
            raise LimitExceededError(f"{what}: {count} is over the limit of {limit} ({name})")

    def check_forward_backward(self, work: ForwardBackwardWork, model: ModelDescription) -> None:
        if not work.data:
            raise LimitExceededError("forward_backward needs at least one datum")
        self.check_count("datums in the request", len(work.data), self.config.max_datums, "limits.max_datums")
        total = 0
        for i, datum in enumerate(work.data):
            n = int(datum.tokens.shape[0])
            self.check_count(f"datum {i}: tokens", n, model.max_seq_len, "the model's max_seq_len")
            total += n
        self.check_count("tokens in the request", total, model.max_batch_tokens, "the model's max_batch_tokens")

    def check_sample(
        self,
        num_samples: int,
        max_tokens: int | None,
        prompt_tokens: int,
        topk: int,
        stops: int,
        model: ModelDescription,
    ) -> None:
        self.check_count("num_samples", num_samples, self.config.max_num_samples, "limits.max_num_samples")
        if max_tokens is not None:
            self.check_count("max_tokens", max_tokens, self.config.max_sample_tokens, "limits.max_sample_tokens")
        self.check_count("prompt tokens", prompt_tokens, model.max_seq_len - 1, "the model's max_seq_len - 1")
        self.check_count("topk_prompt_logprobs", topk, self.config.max_topk, "limits.max_topk")
        self.check_count("stop sequences", stops, self.config.max_stop_sequences, "limits.max_stop_sequences")

    def check_messages(self, count: int) -> None:
        self.check_count("chat messages", count, self.config.max_chat_messages, "limits.max_chat_messages")

    def check_metadata(self, what: str, value: Any) -> None:
        size = len(json.dumps(value, default=str)) if value else 0
        self.check_count(f"{what} (bytes of JSON)", size, self.config.max_metadata_bytes, "limits.max_metadata_bytes")
