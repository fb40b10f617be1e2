"""What a restore costs: a restarted model deployment brings its training models back from their
durable snapshots before it answers. Measured on the model actor itself (no Serve, so Serve's
own restart delay is not in it), on the default model:

1. a model actor trains N LoRA adapters one step each (each writes a durable snapshot), and is
   dropped;
2. a new model actor on the same database and storage restores them: the time from its first
   call to its answer, against the same first call of a model actor with nothing to restore,
   started side by side in the same run (`rounds` times, alternating).

Prints seconds per adapter ((restore - empty) / N) and the ratio restore / empty.

    python bench/restore.py                  # default model, 8 adapters of rank 16
    python bench/restore.py --adapters 4 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RANK = 16


def actor(config, root: str, cache_dir: str):
    from actors.model_actor import ModelActor

    return ModelActor(
        config,
        cache_dir=cache_dir,
        checkpoint_root=f"{root}/checkpoints",
        database_url=f"sqlite:///{root}/thinker.sqlite3",
        snapshot_interval_s=0.0,
    )


async def train(config, root: str, cache_dir: str, adapters: int) -> None:
    from actors.metadata.database import Database
    from actors.metadata.registry import Registry
    from actors.metadata.tenants import Tenants
    from actors.work import AdamParams, CreateModelWork, Datum, ForwardBackwardWork, LoraSpec, OptimStepWork

    first = actor(config, root, cache_dir)
    db = Database(f"sqlite:///{root}/thinker.sqlite3")
    tenant = Tenants(db, "open").authenticate("tml-bench")
    registry = Registry(db)
    rng = np.random.default_rng(0)
    for i in range(adapters):
        model_id = f"run-{i}"
        lora = LoraSpec(rank=RANK, seed=i)
        registry.add_run(tenant, model_id, None, config.name, lora, {})
        await first.create_model(CreateModelWork(model_id, lora, tenant=tenant), request_id=None)
        tokens = rng.integers(0, 1000, (4, 129))
        data = [Datum(t[:-1], {"target_tokens": t[1:]}) for t in tokens]
        await first.forward_backward(
            ForwardBackwardWork(model_id, 1, data, "cross_entropy", tenant=tenant), request_id=None
        )
        await first.optim_step(
            OptimStepWork(model_id, 2, AdamParams(learning_rate=1e-4), tenant=tenant), request_id=None
        )
    while first._durability._writes._in_flight:  # every snapshot on disk
        await asyncio.sleep(0.05)
    missing = [r.id for r in registry.live_runs_of(config.name) if r.durable_seq is None]
    assert not missing, f"no durable snapshot for {missing}"
    first.__del__()
    db.close()


async def first_answer(config, root: str, cache_dir: str) -> float:
    """Seconds from a new model actor's first call (list_models, which waits for the restore) to its answer."""
    fresh = actor(config, root, cache_dir)
    start = time.perf_counter()
    await fresh.list_models()
    elapsed = time.perf_counter() - start
    fresh.__del__()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from configs.schema import BaseModelConfig, ThinkerConfig

    config = BaseModelConfig(
        name="HuggingFaceTB/SmolLM2-135M-Instruct",
        source="embedded:SmolLM2-135M-Instruct",
        max_adapters=args.adapters + 1,
    )
    cache_dir = str(Path(ThinkerConfig.model_fields["cache_dir"].default).expanduser())
    with tempfile.TemporaryDirectory() as full, tempfile.TemporaryDirectory() as empty:
        asyncio.run(train(config, full, cache_dir, args.adapters))
        restore, nothing = [], []
        for _ in range(args.rounds):
            nothing.append(asyncio.run(first_answer(config, empty, cache_dir)))
            restore.append(asyncio.run(first_answer(config, full, cache_dir)))
    r, e = statistics.median(restore), statistics.median(nothing)
    print(f"first answer with {args.adapters} adapters to restore: median {r:.2f} s  {[round(x, 2) for x in restore]}")
    print(f"first answer with nothing to restore:       median {e:.3f} s  {[round(x, 3) for x in nothing]}")
    print(f"restore: {(r - e) / args.adapters:.3f} s per adapter (rank {RANK}, AdamW state); ratio {r / e:.1f}x")


if __name__ == "__main__":
    main()
