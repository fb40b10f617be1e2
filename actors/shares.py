"""Weighted time shares between kinds of work on one compute thread.

Each kind (training, sampling) has a weight and a virtual time: the seconds it ran divided by its
weight. When several kinds have work, the one with the least virtual time runs next, so over any
stretch where both wait, each gets its weight's share of the thread (to within one unit of work:
a training pass, or one slice of decode steps). A kind with nothing to do banks no credit: its
virtual time is raised to the others' when it next has work, so a burst after an idle spell
cannot monopolise the thread.
"""

from __future__ import annotations


class TimeShares:
    def __init__(self, weights: dict[str, float]):
        if not weights or any(w <= 0 for w in weights.values()):
            raise ValueError(f"every kind needs a positive weight, got {weights}")
        total = sum(weights.values())
        self.weights = {kind: w / total for kind, w in weights.items()}
        self._vtime = dict.fromkeys(weights, 0.0)
        self.used = dict.fromkeys(weights, 0.0)  # seconds each kind ran (for tests and metrics)

    def pick(self, ready: list[str]) -> str:
        """The kind to run next among those with work."""
        if not ready:
            raise ValueError("no kind of work is ready")
        floor = min(self._vtime[kind] for kind in ready)
        for kind in self._vtime:
            if kind not in ready:  # idle: no credit to bank
                self._vtime[kind] = max(self._vtime[kind], floor)
        return min(ready, key=lambda kind: self._vtime[kind])

    def charge(self, kind: str, seconds: float) -> None:
        """`kind` ran for `seconds`."""
        self._vtime[kind] += seconds / self.weights[kind]
        self.used[kind] += seconds
