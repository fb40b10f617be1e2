"""Futures under load: 500 requests pending at once from 50 sessions (50 tenants), and one of
the two ingress replicas SIGKILLed while they are pending. Counts the results lost (target:
zero), then times answering a finished future (retrieve_future) against a no-op route of the
same ingress (healthz), interleaved in the same run, and prints p50/p99 of both and their ratio.

    python bench/load.py                        # 50 sessions x 10 requests, tiny random Llama
    python bench/load.py --sessions 10 --per-session 5
    python bench/load.py --control              # the control plane under 8 trainers + 200 samples

`--control`: the default model, idle first, then under load: 8 SDK training clients looping
forward_backward (4x128) + optim_step while 200 sampling requests (16 samples x 240 tokens) are
pending. Throughout, from a process of its own, one probe after another: session_heartbeat,
healthz, get_info and retrieve_future of a finished future; prints p50/p99 of each, idle and
under load (target: p99 under 50 ms under load). Under load the model actor's compute thread
(and its torch workers) is switched between SCHED_IDLE (compute_thread_policy idle, which this
benchmark's server runs) and SCHED_OTHER (normal) every `--phase` seconds, so both are measured side by side,
with the CPU time the compute got under each.

Submissions go over plain HTTP as the SDK sends them (protobuf forward_backward, X-API-Key);
a submission that meets the dying replica is sent again with the same seq_id, as the SDK's
retry would, and counts once (exactly once: the model runs it once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def fb_body(model_id: str, seq_id: int, rng: np.random.Generator) -> bytes:
    from deployments.wire_proto import pb

    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    for _ in range(4):
        tokens = rng.integers(0, TINY["vocab_size"], 65)
        datum = msg.data.add()
        datum.model_input.add().encoded_text.tokens = tokens[:-1].astype("<i4").tobytes()
        target = datum.loss_fn_inputs["target_tokens"]
        target.dtype = pb.DTYPE_INT64
        target.shape.append(64)
        target.dense = tokens[1:].astype("<i8").tobytes()
    return msg.SerializeToString()


class Load:
    def __init__(self, url: str, sessions: int, per_session: int):
        self.url = f"{url}/api/v1"
        self.http = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200))
        self.sessions, self.per_session = sessions, per_session
        self.accepted: list[tuple[str, str, str]] = []  # (api key, request id, replica)
        self.resubmitted = 0

    async def post(self, key: str, path: str, **kwargs):
        return await self.http.post(
            f"{self.url}/{path}", headers={"X-API-Key": key, **kwargs.pop("headers", {})}, **kwargs
        )

    async def submit(self, key: str, path: str, **kwargs) -> str:
        """Accepted at last (a submission that meets the dying replica goes again, as the SDK's would)."""
        for _ in range(60):
            try:
                response = await self.post(key, path, **kwargs)
            except httpx.TransportError:  # the connection to the killed replica was reset
                response = None
            if response is not None and response.status_code == 200:
                self.accepted.append((key, response.json()["request_id"], response.headers["x-thinker-replica"]))
                return response.json()["request_id"]
            if response is not None and response.status_code < 500:
                raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")
            self.resubmitted += 1
            await asyncio.sleep(0.5)
        raise RuntimeError(f"{path} was never accepted")

    async def result(self, key: str, request_id: str) -> dict | bytes | None:
        """The finished result, or None if it is lost (failed, unknown, or never answered)."""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                response = await self.post(key, "retrieve_future", json={"request_id": request_id})
            except httpx.TransportError:
                await asyncio.sleep(0.5)
                continue
            if response.status_code == 200:
                return response.content
            if response.status_code not in (408, 502, 503, 500) or "failed" in response.text:
                print(f"lost {request_id}: {response.status_code} {response.text[:200]}")
                return None
            await asyncio.sleep(0.05 if response.status_code == 408 else 0.5)
        return None

    async def session(self, index: int, started: asyncio.Event) -> list[tuple[str, str]]:
        key = f"tml-load-{index:03d}"
        session = (await self.post(key, "create_session", json={"tags": [], "sdk_version": "load"})).json()
        body = {
            "session_id": session["session_id"],
            "model_seq_id": 0,
            "base_model": "tiny",
            "lora_config": {"rank": 4},
        }
        model_id = json.loads(await self.result(key, await self.submit(key, "create_model", json=body)))["model_id"]
        await started.wait()  # every session has its model: now all submit at once
        rng = np.random.default_rng(index)
        headers = {"content-type": "application/x-protobuf"}
        ids = []
        for seq_id in range(1, self.per_session + 1):
            request_id = await self.submit(
                key, "forward_backward", content=fb_body(model_id, seq_id, rng), headers=headers
            )
            ids.append((key, request_id))
        return ids

    async def healthz(self) -> None:
        response = await self.http.get(f"{self.url}/healthz")
        response.raise_for_status()


def kill_replica(name_suffix: str) -> None:
    import ray

    (name,) = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(f"#{name_suffix}")
    ]
    replica = ray.get_actor(name, namespace="serve")
    os.kill(ray.get(replica.__ray_call__.remote(lambda _: os.getpid())), signal.SIGKILL)


async def run(url: str, sessions: int, per_session: int) -> None:
    load = Load(url, sessions, per_session)
    started = asyncio.Event()
    tasks = [asyncio.ensure_future(load.session(i, started)) for i in range(sessions)]
    while len(load.accepted) < sessions:  # every create_model accepted
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    t0 = time.monotonic()
    started.set()
    total = sessions * per_session
    while len(load.accepted) < sessions + total // 2:
        await asyncio.sleep(0.01)
    replicas = {replica for *_, replica in load.accepted}
    victim = load.accepted[-1][2]
    kill_replica(victim)
    print(f"killed ingress replica {victim} (of {sorted(replicas)}) after {len(load.accepted) - sessions} submissions")
    submitted = [pair for ids in await asyncio.gather(*tasks) for pair in ids]
    print(
        f"{len(submitted)} forward_backward requests accepted in {time.monotonic() - t0:.1f} s "
        f"({load.resubmitted} submissions sent again)"
    )
    results = await asyncio.gather(*(load.result(key, rid) for key, rid in submitted))
    lost = sum(r is None for r in results)
    print(f"all answered {time.monotonic() - t0:.1f} s after the first submission; lost: {lost} of {len(submitted)}")

    # a finished future vs a no-op route, alternating, one at a time
    future_s, noop_s = [], []
    for key, rid in submitted:
        start = time.perf_counter()
        await load.healthz()
        noop_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        response = await load.post(key, "retrieve_future", json={"request_id": rid})
        future_s.append(time.perf_counter() - start)
        assert response.status_code == 200, response.text[:200]
    await load.http.aclose()

    def pct(xs, q):
        return float(np.percentile(np.asarray(xs) * 1000, q))

    print(f"answering a finished future: p50 {pct(future_s, 50):.1f} ms, p99 {pct(future_s, 99):.1f} ms")
    print(f"no-op route (healthz):       p50 {pct(noop_s, 50):.1f} ms, p99 {pct(noop_s, 99):.1f} ms")
    print(
        f"ratio (future / no-op): p50 {statistics.median(future_s) / statistics.median(noop_s):.2f}x, "
        f"p99 {pct(future_s, 99) / pct(noop_s, 99):.2f}x"
    )
    if lost:
        raise SystemExit(f"{lost} results lost")


_PROBE: dict = {}  # the probe process's client, session, model and finished future, made once


def probe_control_plane(url: str, seconds: float, base_model: str) -> dict[str, list[float]]:
    """Seconds taken by each control-plane call, one after another for `seconds`."""
    if not _PROBE:
        http = httpx.Client(base_url=f"{url}/api/v1", headers={"X-API-Key": "tml-probe"}, timeout=60)
        session_id = http.post("/create_session", json={"tags": [], "sdk_version": "probe"}).json()["session_id"]
        body = {"session_id": session_id, "model_seq_id": 0, "base_model": base_model, "lora_config": {"rank": 4}}
        finished = http.post("/create_model", json=body).json()["request_id"]
        while http.post("/retrieve_future", json={"request_id": finished}).status_code != 200:
            time.sleep(0.1)
        model_id = http.post("/retrieve_future", json={"request_id": finished}).json()["model_id"]
        _PROBE.update(http=http, session_id=session_id, finished=finished, model_id=model_id)
    http, session_id, finished, model_id = (_PROBE[k] for k in ("http", "session_id", "finished", "model_id"))
    calls = {
        "session_heartbeat": lambda: http.post("/session_heartbeat", json={"session_id": session_id}),
        "healthz": lambda: http.get("/healthz"),
        "get_info": lambda: http.post("/get_info", json={"model_id": model_id}),
        "finished future": lambda: http.post("/retrieve_future", json={"request_id": finished}),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, call in calls.items():
            start = time.perf_counter()
            response = call()
            times[name].append(time.perf_counter() - start)
            assert response.status_code == 200, f"{name}: {response.status_code} {response.text[:200]}"
        time.sleep(0.05)
    return times


class ComputeThreads:
    """The model actor's compute thread and torch workers, found from outside by their SCHED_IDLE
    policy (the benchmark's server runs compute_thread_policy idle; the workers torch starts from
    the compute thread inherit it, during the load's first passes), and switched between
    SCHED_IDLE and SCHED_OTHER so that both policies are measured in one run, under the same load.
    Switching back to SCHED_OTHER needs root or CAP_SYS_NICE (Ray runs its workers at nice 15):
    checked once at the start."""

    def __init__(self, name_part: str):
        pids = [p for p in os.listdir("/proc") if p.isdigit() and name_part in _read(f"/proc/{p}/cmdline")]
        assert len(pids) == 1, f"{len(pids)} processes named {name_part!r}"
        self.pid = pids[0]
        self.tids: set[int] = set()
        self._cpu: dict[int, float] = {}  # each thread's last CPU seconds read (kept once it ends)
        self.find()
        assert self.tids, "no SCHED_IDLE thread in the model actor: is compute_thread_policy idle?"
        try:
            self.set(os.SCHED_OTHER)
            self.set(os.SCHED_IDLE)
        except PermissionError:
            raise SystemExit("switching the compute back to SCHED_OTHER needs root or CAP_SYS_NICE") from None

    def find(self) -> None:
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                if os.sched_getscheduler(int(tid)) == os.SCHED_IDLE:
                    self.tids.add(int(tid))
            except OSError:  # the thread ended
                pass

    def set(self, policy: int) -> None:
        if policy == os.SCHED_IDLE:
            self.find()  # threads torch started since
        for tid in self.tids:
            try:
                os.sched_setscheduler(tid, policy, os.sched_param(0))
            except ProcessLookupError:
                pass

    def cpu_seconds(self) -> float:
        """CPU seconds of the threads so far (a thread that ended counts what it had last)."""
        for tid in self.tids:
            fields = _read(f"/proc/{self.pid}/task/{tid}/stat").rsplit(")", 1)[-1].split()
            if len(fields) > 12:
                self._cpu[tid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        return sum(self._cpu.values())


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def control(seconds: float, phase_s: float) -> None:
    import multiprocessing
    import threading

    import tinker
    from tinker import types

    from bench.local_serve import serve_thinker
    from configs.schema import DEFAULT_MODEL_NAME as DEFAULT_MODEL
    from configs.schema import BaseModelConfig, ThinkerConfig

    os.environ.setdefault("TINKER_API_KEY", "tml-bench")
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    url = serve_thinker(ThinkerConfig(models=[BaseModelConfig(name=DEFAULT_MODEL, compute_thread_policy="idle")]))
    # NOTE: the probe runs in a process of its own, so the times are the server's answers, not this
    # process's SDK threads (the load's clients) holding the probe's GIL
    probe = multiprocessing.get_context("spawn").Pool(1)
    idle = probe.apply(probe_control_plane, (url, seconds / 2, DEFAULT_MODEL))
    service = tinker.ServiceClient(base_url=url)
    trainers = [service.create_lora_training_client(base_model=DEFAULT_MODEL, rank=16).result() for _ in range(8)]
    sampler = trainers[0].save_weights_and_get_sampling_client().result()
    stop = threading.Event()
    rng = np.random.default_rng(0)

    def train(client):
        tokens = rng.integers(0, 49152, (4, 129))
        data = [
            types.Datum(
                model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                loss_fn_inputs={"target_tokens": t[1:].tolist()},
            )
            for t in tokens
        ]
        while not stop.is_set():
            fb = client.forward_backward(data, "cross_entropy")
            client.optim_step(types.AdamParams(learning_rate=1e-5)).result()
            fb.result()

    threads = [threading.Thread(target=train, args=(c,), daemon=True) for c in trainers]
    for t in threads:
        t.start()
    params = types.SamplingParams(max_tokens=240, temperature=1.0, stop=[])
    prompt = types.ModelInput.from_ints(list(range(100, 140)))
    pending = [sampler.sample(prompt, 16, params) for _ in range(200)]
    time.sleep(5)  # the load is on: passes and decode steps under way
    compute = ComputeThreads("ServeReplica:thinker:model-0")
    policies = {"compute idle": os.SCHED_IDLE, "compute normal": os.SCHED_OTHER}
    loaded: dict[str, dict[str, list[float]]] = {name: {k: [] for k in idle} for name in policies}
    cpu = dict.fromkeys(policies, 0.0)
    wall = dict.fromkeys(policies, 0.0)
    for phase in range(2 * max(1, round(seconds / phase_s))):
        name = list(policies)[(phase + phase // 2) % 2]  # idle, normal, normal, idle, ...: neither always first
        compute.set(policies[name])
        time.sleep(0.5)  # the switch has taken hold
        begin, cpu_begin = time.monotonic(), compute.cpu_seconds()
        for call, times in probe.apply(probe_control_plane, (url, phase_s, DEFAULT_MODEL)).items():
            loaded[name][call] += times
        end = time.monotonic()
        cpu[name] += compute.cpu_seconds() - cpu_begin
        wall[name] += end - begin
    stop.set()

    def pct(xs, q):
        return float(np.percentile(np.asarray(xs) * 1000, q))

    print(
        f"8 trainers (4x128) + {len(pending)} pending samples (16 x 240 tokens), default model; under load "
        f"the compute thread switched between SCHED_IDLE and SCHED_OTHER every {phase_s:g} s:"
    )
    for call in idle:
        row = f"{call:>18}: idle p50 {pct(idle[call], 50):5.1f} ms, p99 {pct(idle[call], 99):5.1f} ms"
        for name in policies:
            times = loaded[name][call]
            row += f" | {name} p50 {pct(times, 50):5.1f}, p99 {pct(times, 99):5.1f}, max {max(times) * 1000:5.1f}"
        print(row)
    for name in policies:
        print(
            f"{name:>18}: the compute thread and its torch workers had {cpu[name] / wall[name]:.2f} cores "
            f"of CPU time ({wall[name]:.0f} s; OpenMP's spin-waits included)"
        )
    os._exit(0)  # the pending samples and training threads die with the process and its Ray cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--per-session", type=int, default=10)
    parser.add_argument("--control", action="store_true", help="control-plane latency under training + sampling")
    parser.add_argument(
        "--seconds", type=float, default=40.0, help="--control: how long to probe under load, per policy"
    )
    parser.add_argument("--phase", type=float, default=10.0, help="--control: seconds between policy switches")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if args.control:
        control(args.seconds, args.phase)
        return
    from bench.local_serve import serve_thinker
    from configs.schema import BaseModelConfig, TenantQuotas, ThinkerConfig

    root = tempfile.mkdtemp(prefix="thinker-load-")
    config = ThinkerConfig(
        models=[BaseModelConfig(name="tiny", random_init=TINY, num_cpus=1, max_adapters=args.sessions + 8)],
        checkpoint_root=root,
        database_url=f"sqlite:///{root}/thinker.db",
        ingress_replicas=2,
        quotas=TenantQuotas(max_adapters=4),
    )
    url = serve_thinker(config)
    asyncio.run(run(url, args.sessions, args.per_session))


if __name__ == "__main__":
    main()
