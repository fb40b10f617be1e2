"""A model deployment's side of the futures: the outcome of every request it ran, by request id.

- A verb decorated with `@tracked` takes a `request_id` keyword; its outcome (the value, or the
  exception it raised) is kept here for the futures' TTL and written to the futures' records in
  the metadata database, so any ingress replica can answer it, also after the replica that took
  the request is gone.
- `wait` is the long-poll behind `retrieve_future` while the work is still running.
- NOTE: the database write runs in a worker thread; the answer never waits for it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from actors.background import BackgroundWrites
from actors.metadata.futures import FutureRecords
from actors.metadata.tables import utc_now

# The request id of the verb running in this task (set by `tracked` and by a restart's replays).
CURRENT_REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("thinker_request", default=None)


class Outcomes:
    def __init__(self, records: FutureRecords, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self._records = records
        self._ttl_s = ttl_s
        self._clock = clock
        self._futures: OrderedDict[str, tuple[float, asyncio.Future]] = OrderedDict()  # oldest first
        self._writes = BackgroundWrites("a request's outcome")
        self.started_at = utc_now()  # a request recorded before this and unknown here was lost
        self.pending = 0  # requests running now (the pending-futures gauge)

    async def track(self, request_id: str | None, work: Awaitable[Any]) -> Any:
        """Run `work`; with a request id, keep and record its outcome."""
        if request_id is None:
            return await work
        existing = self._futures.get(request_id)
        if existing is not None:  # delivered twice (a restart's replay and Serve's own retry): it runs once
            if asyncio.iscoroutine(work):
                work.close()
            return await asyncio.shield(existing[1])
        future = self._future(request_id)
        self.pending += 1
        try:
            value = await work
        except Exception as exc:
            self._settle(request_id, future, exc)
            raise
        finally:
            self.pending -= 1
        self._settle(request_id, future, value)
        return value

    def running(self, request_id: str) -> bool:
        """Whether this deployment is running the request now."""
        entry = self._futures.get(request_id)
        return entry is not None and not entry[1].done()

    async def wait(self, request_id: str, timeout_s: float) -> tuple[str, Any]:
        """("done", value), ("failed", exception), ("pending", None) after timeout_s, or
        ("unknown", when this deployment started) for a request it has not seen (yet)."""
        entry = self._futures.get(request_id)
        if entry is None:
            return "unknown", self.started_at
        future = entry[1]
        try:
            value = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            return "pending", None
        except Exception as exc:
            return "failed", exc
        return "done", value

    def _future(self, request_id: str) -> asyncio.Future:
        now = self._clock()
        while self._futures and now - next(iter(self._futures.values()))[0] > self._ttl_s:
            self._futures.popitem(last=False)
        if request_id not in self._futures:
            self._futures[request_id] = (now, asyncio.get_running_loop().create_future())
        return self._futures[request_id][1]

    def _settle(self, request_id: str, future: asyncio.Future, outcome: Any) -> None:
        if not future.done():
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
                future.exception()  # retrieved here: a future nobody polls must not warn
            else:
                future.set_result(outcome)
        self._writes.start(self._records.finish, request_id, outcome)


def tracked(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Give a model-actor verb a `request_id` keyword whose outcome `self._outcomes` keeps."""

    @functools.wraps(method)
    async def verb(self, *args: Any, request_id: str | None = None, **kwargs: Any) -> Any:
        await self._ready()  # a restarted deployment first brings its training models back
        token = CURRENT_REQUEST.set(request_id)
        try:
            return await self._outcomes.track(request_id, method(self, *args, **kwargs))
        finally:
            CURRENT_REQUEST.reset(token)

    return verb
