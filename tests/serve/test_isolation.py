"""Two tenants on one server (open mode: each API key is a tenant). Bob tries every route that
takes an id with Alice's ids, and every listing: he gets 404s (as for ids that do not exist) and
sees nothing of hers, and Alice's model comes out bit for bit as it was."""

import time

import numpy as np
import pytest
import requests
import tinker
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

pytestmark = pytest.mark.serve
ALICE, BOB = "tml-alice-isolation", "tml-bob-isolation"
PROTO = "application/x-protobuf"


def call(url, method, path, key, headers=None, **kwargs) -> requests.Response:
    headers = {"X-API-Key": key, **(headers or {})}
    return requests.request(method, f"{url}{path}", headers=headers, timeout=60, **kwargs)


def result(url, key, request_id) -> requests.Response:
    for _ in range(60):
        response = call(url, "POST", "/api/v1/retrieve_future", key, json={"request_id": request_id})
        if response.status_code != 408:
            return response
    raise TimeoutError(request_id)


def fb_body(model_id: str, seq_id: int) -> bytes:
    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.arange(4, dtype="<i4").tobytes()
    return msg.SerializeToString()


def probe(training_client, tokens=(5, 6, 7, 8, 9)) -> list[float]:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(list(tokens[:-1])), loss_fn_inputs={"target_tokens": list(tokens[1:])}
    )
    return training_client.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()


@pytest.fixture(scope="module")
def alice(tiny_url):
    """Alice's things: a session, a trained SDK model, two checkpoints, a sampler, a finished
    future, and an adapter made on the simple routes."""
    service = tinker.ServiceClient(base_url=tiny_url, api_key=ALICE)
    tc = service.create_lora_training_client(base_model="tiny-a", rank=4, seed=3).result()
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4]})
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    state_path = tc.save_state("alice-state").result().path
    sampler_path = tc.save_weights_for_sampler("alice-sampler").result().path
    tc.save_weights_external("alice-export").result()
    model_id = tc.model_id
    session_id = model_id.split(":")[0]
    body = {"session_id": session_id, "sampling_session_seq_id": 50, "model_path": sampler_path}
    sampler = call(tiny_url, "POST", "/api/v1/create_sampling_session", ALICE, json=body)
    assert sampler.status_code == 200, sampler.text
    added = call(tiny_url, "POST", "/add_lora", ALICE, json={"model_id": "alice-adapter", "rank": 4})
    assert added.status_code == 200, added.text
    submitted = call(tiny_url, "POST", "/api/v1/optim_step", ALICE, json={"model_id": model_id, "seq_id": 100})
    request_id = submitted.json()["request_id"]
    assert result(tiny_url, ALICE, request_id).status_code == 200
    yield {
        "client": tc,
        "model_id": model_id,
        "session_id": session_id,
        "state_path": state_path,
        "sampler_path": sampler_path,
        "sampler_id": sampler.json()["sampling_session_id"],
        "request_id": request_id,
        "logprobs": probe(tc),
    }
    service.close("success").result()


def bobs_session(url) -> str:
    return call(url, "POST", "/api/v1/create_session", BOB, json={"tags": [], "sdk_version": "t"}).json()["session_id"]


def test_every_route_that_takes_an_id_answers_404_for_another_tenants(tiny_url, alice):
    model, session, sampler = alice["model_id"], alice["session_id"], alice["sampler_id"]
    run, _, name = alice["state_path"][len("tinker://") :].split("/")
    mine = bobs_session(tiny_url)
    attempts = [
        ("POST", "/api/v1/get_info", {"json": {"model_id": model}}),
        ("POST", "/get_info", {"json": {"model_id": model}}),
        ("POST", "/api/v1/unload_model", {"json": {"model_id": model}}),
        ("POST", "/api/v1/forward_backward", {"data": fb_body(model, 7), "headers": {"content-type": PROTO}}),
        ("POST", "/api/v1/optim_step", {"json": {"model_id": model, "seq_id": 7}}),
        ("POST", "/api/v1/save_weights", {"json": {"model_id": model, "path": "stolen"}}),
        ("POST", "/api/v1/save_weights_for_sampler", {"json": {"model_id": model, "path": "stolen"}}),
        ("POST", "/api/v1/load_weights", {"json": {"model_id": model, "path": alice["state_path"]}}),
        (
            "POST",
            "/api/v1/load_weights",
            {"json": {"session_id": mine, "model_seq_id": 0, "path": alice["state_path"]}},
        ),
        ("POST", "/api/v1/create_model", {"json": {"session_id": session, "model_seq_id": 9, "base_model": "tiny-a"}}),
        ("POST", "/api/v1/create_sampling_session", {"json": {"session_id": session, "sampling_session_seq_id": 9}}),
        (
            "POST",
            "/api/v1/create_sampling_session",
            {"json": {"session_id": mine, "sampling_session_seq_id": 0, "model_path": alice["sampler_path"]}},
        ),
        ("GET", f"/api/v1/samplers/{sampler}", {}),
        ("POST", "/api/v1/asample", {"json": {"sampling_session_id": sampler, "prompt": {"chunks": []}}}),
        ("POST", "/api/v1/retrieve_future", {"json": {"request_id": alice["request_id"]}}),
        ("POST", "/retrieve_future", {"json": {"request_id": alice["request_id"]}}),
        ("POST", "/api/v1/session_heartbeat", {"json": {"session_id": session}}),
        ("POST", f"/api/v1/sessions/{session}/finish", {"json": {}}),
        ("GET", f"/api/v1/training_runs/{run}", {}),
        ("GET", f"/api/v1/training_runs/{run}/checkpoints", {}),
        ("DELETE", f"/api/v1/training_runs/{run}/checkpoints/weights/{name}", {}),
        ("DELETE", f"/api/v1/training_runs/{run}/checkpoints/external_weights/alice-export", {}),
        ("PUT", f"/api/v1/training_runs/{run}/checkpoints/weights/{name}/ttl", {"json": {"ttl_seconds": 3600}}),
        (
            "GET",
            f"/api/v1/training_runs/{run}/checkpoints/external_weights/alice-export/external_weights_urls",
            {},
        ),
        ("POST", "/api/v1/save_weights_external", {"json": {"model_id": model, "path": "stolen"}}),
        ("POST", "/api/v1/weights_info", {"json": {"tinker_path": alice["state_path"]}}),
        ("POST", "/optim_step", {"json": {"model_id": "alice-adapter"}}),
        ("DELETE", "/adapters/alice-adapter", {}),
        ("POST", "/remove_lora", {"json": {"model_id": "alice-adapter"}}),
        ("POST", "/generate", {"json": {"model_id": "alice-adapter", "prompt": "hi"}}),
        ("POST", "/generate", {"json": {"model_id": sampler, "prompt": "hi"}}),
    ]
    for method, path, kwargs in attempts:
        response = call(tiny_url, method, path, BOB, **kwargs)
        assert response.status_code == 404, (path, response.status_code, response.text)
        assert response.json()["category"] == "user"
    # a name Alice holds cannot be taken over (the adapter's data are not touched)
    for path, body in [
        ("/add_lora", {"model_id": "alice-adapter"}),
        ("/fwdbwd", {"model_id": "alice-adapter", "data": [[{"role": "user", "content": "x"}]]}),
    ]:
        response = call(tiny_url, "POST", path, BOB, json=body)
        assert response.status_code == 400 and "taken" in response.json()["error"], response.text


def test_listings_show_only_ones_own(tiny_url, alice):
    mine = bobs_session(tiny_url)
    body = {"session_id": mine, "model_seq_id": 0, "base_model": "tiny-a", "lora_config": {"rank": 2}}
    created = call(tiny_url, "POST", "/api/v1/create_model", BOB, json=body).json()["request_id"]
    bob_model = result(tiny_url, BOB, created).json()["model_id"]
    runs = call(tiny_url, "GET", "/api/v1/training_runs?limit=100", BOB).json()
    assert [r["training_run_id"] for r in runs["training_runs"]] == [bob_model]
    assert runs["cursor"]["total_count"] == 1
    assert call(tiny_url, "GET", "/api/v1/checkpoints", BOB).json()["checkpoints"] == []
    assert [a["model_id"] for a in call(tiny_url, "GET", "/adapters", BOB).json()["adapters"]] == [bob_model]
    alice_runs = call(tiny_url, "GET", "/api/v1/training_runs?limit=100", ALICE).json()["training_runs"]
    assert bob_model not in {r["training_run_id"] for r in alice_runs}
    assert alice["model_id"] in {r["training_run_id"] for r in alice_runs}
    alice_checkpoints = call(tiny_url, "GET", "/api/v1/checkpoints", ALICE).json()["checkpoints"]
    assert {c["tinker_path"] for c in alice_checkpoints} >= {alice["state_path"], alice["sampler_path"]}


def test_alices_model_is_untouched_and_keeps_training(tiny_url, alice):
    time.sleep(0.5)
    assert probe(alice["client"]) == alice["logprobs"]
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4]})
    assert alice["client"].forward_backward([datum], "cross_entropy").result().metrics["loss:sum"] > 0
    info = call(tiny_url, "POST", "/api/v1/weights_info", ALICE, json={"tinker_path": alice["state_path"]})
    assert info.status_code == 200 and info.json()["lora_rank"] == 4


def test_sampling_the_same_base_model_with_the_same_seq_id_never_shares_a_result(tiny_url):
    from deployments.wire_proto import pb

    lengths = {}
    for key, prompt in ((ALICE, [1, 2, 3]), (BOB, [4, 5, 6, 7, 8, 9])):
        body = {"base_model": "tiny-a", "seq_id": 4242, "prompt": {"chunks": [{"tokens": prompt}]}}
        body.update(prompt_logprobs=True, sampling_params={"max_tokens": 2, "temperature": 0})
        submitted = call(tiny_url, "POST", "/api/v1/asample", key, json=body)
        answer = pb.SampleResponse.FromString(result(tiny_url, key, submitted.json()["request_id"]).content)
        lengths[key] = len(answer.prompt_logprobs) // 4
    assert lengths == {ALICE: 3, BOB: 6}  # Bob got his own result, not Alice's
