"""The Megatron rank group: one Ray actor per rank, placed in a Ray placement group so the
ranks may land on different nodes (one bundle per rank; GPUs when configured).

- Rank 0 hosts the torch.distributed rendezvous; every rank then sets up its shard.
- `call` runs a method on every rank and waits at most `call_timeout_s`: a dead or stuck rank
  becomes a `RankLost` (never a hang), and the group is marked broken so that the backend
  rebuilds it, restores its adapters and runs the request again.
- Ranks are named actors (`thinker-megatron:<base model>:<group id>:<rank>`) so that an operator
  (or a test) can find them with `ray list actors` / `ray.util.list_named_actors`.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.megatron.rank import MegatronRank
from configs.errors import ServerError
from configs.schema import BaseModelConfig

logger = logging.getLogger(__name__)
PLACEMENT_POLL_S = 1.0


class RankLost(ServerError):
    """A rank actor died or stopped answering: the group must be rebuilt."""


class RankGroup:
    def __init__(self, config: BaseModelConfig, cache_dir: str):
        self._config = config
        self._cache_dir = cache_dir
        self._actors: list = []
        self._pg = None
        self.coords: list[dict] = []
        self.broken = False
        self._fail_fast = True  # the first start only (see unplaceable_after_s)
        self._start()

    @property
    def world_size(self) -> int:
        m = self._config.megatron
        return m.tensor_parallel * m.pipeline_parallel * m.data_parallel

    def _start(self) -> None:
        m = self._config.megatron
        bundle = {"CPU": m.cpus_per_rank, **({"GPU": m.gpus_per_rank} if m.gpus_per_rank else {})}
        self._pg = placement_group([bundle] * self.world_size, strategy=m.placement_strategy)
        self._await_placement(bundle, m.setup_timeout_s)
        remote = ray.remote(MegatronRank)
        threads = max(1, int(m.cpus_per_rank))
        group_id = uuid.uuid4().hex[:8]
        self._actors = [
            remote.options(
                name=f"thinker-megatron:{self._config.name}:{group_id}:{i}",
                num_cpus=m.cpus_per_rank,
                num_gpus=m.gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i),
            ).remote(i, self.world_size, threads)
            for i in range(self.world_size)
        ]
        addr, port = ray.get(self._actors[0].address.remote(), timeout=m.setup_timeout_s)
        setups = [
            a.setup.remote(
                addr,
                port,
                m.tensor_parallel,
                m.pipeline_parallel,
                self._config,
                self._cache_dir,
                m.collective_timeout_s,
            )
            for a in self._actors
        ]
        self.coords = ray.get(setups, timeout=m.setup_timeout_s)
        self.broken = False

    def _give_up_placement(self) -> None:
        remove_placement_group(self._pg)
        self._pg = None

    def _await_placement(self, bundle: dict, timeout_s: float) -> None:
        """Wait for the ranks' resources. A group no set of the cluster's nodes could hold (even idle)
        fails after `unplaceable_after_s`, saying what it asked for and what each node has; one that
        waits for busy resources is reported every 30 s and fails at `timeout_s`."""
        m = self._config.megatron
        ready = self._pg.ready()
        waited, warn_at, unplaceable_for = 0.0, min(30.0, timeout_s), 0.0
        while waited < timeout_s:
            done, _ = ray.wait([ready], timeout=min(PLACEMENT_POLL_S, timeout_s - waited))
            if done:
                return
            waited += PLACEMENT_POLL_S
            nodes = _node_resources()
            placeable = fits(bundle, self.world_size, m.placement_strategy, nodes)
            unplaceable_for = 0.0 if placeable else unplaceable_for + PLACEMENT_POLL_S
            if self._fail_fast and m.unplaceable_after_s is not None and unplaceable_for >= m.unplaceable_after_s:
                self._give_up_placement()
                raise ServerError(
                    f"the Megatron group of {self._config.name} asks for {self.world_size} x {bundle} "
                    f"({m.placement_strategy}), which no set of this cluster's nodes can hold: the nodes have "
                    f"{nodes}; lower cpus_per_rank / gpus_per_rank or the parallel sizes, or add nodes"
                )
            if waited >= warn_at:
                warn_at += 30.0
                logger.warning(
                    "the Megatron group of %s waits %.0f s for %d bundles of %s (%s placement); the cluster has %s",
                    self._config.name,
                    waited,
                    self.world_size,
                    bundle,
                    m.placement_strategy,
                    {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
                )
        self._give_up_placement()
        raise ServerError(
            f"the cluster did not provide {self.world_size} x {bundle} for the Megatron group of "
            f"{self._config.name} within {timeout_s:.0f} s (megatron.setup_timeout_s); lower cpus_per_rank / "
            "gpus_per_rank or add nodes"
        )

    def call(self, method: str, *args: Any, per_rank: list[tuple] | None = None) -> list[Any]:
        """`method` on every rank (with `per_rank[i]` appended to rank i's arguments); all results."""
        if self.broken:
            raise RankLost("the Megatron group is being rebuilt after a rank failure")
        refs = [
            getattr(actor, method).remote(*args, *(per_rank[i] if per_rank else ()))
            for i, actor in enumerate(self._actors)
        ]
        try:
            return ray.get(refs, timeout=self._config.megatron.call_timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            self.broken = True
            logger.error("Megatron rank failure during %s: %s", method, exc)
            raise RankLost(
                f"a Megatron rank failed during {method} ({type(exc).__name__}); the group is rebuilt"
            ) from None
        except ray.exceptions.RayTaskError as exc:  # an exception inside the method: pass it on
            raise exc.as_instanceof_cause() from None

    def reports(self, results: list[Any]) -> list[Any]:
        """The reporting ranks' results (last stage, TP rank 0), in data-parallel order."""
        ranked = sorted((c["dp"], r) for c, r in zip(self.coords, results) if c["reports"])
        return [r for _, r in ranked]

    def rebuild(self) -> None:
        """A new group after a rank was lost: it waits for its nodes (a lost node takes a while to be
        replaced) up to setup_timeout_s, however long they are missing."""
        self.close()
        self._fail_fast = False
        try:
            self._start()
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            self.broken = True
            raise RankLost(f"a Megatron rank failed while the group was rebuilt ({type(exc).__name__})") from None

    def close(self) -> None:
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        if self._pg is not None:
            remove_placement_group(self._pg)
        self._actors, self._pg = [], None


def fits(bundle: dict[str, float], count: int, strategy: str, nodes: list[dict[str, float]]) -> bool:
    """Whether `count` bundles could be placed on idle `nodes` (each node's total resources) under
    the placement `strategy`: the test for a group that waiting cannot help."""
    per_node = [int(min(node.get(k, 0.0) / v for k, v in bundle.items() if v > 0) + 1e-9) for node in nodes]
    if strategy == "STRICT_PACK":
        return any(n >= count for n in per_node)
    if strategy == "STRICT_SPREAD":
        return sum(1 for n in per_node if n >= 1) >= count
    return sum(per_node) >= count


def _node_resources() -> list[dict[str, float]]:
    """Each alive node's total CPU and GPU (not what is free: busy resources free up)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return [{k: v for k, v in r.items() if k in ("CPU", "GPU")} for r in nodes]
