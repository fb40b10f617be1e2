"""Futures, the ingress side: request ids, their records, and the long-poll behind retrieve_future.

- A submission is recorded (owner, kind, the base model whose deployment runs it) before it is
  handed to that deployment, which keeps the outcome and writes it to the record when done. No
  ingress replica holds anything of a request: any replica answers any request id, also after
  the replica that took it was killed.
- `poll` answers from the record once the outcome is in; while the work runs it long-polls the
  deployment that runs it (`wait_result`), up to the timeout.
- A request can be failed before any deployment sees it (e.g. a datum that does not decode): its
  record then holds the exception from the start.
- Another tenant's request id is answered exactly like an unknown or expired one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from actors import ids
from actors.metadata.futures import FutureRecords, LoggedCall, outcome_of
from actors.metadata.tables import utc_now
from configs.errors import ServerError
from deployments.errors import error_response, unwrap

logger = logging.getLogger(__name__)

Failure = tuple[int, dict[str, str]]  # (HTTP status, {"error", "category"}), from error_response
EXPIRY_EVERY_S = 60.0
COMPLETIONS_POLL_S = 0.25  # retrieve_futures looks for new completions at least this often
# A request recorded this long before its deployment (re)started that the deployment does not know
# was lost (it was not in the request log); a younger one may still be on its way there.
LOST_AFTER = timedelta(seconds=2)


@dataclass
class FutureEntry:
    """What encoding a finished future's answer needs: its verb and meta (see encode_result)."""

    kind: str
    meta: dict[str, Any] = field(default_factory=dict)


class Futures:
    def __init__(self, records: FutureRecords, deployments: Callable[[str], Any]):
        self._records = records
        self._deployments = deployments  # base model name -> DeploymentHandle of its model actor
        self._deliveries: set[asyncio.Task] = set()  # calls in flight; referenced so they are not collected
        self._next_expiry = 0.0

    async def submit(
        self,
        kind: str,
        tenant: str,
        base_model: str,
        call: Callable[..., Any],
        logged: LoggedCall | None = None,
        sampling_target: str | None = None,
        **meta: Any,
    ) -> str:
        """Record a new request of `tenant` (with `logged`: in its training model's request log, to be
        run again if the deployment restarts; with `sampling_target`: listed for retrieve_futures),
        then start `call(request_id=...)`; its id, at once."""
        request_id = ids.new_request_id()
        args = (request_id, tenant, kind, base_model, meta, logged, sampling_target)
        await asyncio.to_thread(self._records.add, *args)
        task = asyncio.get_running_loop().create_task(self._deliver(request_id, call(request_id=request_id)))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)
        await self._expire_now_and_then()
        return request_id

    async def record(self, tenant: str, request_id: str):
        """The request's record, if `tenant` owns it (else NotFoundError, like an unknown id)."""
        ids.check_id(request_id, "request_id")
        return await asyncio.to_thread(self._records.get, tenant, request_id)

    async def fail(self, kind: str, tenant: str, error: BaseException) -> str:
        """A new request id, owned by `tenant`, whose future has already failed with `error`."""
        return await self.settled(kind, tenant, error)

    async def settled(self, kind: str, tenant: str, outcome: Any) -> str:
        """A new request id, owned by `tenant`, whose future already holds `outcome` (a value or an
        exception): for work the ingress does itself, answered through the same future protocol."""
        request_id = ids.new_request_id()
        await asyncio.to_thread(self._records.add_settled, request_id, tenant, kind, outcome)
        return request_id

    async def poll(
        self, request_id: str, tenant: str, timeout_s: float
    ) -> tuple[bool, Any, Failure | None, FutureEntry]:
        """(done, value, failure, entry) after waiting at most timeout_s: the long-poll behind retrieve_future."""
        ids.check_id(request_id, "request_id")
        record = await asyncio.to_thread(self._records.get, tenant, request_id)
        entry = FutureEntry(record.kind, record.meta)
        if record.status != "pending":
            stored, outcome = outcome_of(record)
            if stored:
                return _settled(outcome, entry)
        if record.base_model is None:  # failed before any deployment saw it, and not stored
            return True, None, error_response(RuntimeError("the outcome of this request was lost")), entry
        try:
            state, outcome = await self._deployments(record.base_model).wait_result.remote(request_id, timeout_s)
        except Exception as exc:  # the deployment is restarting: its work comes back from the request log
            logger.warning("retrieve_future: the deployment of %s did not answer: %s", record.base_model, unwrap(exc))
            await asyncio.sleep(min(timeout_s, 1.0))
            return False, None, None, entry
        if (lost := _lost(record, state, outcome)) is not None:
            return True, None, error_response(lost), entry
        if state in ("pending", "unknown"):
            return False, None, None, entry
        return _settled(outcome, entry)

    async def completions(self, tenant: str, target: str, after: int, timeout_s: float) -> list[tuple[int, str, str]]:
        """The target's sample completions after cursor `after` (retrieve_futures), waiting up to
        `timeout_s` for the first one; [] when none came. A wait that ends empty first settles the
        target's samples that no deployment will finish (`settle_lost`), so a poller never waits on
        a lost sample for ever."""
        deadline = time.monotonic() + timeout_s
        pause = 0.02
        while True:
            found = await asyncio.to_thread(self._records.completions, tenant, target, after)
            if found:
                return found
            if time.monotonic() >= deadline:
                if await self.settle_lost(tenant, target):
                    return await asyncio.to_thread(self._records.completions, tenant, target, after)
                return []
            await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0)))
            pause = min(pause * 2, COMPLETIONS_POLL_S)

    async def settle_lost(self, tenant: str, target: str) -> int:
        """Write the outcome of the target's older pending samples whose deployment has it but whose
        record does not (a write that failed), or fail those it lost in a restart; how many."""
        before = utc_now() - LOST_AFTER
        settled = 0
        for row in await asyncio.to_thread(self._records.pending_samples, tenant, target, before):
            try:
                state, outcome = await self._deployments(row.base_model).wait_result.remote(row.id, 0)
            except Exception as exc:  # the deployment is restarting: its work comes back from the request log
                logger.warning("retrieve_futures: the deployment of %s did not answer: %s", row.base_model, unwrap(exc))
                return settled
            if (lost := _lost(row, state, outcome)) is None and state not in ("done", "failed"):
                continue
            await asyncio.to_thread(self._records.finish, row.id, lost or outcome)
            settled += 1
        return settled

    async def _deliver(self, request_id: str, response: Any) -> None:
        """Await the deployment call only to log a call that could not run (its record stays
        pending; the outcome, when there is one, reaches the record from the deployment)."""
        try:
            await response
        except Exception as exc:  # the work's own failure is in its record; this is for the log
            cause = unwrap(exc)
            if type(cause).__module__.startswith("ray."):
                logger.warning("request %s could not reach its model deployment: %s", request_id, cause)

    async def _expire_now_and_then(self) -> None:
        now = time.monotonic()
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRY_EVERY_S
            try:
                await asyncio.to_thread(self._records.expire)
            except Exception:  # another replica may be expiring at the same time; next time
                logger.exception("could not expire old futures")


def deployment_call(handle: Any, verb: str, *args: Any, request_id: str) -> Any:
    """`handle.verb(*args, request_id=...)`: the deployment keeps the outcome under that id."""
    return getattr(handle, verb).remote(*args, request_id=request_id)


def _lost(record: Any, state: str, outcome: Any) -> ServerError | None:
    """The error of a request its deployment never saw although it was recorded before that
    deployment (re)started (`wait_result` answered "unknown" with its start time), else None."""
    if state == "unknown" and record.created_at < outcome - LOST_AFTER:
        return ServerError("this request was lost when its model deployment restarted; submit it again")
    return None


def _settled(outcome: Any, entry: FutureEntry) -> tuple[bool, Any, Failure | None, FutureEntry]:
    if isinstance(outcome, BaseException):
        return True, None, error_response(outcome), entry
    return True, outcome, None, entry
