"""Releases each training model's requests in seq_id order, and never stalls on a gap for long.

- The SDK numbers a training client's requests 1, 2, 3, ... (create_model is 0) and submits
  them in order, except that the chunks of one large forward_backward are posted concurrently,
  the first one last: holding later seq ids until the earlier ones arrive restores the order.
- A seq id may never arrive (a submission rejected with a 4xx is not re-sent): the ingress
  reports such holes with `skip`, and any other gap is given up after `gap_timeout_s`.
- Requests without a seq id, and late ones (below the expected id), are released at once.
- Pure bookkeeping, no asyncio: the model actor feeds it and runs what it releases.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
_SKIPPED = object()


@dataclass
class _Stream(Generic[Item]):
    next_seq: int
    waiting: dict[int, object] = field(default_factory=dict)
    gap_since: float | None = None


class Sequencer(Generic[Item]):
    def __init__(self, gap_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self._gap_timeout_s = gap_timeout_s
        self._clock = clock
        self._streams: dict[str, _Stream] = {}

    def submit(self, model_id: str, seq_id: int | None, item: Item) -> list[Item]:
        """The items that may run now, in order (possibly none, possibly several)."""
        if seq_id is None:
            return [item]
        stream = self._streams.setdefault(model_id, _Stream(next_seq=seq_id))
        if seq_id < stream.next_seq:
            return [item]
        stream.waiting[seq_id] = item
        return self._drain(stream)

    def skip(self, model_id: str, seq_id: int) -> list[Item]:
        """`seq_id` will never arrive; stop waiting for it."""
        stream = self._streams.get(model_id)
        if stream is None or seq_id < stream.next_seq:
            return []
        stream.waiting[seq_id] = _SKIPPED
        return self._drain(stream)

    def forget(self, model_id: str) -> list[Item]:
        """Drop a model's stream; whatever still waits is released (it will fail on its own)."""
        stream = self._streams.pop(model_id, None)
        if stream is None:
            return []
        return [item for _, item in sorted(stream.waiting.items()) if item is not _SKIPPED]

    def expire(self) -> list[Item]:
        """Give up on gaps older than the timeout; returns what that releases."""
        now = self._clock()
        released: list[Item] = []
        for stream in self._streams.values():
            if stream.gap_since is not None and now - stream.gap_since >= self._gap_timeout_s:
                stream.next_seq = min(stream.waiting)
                released.extend(self._drain(stream))
        return released

    def next_deadline(self) -> float | None:
        """Clock time at which `expire` will next release something, if anything waits."""
        starts = [s.gap_since for s in self._streams.values() if s.gap_since is not None]
        return min(starts) + self._gap_timeout_s if starts else None

    def _drain(self, stream: _Stream) -> list[Item]:
        released = []
        while stream.next_seq in stream.waiting:
            item = stream.waiting.pop(stream.next_seq)
            stream.next_seq += 1
            if item is not _SKIPPED:
                released.append(item)
        if not stream.waiting:
            stream.gap_since = None
        elif stream.gap_since is None or released:
            stream.gap_since = self._clock()
        return released
