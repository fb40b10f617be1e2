"""The original server's JSON routes: shapes, errors, and adapters shared with the SDK."""

import os

import pytest
import requests
import tinker
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from examples.example_simple import retrieve

pytestmark = pytest.mark.serve
CHAT = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]


def test_loss_functions_and_health(tiny_url):
    listed = requests.get(f"{tiny_url}/loss_functions").json()
    assert listed["available_loss_functions"][:5] == ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"]
    assert set(listed["descriptions"]) == set(listed["available_loss_functions"])
    assert requests.get(f"{tiny_url}/healthz").json() == {
        "status": "ok",
        "models": {"tiny-a": "ready", "tiny-b": "ready"},
    }
    assert requests.get(f"{tiny_url}/get_server_capabilities").json()["supported_models"][0]["model_name"] == "tiny-a"


def test_bad_requests_get_4xx_json(tiny_url):
    submitted = requests.post(f"{tiny_url}/fwdbwd", json={"model_id": "m-bad", "data": CHAT, "loss_fn": "nope"}).json()
    failed = requests.post(f"{tiny_url}/retrieve_future", json={"request_id": submitted["request_id"]})
    assert failed.status_code == 400 and "unknown loss" in failed.json()["error"]
    assert requests.post(f"{tiny_url}/fwdbwd", json={"model_id": "m", "data": "not a list"}).status_code == 400
    body = {"model_id": "m-bad", "data": [[{"role": "user"}]], "loss_fn": "cross_entropy"}
    job = requests.post(f"{tiny_url}/api/v1/forward_backward", json=body).json()
    assert requests.post(f"{tiny_url}/retrieve_future", json={"request_id": job["request_id"]}).status_code == 400
    assert requests.post(f"{tiny_url}/optim_step", json={"model_id": "nobody"}).status_code == 404
    assert requests.post(f"{tiny_url}/generate", json={"prompt": "x", "messages": []}).status_code == 400
    assert requests.post(f"{tiny_url}/generate", json={"model_id": "nobody", "prompt": "x"}).status_code == 404
    assert requests.post(f"{tiny_url}/remove_lora", json={"model_id": "nobody"}).status_code == 404
    assert requests.get(f"{tiny_url}/healthz").status_code == 200


def test_adapters_are_shared_with_the_sdk(tiny_url):
    """With the same API key (one tenant), adapters made on either side are usable on the other."""
    key = {"X-API-Key": os.environ["TINKER_API_KEY"]}
    created = requests.post(
        f"{tiny_url}/add_lora", json={"model_id": "shared", "base_model": "tiny-b", "rank": 4}, headers=key
    )
    assert created.json() == {"model_id": "shared", "base_model": "tiny-b", "rank": 4}
    assert requests.post(f"{tiny_url}/add_lora", json={"model_id": "shared"}, headers=key).status_code == 400
    request = types.ForwardBackwardRequest(  # the SDK's own wire format, on the JSON route's adapter
        forward_backward_input=types.ForwardBackwardInput(
            data=[
                types.Datum(
                    model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4]}
                )
            ],
            loss_fn="cross_entropy",
        ),
        model_id="shared",
        seq_id=1,
    )
    body = forward_backward_request_to_proto(request).SerializeToString()
    job = requests.post(
        f"{tiny_url}/api/v1/forward_backward", data=body, headers={"content-type": "application/x-protobuf", **key}
    )
    assert retrieve(tiny_url, job.json()["request_id"], headers=key)["loss"] > 0

    service = tinker.ServiceClient(base_url=tiny_url)
    sdk_model = service.create_lora_training_client(base_model="tiny-a", rank=4).result().get_info().model_id
    job = requests.post(f"{tiny_url}/fwdbwd", json={"model_id": sdk_model, "data": CHAT}, headers=key).json()
    result = retrieve(tiny_url, job["request_id"], headers=key)
    assert result["metrics"]["num_tokens"] > 0 and result["loss"] == pytest.approx(
        result["metrics"]["mean_nll"] * result["metrics"]["num_tokens"], rel=1e-5
    )
    adapters = {a["model_id"]: a for a in requests.get(f"{tiny_url}/adapters", headers=key).json()["adapters"]}
    assert adapters["shared"]["base_model"] == "tiny-b" and sdk_model in adapters
    assert requests.delete(f"{tiny_url}/adapters/shared", headers=key).json() == {"deleted": "shared"}
    assert "shared" not in {a["model_id"] for a in requests.get(f"{tiny_url}/adapters", headers=key).json()["adapters"]}
    service.close("success").result()


def test_generate_from_a_base_model_and_an_adapter(tiny_url):
    base = requests.post(f"{tiny_url}/generate", json={"prompt": "abc", "max_tokens": 4, "temperature": 0}).json()
    assert base["model_id"] == "tiny-a" and len(base["tokens"][0]) <= 4
    again = requests.post(f"{tiny_url}/api/v1/sample", json={"prompt": "abc", "max_tokens": 4, "temperature": 0}).json()
    assert again["tokens"] == base["tokens"]
    two = requests.post(
        f"{tiny_url}/generate",
        json={"model_id": "tiny-b", "messages": [{"role": "user", "content": "hi"}], "num_samples": 2, "seed": 1},
    ).json()
    assert len(two["texts"]) == 2 and len(two["logprobs"][1]) == len(two["tokens"][1])
