"""Reads of the metadata database while other processes write to it (the embedded SQLite).

Every request the service answers reads the database (its API key, then e.g. a future's record),
while the model actors and the ingress write (records of new requests, outcomes of finished
ones). `--writers` processes each add a request record and store its outcome, in a loop; this
process meanwhile times two reads, each done two ways, alternating so that machine noise hits
both alike:

- `reading()`: a plain (deferred) transaction. In WAL mode a reader does not wait for writers.
- `transaction()`: BEGIN IMMEDIATE, which takes the one write lock that every process shares,
  so the read waits for every writer ahead of it (what every read did before).

Printed: p50 / p99 of each read each way, and the ratio of the write-lock way to the plain way.

    python bench/db_reads.py                       # 2 writer processes, 2000 reads of each
    python bench/db_reads.py --writers 4 --reads 5000
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import select  # noqa: E402

from actors import ids  # noqa: E402
from actors.metadata.database import Database  # noqa: E402
from actors.metadata.futures import FutureRecords  # noqa: E402
from actors.metadata.tables import ApiKey, Request  # noqa: E402
from actors.metadata.tenants import Tenants, digest  # noqa: E402

KEY = "tml-bench-db-reads"


def writer(url: str, tenant: str, stop, pause_s: float) -> None:
    """What the service writes under load: a new request's record, then its outcome."""
    records = FutureRecords(Database(url), ttl_s=3600)
    while not stop.is_set():
        request_id = ids.new_request_id()
        records.add(request_id, tenant, "forward_backward", "bench-model", {})
        records.finish(request_id, {"loss": 1.0, "logprobs": list(range(64))})
        time.sleep(pause_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, default=2, help="writing processes")
    parser.add_argument("--reads", type=int, default=2000, help="reads of each kind, each way")
    parser.add_argument("--pause-ms", type=float, default=1.0, help="each writer's pause between requests")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="thinker-db-reads-") as tmp:
        url = f"sqlite:///{tmp}/thinker.sqlite3"
        db = Database(url)
        db.migrate()
        tenants = Tenants(db, "open")
        tenant = tenants.authenticate(KEY)
        records = FutureRecords(db, ttl_s=3600)
        finished = ids.new_request_id()
        records.add(finished, tenant, "create_model", "bench-model", {})
        records.finish(finished, {"model_id": "m"})
        hashed = digest(KEY)

        def record_plain():
            records.get(tenant, finished)

        def record_write_lock():
            with db.transaction() as session:
                row = session.get(Request, finished)
            assert row.tenant_id == tenant

        def key_plain():
            tenants.authenticate(KEY)

        def key_write_lock():
            with db.transaction() as session:
                row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hashed)).one()
            assert row.tenant_id == tenant

        reads = {
            "a future's record": (record_plain, record_write_lock),
            "an API key": (key_plain, key_write_lock),
        }
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        procs = [
            context.Process(target=writer, args=(url, tenant, stop, args.pause_ms / 1000)) for _ in range(args.writers)
        ]
        for proc in procs:
            proc.start()
        time.sleep(2.0)  # the writers are running
        times = {(name, way): [] for name in reads for way in ("reading()", "transaction()")}
        try:
            for _ in range(args.reads):
                for name, (plain, write_lock) in reads.items():
                    for way, read in (("reading()", plain), ("transaction()", write_lock)):
                        start = time.perf_counter()
                        read()
                        times[name, way].append(time.perf_counter() - start)
        finally:
            stop.set()
            for proc in procs:
                proc.join()
        written = records_count(db)
        db.close()

    print(f"{args.writers} writer processes ({written} requests written meanwhile), {args.reads} reads of each")
    for name in reads:
        plain, locked = (np.asarray(times[name, way]) * 1000 for way in ("reading()", "transaction()"))
        for way, xs in (("reading()", plain), ("transaction()", locked)):
            print(f"{name:>18} via {way:<14} p50 {np.percentile(xs, 50):6.2f} ms, p99 {np.percentile(xs, 99):7.2f} ms")
        print(
            f"{name:>18}: transaction() / reading(): p50 {np.percentile(locked, 50) / np.percentile(plain, 50):.2f}x, "
            f"p99 {np.percentile(locked, 99) / np.percentile(plain, 99):.2f}x"
        )


def records_count(db: Database) -> int:
    from sqlalchemy import func

    with db.reading() as session:
        return int(session.scalar(select(func.count()).select_from(Request)))


if __name__ == "__main__":
    main()
