"""The future store: TTL, re-fetch after a first fetch, and waiting for a put in flight."""

import asyncio
import time

from actors.ids import new_request_id, request_minted_at
from deployments.futures import FutureEntry, FutureStore


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_entries_survive_fetches_until_the_ttl():
    clock = Clock()
    store = FutureStore(ttl_s=60, clock=clock)
    entry = FutureEntry(kind="optim_step", failure=(400, {"error": "x", "category": "user"}))
    rid = new_request_id()

    async def scenario():
        await store.put(rid, entry)
        first, second = await store.get(rid), await store.get(rid)
        clock.now += 61
        return first, second, await store.get(rid)

    first, second, expired = run(scenario())
    assert first is entry and second is entry and expired is None


def test_get_waits_for_a_put_in_flight():
    store = FutureStore(ttl_s=60, put_grace_s=5)
    rid = new_request_id()

    async def scenario():
        waiter = asyncio.create_task(store.get(rid))
        await asyncio.sleep(0.05)
        await store.put(rid, FutureEntry(kind="optim_step"))
        return await waiter

    assert run(scenario()).kind == "optim_step"


def test_unknown_old_or_foreign_ids_answer_at_once():
    store = FutureStore(ttl_s=60, put_grace_s=5)
    old = f"req-{int((time.time() - 10) * 1000):x}-{'ab' * 16}"
    start = time.time()
    assert run(store.get(old)) is None
    assert run(store.get("something-else")) is None
    assert time.time() - start < 1
    assert abs(request_minted_at(new_request_id()) - time.time()) < 5
