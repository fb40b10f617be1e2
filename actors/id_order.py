"""Submission order between the barriers of an id and the sampling requests of that id.

A sampler (or a training model sampled live) has barriers (create, remove, optim_step, save,
load, unload) and sampling requests. Each gets a ticket when it is submitted, before it waits
for its seq_id or its tenant's quota. A barrier runs once no sample of its id with an earlier
ticket is pending; a sample starts once no barrier of its id with an earlier ticket is pending;
both count as pending from submission until settled. A wait always points at an earlier
ticket, so no two can wait for each other.
"""

from __future__ import annotations


class IdOrder:
    def __init__(self):
        self._next = 0
        self._samples: dict[str, list[int]] = {}  # id -> tickets of its pending samples, ascending
        self._barriers: dict[str, list[int]] = {}  # id -> tickets of its pending barriers, ascending

    def sample(self, key: str) -> int:
        return self._add(self._samples, key)

    def barrier(self, key: str) -> int:
        return self._add(self._barriers, key)

    def sample_done(self, key: str, ticket: int) -> None:
        _remove(self._samples, key, ticket)

    def barrier_done(self, key: str, ticket: int) -> None:
        _remove(self._barriers, key, ticket)

    def barrier_may_run(self, key: str, ticket: int) -> bool:
        samples = self._samples.get(key)
        return not samples or samples[0] > ticket

    def sample_may_start(self, key: str, ticket: int) -> bool:
        barriers = self._barriers.get(key)
        return not barriers or barriers[0] > ticket

    def _add(self, tickets: dict[str, list[int]], key: str) -> int:
        self._next += 1
        tickets.setdefault(key, []).append(self._next)
        return self._next


def _remove(tickets: dict[str, list[int]], key: str, ticket: int) -> None:
    pending = tickets.get(key)
    if pending is None or ticket not in pending:
        return
    pending.remove(ticket)
    if not pending:
        del tickets[key]
