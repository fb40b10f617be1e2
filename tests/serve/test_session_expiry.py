"""session_expiry_s over plain HTTP: a client that went away without finishing its session (no
heartbeat for the expiry) has its session finished as expired (410 to its heartbeats and to new
models in it, `cancelled` in the sessions search) and its training models and samplers released
everywhere; a session that keeps sending heartbeats lives on."""

import time

import pytest
import requests

from configs.schema import BaseModelConfig, ThinkerConfig
from deployments.app import build_thinker_app
from tests.conftest import run_app, tiny_model_config

pytestmark = pytest.mark.serve
MODEL = "tiny-expiry"


def post(url, path, **kwargs) -> requests.Response:
    return requests.post(f"{url}/api/v1/{path}", timeout=30, **kwargs)


def result(url, request_id) -> requests.Response:
    deadline = time.monotonic() + 60
    while (answer := post(url, "retrieve_future", json={"request_id": request_id})).status_code == 408:
        assert time.monotonic() < deadline
    assert answer.status_code == 200, answer.text
    return answer


@pytest.fixture(scope="module")
def url(serve_instance, tmp_path_factory):
    folder = tmp_path_factory.mktemp("expiry")
    config = ThinkerConfig(
        checkpoint_root=str(folder / "checkpoints"),
        database_url=f"sqlite:///{folder / 'thinker.sqlite3'}",  # its own: its sweeps see no other app's sessions
        models=[BaseModelConfig(**tiny_model_config(MODEL, num_cpus=0))],
        long_poll_s=1,
        session_expiry_s=4,
    )
    return run_app(serve_instance, build_thinker_app(config), "expiry")


def test_a_session_without_heartbeats_expires_and_releases_its_models(url):
    def session() -> str:
        return post(url, "create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]

    def model(session_id: str) -> str:
        body = {"session_id": session_id, "model_seq_id": 0, "base_model": MODEL, "lora_config": {"rank": 2}}
        return result(url, post(url, "create_model", json=body).json()["request_id"]).json()["model_id"]

    quiet, alive = session(), session()
    quiet_model, alive_model = model(quiet), model(alive)
    body = {"session_id": quiet, "sampling_session_seq_id": 0, "base_model": MODEL}
    sampler = post(url, "create_sampling_session", json=body).json()["sampling_session_id"]
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}
    sample = {"sampling_session_id": sampler, "seq_id": 0, "prompt": prompt, "sampling_params": {"max_tokens": 2}}
    assert result(url, post(url, "asample", json=sample).json()["request_id"]).content  # protobuf samples
    deadline = time.monotonic() + 30
    while post(url, "get_info", json={"model_id": quiet_model}).status_code == 200:  # heartbeats drive the sweeps
        assert time.monotonic() < deadline, "the quiet session never expired"
        assert post(url, "session_heartbeat", json={"session_id": alive}).status_code == 200
        time.sleep(0.5)
    gone = post(url, "get_info", json={"model_id": quiet_model})
    assert gone.status_code == 404 and gone.json()["category"] == "user"
    finished = post(url, "session_heartbeat", json={"session_id": quiet})
    assert finished.status_code == 410 and "expired" in finished.json()["error"]
    assert post(url, "asample", json={**sample, "seq_id": 1}).status_code == 404
    again = {"session_id": quiet, "model_seq_id": 1, "base_model": MODEL, "lora_config": {"rank": 2}}
    refused = post(url, "create_model", json=again)
    assert refused.status_code == 410 and "start a new session" in refused.json()["error"]
    assert post(url, "get_info", json={"model_id": alive_model}).status_code == 200
    search = {"statuses": [{"type": "cancelled"}], "limit": 10}
    (found,) = post(url, "sessions/search", json=search).json()["sessions"]
    assert found["session_id"] == quiet and found["status"]["type"] == "cancelled"
    assert "session_expiry_s" in found["status"]["detail"]
    active = post(url, "sessions/search", json={"statuses": [{"type": "active"}], "limit": 10}).json()["sessions"]
    assert [s["session_id"] for s in active] == [alive]
