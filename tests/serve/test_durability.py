"""Nothing lost: the model actor's process is SIGKILLed in the middle of training; Serve restarts it,
it restores the training model from its durable snapshot and the request log, and the official
SDK client sees a delay, not an error, with the losses of an uninterrupted run."""

import os
import signal
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import ray
import requests
import tinker
from ray import serve
from tinker import types

from configs.schema import ThinkerConfig
from deployments.app import build_thinker_app
from examples.example_simple import retrieve
from tests.conftest import run_app, tiny_model_config

pytestmark = pytest.mark.serve
STEPS = 6


@pytest.fixture(scope="module")
def url(serve_instance, tmp_path_factory):
    folder = tmp_path_factory.mktemp("durable")
    config = ThinkerConfig(
        models=[tiny_model_config("tiny-d", batch_window_s=0.0, num_cpus=0.25)],
        checkpoint_root=str(folder / "checkpoints"),
        database_url=f"sqlite:///{folder / 'thinker.sqlite3'}",
        long_poll_s=2,
    )
    yield run_app(serve_instance, build_thinker_app(config), "durable")
    serve.delete("durable")  # its CPUs go back to the other test apps


def batch(step: int) -> list[types.Datum]:
    rng = np.random.default_rng(step)
    data = []
    for n in (7, 11):
        tokens = rng.integers(0, 256, n + 1).tolist()
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:]}
            )
        )
    return data


def model_actor_pid() -> int:
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "durable#model-0" in a["name"]]
    replica = ray.get_actor(name, namespace="serve")
    return ray.get(replica.__ray_call__.remote(lambda _: os.getpid()))


def kill_model_actor() -> None:
    os.kill(model_actor_pid(), signal.SIGKILL)


def train(url: str, kill_after: int | None = None) -> list[float]:
    service = tinker.ServiceClient(base_url=url)
    tc = service.create_lora_training_client(base_model="tiny-d", rank=4, seed=5).result()
    losses = []
    for step in range(STEPS):
        fb = tc.forward_backward(batch(step), "cross_entropy")
        optim = tc.optim_step(types.AdamParams(learning_rate=1e-2))
        if step == kill_after:
            kill_model_actor()  # both requests are in flight (or queued) when the process dies
        losses.append(fb.result().metrics["loss:sum"])
        optim.result()
    service.close("success").result()
    return losses


def test_a_killed_model_actor_comes_back_and_the_client_sees_no_error(url):
    uninterrupted = train(url)
    before = model_actor_pid()
    spill = Path(ThinkerConfig.model_fields["cache_dir"].default).expanduser() / "spill"
    assert [f for f in spill.iterdir() if f"-{before}-" in f.name]  # its sampler spill folder
    interrupted = train(url, kill_after=3)
    assert model_actor_pid() != before  # Serve did restart it
    np.testing.assert_allclose(interrupted, uninterrupted, rtol=1e-5, atol=1e-5)
    assert not [f for f in spill.iterdir() if f"-{before}-" in f.name]  # the killed process's, removed at restart


def test_a_restarted_application_continues_where_it_stopped(serve_instance, tmp_path_factory):
    folder = tmp_path_factory.mktemp("restart")
    config = ThinkerConfig(
        models=[tiny_model_config("tiny-r", batch_window_s=0.0, num_cpus=0.25)],
        checkpoint_root=str(folder / "checkpoints"),
        database_url=f"sqlite:///{folder / 'thinker.sqlite3'}",
        long_poll_s=2,
    )
    url = run_app(serve_instance, build_thinker_app(config), "restart")
    service = tinker.ServiceClient(base_url=url)
    reference = service.create_lora_training_client(base_model="tiny-r", rank=4, seed=9).result()
    resumed = service.create_lora_training_client(base_model="tiny-r", rank=4, seed=9).result()
    expected = []
    for step in range(4):
        for tc in (reference, resumed):
            if tc is resumed and step == 3:
                continue
            fb = tc.forward_backward(batch(step), "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            if tc is reference:
                expected.append(fb.result().metrics["loss:sum"])
    key = {"X-API-Key": os.environ["TINKER_API_KEY"]}
    finished = requests.post(f"{url}/add_lora", json={"model_id": "restart-probe"}, headers=key, timeout=60)
    assert finished.status_code == 200
    job = requests.post(f"{url}/optim_step", json={"model_id": "restart-probe"}, headers=key, timeout=60).json()
    first = retrieve(url, job["request_id"], headers=key)
    chat = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]]
    fwdbwd = requests.post(f"{url}/fwdbwd", json={"model_id": "restart-probe", "data": chat}, headers=key, timeout=60)
    retrieve(url, fwdbwd.json()["request_id"], headers=key)  # gradients accumulated, no step (nor snapshot) since

    serve.delete("restart")  # the whole application goes, then comes back with the same config
    url = run_app(serve_instance, build_thinker_app(config), "restart")

    info = requests.post(f"{url}/api/v1/get_info", json={"model_id": resumed.model_id}, headers=key, timeout=60)
    assert info.status_code == 200 and info.json()["model_id"] == resumed.model_id
    assert info.json()["last_seq_id"] == 6  # three steps of two requests: a client attaching numbers from 7
    assert retrieve(url, job["request_id"], headers=key) == first  # a result finished before the restart
    job = requests.post(f"{url}/optim_step", json={"model_id": "restart-probe"}, headers=key, timeout=60).json()
    assert retrieve(url, job["request_id"], headers=key)["metrics"]["grad_norm"] > 0  # the replayed gradients
    loss = resumed.forward_backward(batch(3), "cross_entropy").result().metrics["loss:sum"]
    np.testing.assert_allclose(loss, expected[3], rtol=1e-5, atol=1e-5)
    runs = (reference.model_id, resumed.model_id)
    assert all(list((folder / "checkpoints").glob(f"*/{run}/.durable/*")) for run in runs)
    service.close("success").result()  # the session ends: its models are unloaded
    serve.delete("restart")
    # an unloaded model's durable snapshots and request log go with it
    assert not [p for run in runs for p in (folder / "checkpoints").glob(f"*/{run}/.durable/*")]
    with sqlite3.connect(folder / "thinker.sqlite3") as db:
        (logged,) = db.execute(
            "SELECT count(*) FROM requests WHERE payload IS NOT NULL AND model_id IN (?, ?)", runs
        ).fetchone()
    assert logged == 0


def test_snapshot_samplers_and_pending_samples_survive_a_killed_model_actor(serve_instance, tmp_path_factory):
    """Two snapshot samplers, one written beside its model's durable snapshot, one made after it
    (its logged call makes it again); sampling requests on both in flight when the process dies:
    they complete with the same tokens as before the kill, and the samplers answer afterwards."""
    folder = tmp_path_factory.mktemp("samplers")
    config = ThinkerConfig(
        models=[tiny_model_config("tiny-d", batch_window_s=0.0, num_cpus=0.25)],
        checkpoint_root=str(folder / "checkpoints"),
        database_url=f"sqlite:///{folder / 'thinker.sqlite3'}",
        long_poll_s=2,
        snapshot_interval_s=0,
    )
    url = run_app(serve_instance, build_thinker_app(config), "durable")
    try:
        service = tinker.ServiceClient(base_url=url)
        tc = service.create_lora_training_client(base_model="tiny-d", rank=4, seed=5).result()
        tc.forward_backward(batch(0), "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        written = tc.save_weights_and_get_sampling_client().result()
        tc.forward_backward(batch(1), "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()  # its snapshot writes `written` too
        replayed = tc.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints([1, 2, 3])
        params = types.SamplingParams(max_tokens=200, seed=11, stop=[])  # long enough to be cut off by the kill

        def sample_all():
            return [s.sample(prompt, 2, params) for s in (written, replayed)]

        def tokens(futures):
            return [[seq.tokens for seq in f.result().sequences] for f in futures]

        expected = tokens(sample_all())
        assert expected[0] != expected[1]  # different weights
        before = model_actor_pid()
        in_flight = sample_all()
        kill_model_actor()
        assert tokens(in_flight) == expected
        assert model_actor_pid() != before
        assert tokens(sample_all()) == expected

        # the training model unloaded, its samplers live on: their weights are written, and come back
        key = {"X-API-Key": os.environ["TINKER_API_KEY"]}
        unload = requests.post(f"{url}/api/v1/unload_model", json={"model_id": tc.model_id}, headers=key, timeout=60)
        retrieve(url, unload.json()["request_id"], headers=key)
        before = model_actor_pid()
        kill_model_actor()
        assert tokens(sample_all()) == expected
        assert model_actor_pid() != before
        service.close("success").result()
        assert not list((folder / "checkpoints").glob("*/*/.durable-samplers/*"))  # gone with their session
    finally:
        serve.delete("durable")
