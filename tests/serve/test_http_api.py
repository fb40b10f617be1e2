"""The HTTP surface with a fake backend: errors, long-polls, replicas, TTL, ordering holes."""

import threading
import time

import numpy as np
import pytest
import requests

from configs.schema import BaseModelConfig, ThinkerConfig
from deployments.app import build_thinker_app
from deployments.wire_proto import pb
from tests.conftest import database_file, run_app
from tests.fakes import FakeBackend

pytestmark = pytest.mark.serve
PROTO = {"content-type": "application/x-protobuf"}


@pytest.fixture(scope="module")
def url(serve_instance, checkpoint_root):
    config = ThinkerConfig(
        checkpoint_root=checkpoint_root,
        database_url=database_file(checkpoint_root),
        models=[BaseModelConfig(name="fake", num_cpus=0, seq_gap_timeout_s=30)],
        ingress_replicas=2,
        long_poll_s=1,
        future_ttl_s=4,
        max_request_bytes=4096,
    )
    return run_app(serve_instance, build_thinker_app(config, backend_factory=FakeBackend), "fake")


def post(url, path, **kwargs):
    return requests.post(f"{url}/api/v1/{path}", timeout=30, **kwargs)


def new_model(url, session_id=None) -> str:
    session_id = session_id or post(url, "create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
    body = {"session_id": session_id, "model_seq_id": 0, "base_model": "fake", "lora_config": {"rank": 2}}
    return result(url, post(url, "create_model", json=body).json()["request_id"]).json()["model_id"]


def result(url, request_id, deadline_s=30) -> requests.Response:
    end = time.time() + deadline_s
    while time.time() < end:
        response = post(url, "retrieve_future", json={"request_id": request_id})
        if response.status_code != 408:
            return response
    raise TimeoutError(request_id)


def fb_body(model_id, seq_id, delay_s=0.0, image=False) -> bytes:
    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    msg.loss_fn_config_v2["fake_delay_s"].number = delay_s
    chunk = msg.data.add().model_input.add()
    if image:
        chunk.image.data = b"not text"
    else:
        chunk.encoded_text.tokens = np.arange(4, dtype="<i4").tobytes()
    return msg.SerializeToString()


def assert_user_error(response, status):
    assert response.status_code == status
    body = response.json()
    assert body["category"] == "user" and body["error"]


def test_malformed_input_gets_4xx_json_and_the_server_keeps_serving(url):
    assert_user_error(post(url, "forward_backward", data=b"\xff\xfe garbage", headers=PROTO), 400)
    assert_user_error(post(url, "create_model", data=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_user_error(post(url, "create_model", json={"session_id": "s"}), 400)
    assert_user_error(post(url, "forward_backward", data=fb_body("nobody:train:0", 1), headers=PROTO), 404)
    assert_user_error(post(url, "optim_step", json={"model_id": "nobody:train:0", "seq_id": 1}), 404)
    assert_user_error(post(url, "retrieve_future", json={"request_id": "req-unknown"}), 404)
    assert_user_error(post(url, "forward_backward", data=b"x" * 5000, headers=PROTO), 413)
    body = {"session_id": "s", "model_seq_id": 0, "base_model": "fake", "optimizer_config": {"type": "dimuon"}}
    assert_user_error(post(url, "create_model", json=body), 400)
    load = {
        "session_id": "s",
        "model_seq_id": 1,
        "path": "tinker://r/weights/x",
        "optimizer_config": {"type": "dimuon"},
    }
    response = post(url, "load_weights", json=load)  # never silently trained with AdamW
    assert_user_error(response, 400)
    assert "dimuon" in response.json()["error"]
    assert requests.get(f"{url}/api/v1/healthz").json() == {"status": "ok", "models": {"fake": "ready"}}


def test_long_poll_holds_then_answers_try_again_without_blocking_others(url):
    model_id = new_model(url)
    request_id = post(url, "forward_backward", data=fb_body(model_id, 1, delay_s=3), headers=PROTO).json()["request_id"]
    polled = {}

    def first_poll():
        start = time.time()
        polled["response"] = post(url, "retrieve_future", json={"request_id": request_id})
        polled["seconds"] = time.time() - start

    thread = threading.Thread(target=first_poll)
    thread.start()
    time.sleep(0.2)
    start = time.time()
    for _ in range(5):
        assert requests.get(f"{url}/api/v1/healthz").status_code == 200
    assert time.time() - start < 0.9  # answered while the poll is held
    thread.join()
    assert polled["response"].status_code == 408
    assert polled["response"].json() == {"type": "try_again", "request_id": request_id, "queue_state": "active"}
    assert 0.9 <= polled["seconds"] < 3
    assert result(url, request_id).status_code == 200


def test_result_is_retrievable_from_any_replica_and_again_until_the_ttl(url):
    model_id = new_model(url)
    request_id = post(url, "forward_backward", data=fb_body(model_id, 1), headers=PROTO).json()["request_id"]
    replicas, bodies = set(), set()
    for _ in range(30):
        response = result(url, request_id)
        assert response.status_code == 200 and response.headers["content-type"] == "application/x-protobuf"
        replicas.add(response.headers["x-thinker-replica"])
        bodies.add(response.content)
    assert len(replicas) == 2 and len(bodies) == 1
    time.sleep(4.5)
    assert_user_error(post(url, "retrieve_future", json={"request_id": request_id}), 404)


def test_rejected_submission_fails_its_future_and_frees_its_seq_id(url):
    model_id = new_model(url)
    bad = post(url, "forward_backward", data=fb_body(model_id, 1, image=True), headers=PROTO).json()["request_id"]
    failure = result(url, bad).json()
    assert failure["category"] == "user" and "image" in failure["error"]
    start = time.time()
    good = post(url, "forward_backward", data=fb_body(model_id, 2), headers=PROTO).json()["request_id"]
    assert result(url, good).status_code == 200
    assert time.time() - start < 5  # did not wait out the 30 s gap timeout for seq 1


def test_unload_model_and_session_finish(url):
    model_id = new_model(url)
    unload = post(url, "unload_model", json={"model_id": model_id}).json()["request_id"]
    assert result(url, unload).json() == {"type": "unload_model", "model_id": model_id}
    assert_user_error(post(url, "get_info", json={"model_id": model_id}), 404)

    session_id = post(url, "create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
    model_id = new_model(url, session_id)
    assert post(url, "get_info", json={"model_id": model_id}).json()["model_id"] == model_id
    assert post(url, f"sessions/{session_id}/finish", json={"reason": {"type": "success"}}).status_code == 200
    assert_user_error(post(url, "get_info", json={"model_id": model_id}), 404)


def test_session_routes_answer_what_the_sdk_expects(url):
    assert post(url, "client/config", json={"sdk_version": "0.38.0"}).json()["use_pyqwest_transport"] is False
    assert post(url, "client/dynamic_config", json={}).json() == {
        "sample_cancel_enabled": True,
        "sample_cancel_max_batch_size": 64,
    }
    session_id = post(url, "create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
    for _ in range(2):  # the second is answered from the replica's memory of owned sessions
        assert post(url, "session_heartbeat", json={"session_id": session_id}).json() == {"type": "session_heartbeat"}
    other_tenant = {"X-API-Key": "tml-someone-else"}  # open mode: another key is another tenant
    assert_user_error(post(url, "session_heartbeat", json={"session_id": session_id}, headers=other_tenant), 404)
    assert_user_error(post(url, "session_heartbeat", json={"session_id": "never-made"}), 404)
    assert post(url, "telemetry", json={"events": []}).json() == {"status": "accepted"}


def test_diverged_metrics_encode_as_null_instead_of_failing_the_answer(url):
    model_id = new_model(url)
    body = {"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": 5.0}}
    request_id = post(url, "optim_step", json=body).json()["request_id"]
    assert result(url, request_id).json()["metrics"] == {"grad_norm:mean": None, "update:mean": None}
    simple = requests.post(f"{url}/optim_step", json={"model_id": model_id, "adam_params": {"learning_rate": 5.0}})
    answer = requests.post(f"{url}/retrieve_future", json={"request_id": simple.json()["request_id"]}, timeout=30)
    assert answer.status_code == 200 and answer.json() == {"metrics": {"grad_norm": None, "update": None}}


def test_results_outlive_the_ingress_replica_that_took_the_request(url):
    """SIGKILL the replica that accepted requests while they run: any replica still answers them."""
    import os
    import signal

    import ray

    model_id = new_model(url)
    accepted = []
    for seq_id in range(1, 7):
        response = post(url, "forward_backward", data=fb_body(model_id, seq_id, delay_s=0.2), headers=PROTO)
        accepted.append((response.json()["request_id"], response.headers["x-thinker-replica"]))
    victim = accepted[0][1]
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(f"#{victim}")]
    replica = ray.get_actor(name, namespace="serve")
    os.kill(ray.get(replica.__ray_call__.remote(lambda _: os.getpid())), signal.SIGKILL)
    for request_id, _ in accepted:
        response = result(url, request_id, deadline_s=120)
        assert response.status_code == 200 and response.headers["content-type"] == "application/x-protobuf"
