"""Writes the model actor does not wait for: usage counts, outcomes, durable snapshots.

Each runs in a worker thread (off the event loop and the compute thread); the answer to the
request does not wait for it, and a write that fails is logged, never the request's failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

logger = logging.getLogger(__name__)


class BackgroundWrites:
    def __init__(self, what: str, executor: Executor | None = None):
        self._what = what  # for the log: "usage", "a request's outcome", ...
        self._executor = executor  # None: the event loop's default thread pool
        self._in_flight: set[asyncio.Future] = set()  # referenced so they are not collected

    def start(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Start the write; its future (to wait for it with `asyncio.wait`, which does not raise)."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        self._in_flight.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: asyncio.Future) -> None:
        self._in_flight.discard(future)
        if not future.cancelled() and future.exception() is not None:
            logger.error("could not write %s", self._what, exc_info=future.exception())
