"""Futures: request_id -> the Ray ref of the actor call that computes it.

- `FutureStore` (a one-replica Serve deployment) holds every live request's ref, so any ingress
  replica can answer `retrieve_future`; holding the ref keeps the result alive for `ttl_s`,
  also after a first fetch (a client whose connection dropped polls again).
- `Futures` is the ingress side: a local cache of the refs this replica created (no store hop
  when the same replica is polled) and the long-poll wait.
- A request can also be failed before any actor call (e.g. a datum that does not decode):
  its entry then holds the `{error, category}` body instead of a ref.
- NOTE: the ingress answers a submission without waiting for the store's `put`; a `get` that
  arrives first waits for it, up to `put_grace_s` after the id was minted (ids carry their
  mint time, so an expired or foreign id is answered at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from actors import ids
from actors.work import ANONYMOUS
from configs.errors import NotFoundError
from deployments.errors import error_response

logger = logging.getLogger(__name__)


Failure = tuple[int, dict[str, str]]  # (HTTP status, {"error", "category"}), from error_response


@dataclass
class FutureEntry:
    """One request's future: the Ray ref of the call computing it, or a failure decided at submission."""

    kind: str  # the Tinker verb that made it; decides the result's wire encoding
    tenant: str = ANONYMOUS  # the owner: only this tenant may retrieve it
    refs: list[ray.ObjectRef] | None = None  # [ref]: a list, so Ray passes the ref, not its value
    failure: Failure | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # what the result's encoding needs to know
    created: float = field(default_factory=time.monotonic)


class _TtlTable:
    """A dict whose entries disappear `ttl_s` after they were added."""

    def __init__(self, ttl_s: float, clock: Callable[[], float]):
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, FutureEntry] = {}
        self._next_sweep = 0.0

    def put(self, request_id: str, entry: FutureEntry) -> None:
        entry.created = self._clock()
        self._entries[request_id] = entry
        self._sweep()

    def get(self, request_id: str) -> FutureEntry | None:
        self._sweep()
        return self._entries.get(request_id)

    def __len__(self) -> int:
        return len(self._entries)

    def _sweep(self) -> None:
        now = self._clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(1.0, self._ttl_s / 4)
        expired = [rid for rid, e in self._entries.items() if now - e.created >= self._ttl_s]
        for rid in expired:
            del self._entries[rid]


class FutureStore:
    """The shared table of live futures (one replica): request id -> entry, for `ttl_s` after it
    was added. A `get` for a freshly minted id waits briefly for its `put` to arrive."""

    def __init__(self, ttl_s: float, put_grace_s: float = 10.0, clock: Callable[[], float] = time.time):
        self._table = _TtlTable(ttl_s, clock)
        self._clock = clock  # wall-clock seconds: request ids carry their mint time in it
        self._put_grace_s = put_grace_s
        self._arrivals: dict[str, asyncio.Event] = {}

    async def put(self, request_id: str, entry: FutureEntry) -> None:
        self._table.put(request_id, entry)
        event = self._arrivals.pop(request_id, None)
        if event is not None:
            event.set()

    async def get(self, request_id: str) -> FutureEntry | None:
        entry = self._table.get(request_id)
        minted = ids.request_minted_at(request_id)
        if entry is not None or minted is None:
            return entry
        wait_s = minted + self._put_grace_s - self._clock()
        if wait_s <= 0:
            return None
        event = self._arrivals.setdefault(request_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), wait_s)
        except TimeoutError:
            self._arrivals.pop(request_id, None)
            return None
        return self._table.get(request_id)

    async def size(self) -> int:
        return len(self._table)


class Futures:
    """The ingress replica's view of the futures: local cache first, then the shared store."""

    def __init__(self, store: Any, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self._store = store  # DeploymentHandle of FutureStore
        self._local = _TtlTable(ttl_s, clock)
        self._puts: set[asyncio.Task] = set()  # in flight; referenced so they are not collected

    def add(self, request_id: str, entry: FutureEntry) -> None:
        self._local.put(request_id, entry)
        task = asyncio.get_running_loop().create_task(self._put(request_id, entry))
        self._puts.add(task)
        task.add_done_callback(self._puts.discard)

    async def _put(self, request_id: str, entry: FutureEntry) -> None:
        try:
            await self._store.put.remote(request_id, entry)
        except Exception:  # the local copy still answers this replica's polls
            logger.exception("could not share future %s with the other ingress replicas", request_id)

    async def submit(self, kind: str, tenant: str, response: Any, **meta: Any) -> str:
        """A new request id, owned by `tenant`, for a model deployment call (a DeploymentResponse)."""
        ref = await response._to_object_ref()
        request_id = ids.new_request_id()
        self.add(request_id, FutureEntry(kind=kind, tenant=tenant, refs=[ref], meta=meta))
        return request_id

    def fail(self, kind: str, tenant: str, error: BaseException) -> str:
        """A new request id, owned by `tenant`, whose future has already failed with `error`."""
        request_id = ids.new_request_id()
        self.add(request_id, FutureEntry(kind=kind, tenant=tenant, failure=error_response(error)))
        return request_id

    async def find(self, request_id: str, tenant: str) -> FutureEntry:
        """The entry, if `tenant` owns it; another tenant's id is as unknown as an expired one."""
        ids.check_id(request_id, "request_id")
        entry = self._local.get(request_id)
        if entry is None:
            entry = await self._store.get.remote(request_id)
        if entry is None or entry.tenant != tenant:
            raise NotFoundError(f"unknown or expired request_id {request_id!r}")
        return entry

    async def poll(
        self, request_id: str, tenant: str, timeout_s: float
    ) -> tuple[bool, Any, Failure | None, FutureEntry]:
        """(done, value, failure, entry): the long-poll behind retrieve_future."""
        entry = await self.find(request_id, tenant)
        return (*await poll_entry(entry, timeout_s), entry)


async def poll_entry(entry: FutureEntry, timeout_s: float) -> tuple[bool, Any, Failure | None]:
    """(done, value, failure) after waiting at most timeout_s for the entry's result."""
    if entry.failure is not None:
        return True, None, entry.failure
    done, value, error = await wait_ref(entry.refs[0], timeout_s)
    if error is not None:
        return True, None, error_response(error)
    return done, value, None


async def wait_ref(ref: ray.ObjectRef, timeout_s: float) -> tuple[bool, Any, BaseException | None]:
    """(done, value, error) after waiting at most timeout_s for the ref."""
    future = asyncio.wrap_future(ref.future())
    done, _ = await asyncio.wait({future}, timeout=timeout_s)
    if not done:  # NOTE: not cancelled: the ref's completion callback still owns the future
        return False, None, None
    error = future.exception()
    return True, (None if error else future.result()), error
