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

    def _await_placement(self, bundle: dict, timeout_s: float) -> None:
        """Wait for the ranks' resources; say what is missing while waiting, and fail clearly."""
        ready = self._pg.ready()
        waited, warn_after = 0.0, min(30.0, timeout_s)
        while waited < timeout_s:
            step = min(warn_after, timeout_s - waited)
            done, _ = ray.wait([ready], timeout=step)
            if done:
                return
            waited += step
            logger.warning(
                "the Megatron group of %s waits %.0f s for %d bundles of %s (%s placement); the cluster has %s",
                self._config.name,
                waited,
                self.world_size,
                bundle,
                self._config.megatron.placement_strategy,
                {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
            )
        remove_placement_group(self._pg)
        self._pg = None
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
        self.close()
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
