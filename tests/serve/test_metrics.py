"""Metrics through Ray's Prometheus export: train and sample with the official SDK, then scrape.

A tenant of its own (a fresh API key, open mode) makes its per-tenant series start from nothing,
whatever else the session's cluster ran; the cluster exports every second (see `serve_instance`).
"""

import time
import uuid

import numpy as np
import pytest
import requests
import tinker
from prometheus_client.parser import text_string_to_metric_families
from tinker import types

from actors.metadata.tenants import open_tenant_id
from tests.conftest import TINY_LLAMA

pytestmark = pytest.mark.serve
BASE_MODEL = "tiny-a"
STEPS = 3


def scrape(port: int) -> list:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def total(samples: list, name: str, **labels: str) -> float:
    """The sum over every series of `name` with these labels (Ray adds one series per worker)."""
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(found)


def present(samples: list, name: str, **labels: str) -> list[float]:
    return [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def datum(seed: int, n: int) -> types.Datum:
    tokens = np.random.default_rng(seed).integers(0, TINY_LLAMA["vocab_size"], n + 1).tolist()
    inputs = {"target_tokens": tokens[1:], "weights": [1.0] * n}
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def test_training_and_sampling_move_the_counters_by_exactly_what_was_done(tiny_url, metrics_port):
    key = f"tml-metrics-{uuid.uuid4().hex}"
    tenant = {"base_model": BASE_MODEL, "tenant": open_tenant_id(key)}
    counted = {
        "trained": ("ray_thinker_tokens_trained_total", {**tenant, "verb": "forward_backward"}),
        "forward": ("ray_thinker_tokens_trained_total", {**tenant, "verb": "forward"}),
        "sampled": ("ray_thinker_tokens_sampled_total", tenant),
        "fb_steps": ("ray_thinker_step_latency_seconds_count", {**tenant, "verb": "forward_backward"}),
        "optim_steps": ("ray_thinker_step_latency_seconds_count", {**tenant, "verb": "optim_step"}),
        "samples": ("ray_thinker_sample_latency_seconds_count", tenant),
    }
    passes = ("ray_thinker_pass_tokens_count", {"base_model": BASE_MODEL, "kind": "train"})
    samples = scrape(metrics_port)
    before = {what: total(samples, name, **labels) for what, (name, labels) in counted.items()}
    passes_before = total(samples, passes[0], **passes[1])

    service = tinker.ServiceClient(base_url=tiny_url, api_key=key)
    try:
        check_training_and_sampling(service, metrics_port, counted, before, passes, passes_before)
    finally:
        service.close("success").result()


def check_training_and_sampling(service, metrics_port, counted, before, passes, passes_before):
    tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=0).result()
    data = [datum(1, 10), datum(2, 6)]
    tc.forward([datum(3, 5)], "cross_entropy").result()
    for _ in range(STEPS):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=5, stop=[])
    sampled = sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 2, params).result()
    generated = sum(len(sequence.tokens) for sequence in sampled.sequences)
    expected = {
        "trained": STEPS * (10 + 6),
        "forward": 5,
        "sampled": generated,
        "fb_steps": STEPS,
        "optim_steps": STEPS,
        "samples": 1,
    }

    # Each value reaches the agent within a second or two: wait until all have arrived (a value
    # past its mark ends the wait too, so that counting twice fails below instead of timing out).
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(metrics_port)
        moved = {what: total(samples, name, **labels) - before[what] for what, (name, labels) in counted.items()}
        if all(moved[what] >= expected[what] for what in expected) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert generated == 2 * 4
    assert moved == expected

    assert total(samples, passes[0], **passes[1]) - passes_before >= 1 + STEPS  # at least one pass per request
    sample_passes = present(samples, "ray_thinker_pass_adapters_count", base_model=BASE_MODEL, kind="sample")
    assert sum(sample_passes) >= 1
    buckets = present(samples, "ray_thinker_pass_tokens_bucket", base_model=BASE_MODEL, kind="train", le="+Inf")
    assert sum(buckets) == total(samples, passes[0], **passes[1])

    for gauge in ("queue_depth", "pending_futures", "adapters_resident", "adapters_offloaded"):
        values = present(samples, f"ray_thinker_{gauge}", base_model=BASE_MODEL)
        assert values, f"no ray_thinker_{gauge} for {BASE_MODEL}"
        assert all(v >= 0 for v in values), (gauge, values)
    assert total(samples, "ray_thinker_queue_depth", base_model=BASE_MODEL) < 100
    adapters = [
        total(samples, f"ray_thinker_adapters_{where}", base_model=BASE_MODEL) for where in ("resident", "offloaded")
    ]
    assert sum(adapters) >= 1  # this test's training model is live (its session is closed after)
