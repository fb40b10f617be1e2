"""The Ray-native client (deployments/ray_client.py) against the tiny app, from this Ray driver:
the same training as the official SDK over HTTP, Ray-native futures, the same errors and rules."""

import asyncio

import numpy as np
import pytest
import ray
import tinker
from tinker import types

from configs.errors import AuthenticationError, NotFoundError
from deployments.ray_client import RayFuture, connect
from tests.conftest import TINY_LLAMA

pytestmark = pytest.mark.serve
VOCAB = TINY_LLAMA["vocab_size"]
ADAM = types.AdamParams(learning_rate=1e-2)


def datum(seed: int, n: int = 12) -> types.Datum:
    tokens = np.random.default_rng(seed).integers(0, VOCAB, n + 1).tolist()
    inputs = {"target_tokens": tokens[1:], "weights": [1.0] * n}
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def losses_of(client, steps: int, wait_each: bool) -> list[float]:
    """forward_backward + optim_step `steps` times; unless `wait_each`, every call is sent before
    any result is read (the SDK's futures and the Ray client's both have .result())."""
    pending = []
    for step in range(steps):
        pending.append(client.forward_backward([datum(step), datum(100 + step)], "cross_entropy"))
        pending.append(client.optim_step(ADAM))
        if wait_each:
            pending[-1].result()
    return [f.result().metrics["loss:sum"] for f in pending[0::2]]


@pytest.fixture(scope="module")
def ray_service(tiny_url):
    client = connect("tiny", api_key="tml-ray-client-a")
    yield client
    client.close()


def test_training_over_ray_matches_the_sdk_over_http(ray_service, tiny_url):
    """Same seed, same data: the Ray client's losses equal the SDK's, although every call of the
    Ray client was sent before any result was read (seq_ids keep them in order)."""
    sdk = tinker.ServiceClient(base_url=tiny_url, api_key="tml-ray-client-a")
    try:
        over_http = sdk.create_lora_training_client("tiny-a", rank=4, seed=7).result()
        expected = losses_of(over_http, steps=4, wait_each=True)
    finally:
        sdk.close("success").result()
    over_ray = ray_service.create_lora_training_client("tiny-a", rank=4, seed=7)
    got = losses_of(over_ray, steps=4, wait_each=False)
    assert expected[-1] < expected[0]  # it trained
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_futures_are_ray_object_refs_with_result(ray_service):
    model = ray_service.create_lora_training_client("tiny-a", rank=4)
    future = model.forward([datum(1)])
    assert isinstance(future, RayFuture) and isinstance(future, ray.ObjectRef)
    ready, _ = ray.wait([future], timeout=60)
    assert len(ready) == 1
    by_get, by_result = ray.get(future), future.result()
    assert isinstance(by_get, types.ForwardBackwardOutput)
    assert by_get.loss_fn_outputs[0]["logprobs"].tolist() == by_result.loss_fn_outputs[0]["logprobs"].tolist()

    async def awaited():
        return await model.forward([datum(1)])

    again = asyncio.run(awaited())
    assert again.loss_fn_outputs[0]["logprobs"].tolist() == by_get.loss_fn_outputs[0]["logprobs"].tolist()
    assert [o.metrics["loss:sum"] for o in ray.get([model.forward([datum(s)]) for s in range(3)])]

    @ray.remote(num_cpus=0)
    def first_loss(futures: dict) -> float:  # futures inside a container go into a task as refs
        return ray.get(futures["fb"][0]).metrics["loss:sum"]

    inside = {"fb": [model.forward([datum(1)])]}
    assert ray.get(first_loss.remote(inside)) == by_get.metrics["loss:sum"]


def test_sampling_from_the_trained_adapter_and_from_the_base_model(ray_service):
    model = ray_service.create_lora_training_client("tiny-a", rank=4)
    model.forward_backward([datum(3)]).result()
    model.optim_step(ADAM).result()
    sampler = model.save_weights_and_get_sampling_client("ray-client-sampler")
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=3)
    prompt = types.ModelInput.from_ints([5, 6, 7])
    response = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
    assert isinstance(response, types.SampleResponse) and len(response.sequences) == 2
    assert all(len(s.tokens) == 6 and all(0 <= t < VOCAB for t in s.tokens) for s in response.sequences)
    base = ray_service.create_sampling_client(base_model="tiny-a")
    assert len(base.sample(prompt, 1, params).result().sequences) == 1


def test_checkpoints_save_and_load_through_ray(ray_service):
    model = ray_service.create_lora_training_client("tiny-a", rank=4, seed=1)
    model.forward_backward([datum(4)]).result()
    model.optim_step(ADAM).result()
    path = model.save_state("ray-client-state").result().path
    assert path.startswith("tinker://")
    before = model.forward([datum(5)]).result().metrics["loss:sum"]
    model.forward_backward([datum(6)]).result()
    model.optim_step(ADAM).result()
    assert model.forward([datum(5)]).result().metrics["loss:sum"] != pytest.approx(before, rel=1e-7)
    model.load_state_with_optimizer(path).result()
    assert model.forward([datum(5)]).result().metrics["loss:sum"] == pytest.approx(before, rel=1e-6)


def test_a_bad_request_fails_alone_with_the_sdk_error_and_the_model_goes_on(ray_service):
    model = ray_service.create_lora_training_client("tiny-a", rank=4)
    bad = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, VOCAB + 50]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
    )
    failing = model.forward_backward([bad])
    fine = model.forward_backward([datum(8)])
    with pytest.raises(tinker.RequestFailedError) as failed:
        failing.result()
    assert failed.value.category == types.RequestErrorCategory.User and "token ids" in failed.value.message
    with pytest.raises(tinker.RequestFailedError):
        ray.get(failing)  # Ray's wrapper is also the request's error
    assert np.isfinite(fine.result().metrics["loss:sum"])
    with pytest.raises(tinker.RequestFailedError, match="no-such-loss"):
        model.forward_backward([datum(9)], loss_fn="no-such-loss").result()
    assert np.isfinite(model.forward_backward([datum(9)]).result().metrics["loss:sum"])


def test_another_tenant_cannot_reach_a_model_and_attaching_keeps_numbering(ray_service, tiny_url):
    model = ray_service.create_lora_training_client("tiny-a", rank=4, seed=2)
    first = model.forward([datum(10)]).result().metrics["loss:sum"]
    model.forward_backward([datum(11)]).result()
    model.optim_step(ADAM).result()
    stranger = connect("tiny", api_key="tml-ray-client-b")
    try:
        with pytest.raises(NotFoundError):
            stranger.attach_training_client(model.model_id)
    finally:
        stranger.close()
    # the same tenant again (a notebook kernel restarted): requests are numbered after the last one,
    # so they run (a reused seq_id would be answered with an earlier request's result)
    again = connect("tiny", api_key="tml-ray-client-a").attach_training_client(model.model_id)
    assert again.get_info().model_id == model.model_id
    after = again.forward([datum(10)]).result().metrics["loss:sum"]
    assert after != pytest.approx(first, rel=1e-7)


def test_a_key_the_server_refuses_is_an_authentication_error(keys_app_name):
    with pytest.raises(AuthenticationError):
        connect(keys_app_name, api_key="tml-never-issued")


@pytest.fixture(scope="module")
def keys_app_name(serve_instance, tmp_path_factory):
    from configs.schema import BaseModelConfig, ThinkerConfig
    from deployments.app import build_thinker_app
    from tests.conftest import database_file, run_app
    from tests.fakes import FakeBackend

    root = str(tmp_path_factory.mktemp("ray-client-keys"))
    config = ThinkerConfig(
        models=[BaseModelConfig(name="fake", num_cpus=0)],
        checkpoint_root=root,
        database_url=database_file(root),
        auth={"mode": "keys"},
    )
    run_app(serve_instance, build_thinker_app(config, backend_factory=FakeBackend), "raykeys")
    yield "raykeys"
    from ray import serve

    serve.delete("raykeys")


def test_the_ray_client_keeps_its_session_alive_with_heartbeats(tiny_config, monkeypatch):
    """As the SDK does: a notebook's session is not expired while its client lives."""
    import time

    import deployments.ray_client as ray_client
    from actors.metadata.database import Database
    from actors.metadata.registry import Registry
    from actors.metadata.tenants import open_tenant_id

    monkeypatch.setattr(ray_client, "HEARTBEAT_S", 0.2)
    key = "tml-ray-client-heartbeat"
    client = connect("tiny", api_key=key)
    database = Database(tiny_config.database_url)
    try:
        registry, deadline = Registry(database), time.monotonic() + 30
        while registry.session(open_tenant_id(key), client.session_id).last_seen_at is None:
            assert time.monotonic() < deadline, "no heartbeat was recorded"
            time.sleep(0.2)
    finally:
        client.close()
        database.close()
