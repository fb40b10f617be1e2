"""The metrics' definitions, their recorder and the Grafana dashboard that plots them (no Ray)."""

import asyncio
import json
import re
from pathlib import Path

import numpy as np

from actors.metrics import METRICS, ModelMetrics
from actors.scheduler import Scheduler
from actors.work import (
    CreateModelWork,
    Datum,
    ForwardBackwardWork,
    LoraSpec,
    SampledSequence,
    SampleResult,
    SampleWork,
)
from tests.unit.test_scheduler import SpyBackend, limits

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "configs" / "grafana" / "thinker-dashboard.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


class Recorded:
    """A stand-in for one Ray metric: keeps every (value, tags) it is given."""

    def __init__(self, spec):
        self.spec = spec
        self.points: list[tuple[float, dict]] = []

    def inc(self, value, tags):
        self.points.append((value, tags))

    set = observe = inc


class Recorder:
    def __init__(self):
        self.metrics: dict[str, Recorded] = {}

    def __call__(self, spec):
        self.metrics[spec.name] = Recorded(spec)
        return self.metrics[spec.name]

    def points(self, name):
        return self.metrics[name].points


def dashboard_expressions() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    return exprs + [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]


def test_every_metric_is_named_and_tagged_alike():
    names = [spec.name for spec in METRICS]
    assert len(set(names)) == len(names)
    for spec in METRICS:
        assert re.fullmatch(r"thinker_[a-z_]+", spec.name), spec.name
        assert spec.tags[0] == "base_model", spec.name
        assert spec.kind in ("counter", "gauge", "histogram")
        assert bool(spec.boundaries) == (spec.kind == "histogram"), spec.name
        assert list(spec.boundaries) == sorted(set(spec.boundaries)) and all(b > 0 for b in spec.boundaries)


def test_the_dashboard_plots_every_metric_and_only_those():
    exported = {spec.exported: spec for spec in METRICS}
    allowed = {
        spec.exported + suffix: spec.exported
        for spec in METRICS
        for suffix in (HISTOGRAM_SUFFIXES if spec.kind == "histogram" else ("",))
    }
    used = {name for expr in dashboard_expressions() for name in re.findall(r"\bray_thinker_[a-z_]+", expr)}
    assert used - set(allowed) == set(), "the dashboard names metrics actors/metrics.py does not define"
    assert set(exported) - {allowed[name] for name in used} == set(), "metrics the dashboard does not plot"


def test_the_dashboard_takes_its_prometheus_datasource_as_a_variable():
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]


def test_recorded_points_carry_the_base_model_and_their_tags():
    recorder = Recorder()
    metrics = ModelMetrics("tiny", make=recorder)
    metrics.trained("t1", forward_only=False, tokens=16, seconds=0.2)
    metrics.trained("t1", forward_only=True, tokens=5, seconds=0.1)
    metrics.stepped("t1", 0.05)
    metrics.sampled("t2", 7, 1.5)
    metrics.sampled("t2", 0, 0.5)  # nothing generated: no zero increment (Ray refuses it), latency still counts
    metrics.restored("t3")
    assert recorder.points("thinker_tokens_trained") == [
        (16.0, {"base_model": "tiny", "tenant": "t1", "verb": "forward_backward"}),
        (5.0, {"base_model": "tiny", "tenant": "t1", "verb": "forward"}),
    ]
    assert [(v, t["verb"]) for v, t in recorder.points("thinker_step_latency_seconds")] == [
        (0.2, "forward_backward"),
        (0.1, "forward"),
        (0.05, "optim_step"),
    ]
    assert recorder.points("thinker_tokens_sampled") == [(7.0, {"base_model": "tiny", "tenant": "t2"})]
    assert [v for v, _ in recorder.points("thinker_sample_latency_seconds")] == [1.5, 0.5]
    assert recorder.points("thinker_restores") == [(1.0, {"base_model": "tiny", "tenant": "t3"})]


def test_recording_never_raises():
    class Broken:
        def __init__(self, spec):
            if spec.kind == "gauge":
                raise RuntimeError("cannot make it")

        def inc(self, value, tags):
            raise RuntimeError("cannot record")

        set = observe = inc

    metrics = ModelMetrics("tiny", make=Broken)
    metrics.trained("t", False, 3, 0.1)
    metrics.sampled("t", 3, 0.1)
    metrics.pass_size("train", 3, 1)

    def read():
        raise RuntimeError("cannot read")

    async def watch_briefly():
        await asyncio.wait_for(metrics.watch(read, interval_s=0.01), 0.05)

    try:
        asyncio.run(watch_briefly())
    except TimeoutError:
        pass  # it watched until cancelled: a failing read did not end it


def sample_three_tokens(works):
    sequence = SampledSequence(np.zeros(3, np.int32), np.zeros(3, np.float32), "length")
    return [SampleResult([sequence] * work.num_samples) for work in works]


def test_the_scheduler_reports_pass_sizes_and_what_waits():
    recorder = Recorder()
    backend = SpyBackend(pass_s=0.2)
    for m in "ab":
        backend.create_model(CreateModelWork(m, LoraSpec(rank=2)))
    scheduler = Scheduler(
        backend.forward_backward_batch,
        backend.check_forward_backward,
        sample_three_tokens,
        limits(),
        metrics=ModelMetrics("tiny", make=recorder),
    )

    def work(model_id, length):
        data = [Datum(np.arange(length), {"target_tokens": np.arange(length)})]
        return ForwardBackwardWork(model_id, None, data, "cross_entropy", tenant=f"tenant-{model_id}")

    async def scenario():
        first = asyncio.create_task(scheduler.forward_backward(work("a", 10)))
        await asyncio.sleep(0.05)
        assert scheduler.waiting == 0  # the first pass runs
        rest = [asyncio.create_task(scheduler.forward_backward(work(m, 6))) for m in "ab"]
        await asyncio.sleep(0.05)
        assert scheduler.waiting == 2
        await asyncio.gather(first, *rest)
        assert scheduler.waiting == 0
        await scheduler.sample(SampleWork("a", None, np.arange(4), num_samples=2))

    asyncio.run(asyncio.wait_for(scenario(), 20))
    tokens = [(v, t["kind"]) for v, t in recorder.points("thinker_pass_tokens")]
    adapters = [(v, t["kind"]) for v, t in recorder.points("thinker_pass_adapters")]
    assert tokens == [(10.0, "train"), (12.0, "train"), (4 * 2 + 3 * 2, "sample")]  # prompt rows + generated
    assert adapters == [(1.0, "train"), (2.0, "train"), (1.0, "sample")]
