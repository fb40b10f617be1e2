"""Hostile and broken input against a served app: every one is a 4xx (or a failed future) with
`{error, category}`, never a 5xx; nothing wedges the model actor; a bystander tenant's model is
bit for bit untouched and keeps training. Includes a schemathesis run over the OpenAPI schema
and random, truncated and bit-flipped protobuf bodies."""

import random
import threading
import time
from pathlib import Path

import hypothesis
import numpy as np
import pytest
import requests
import schemathesis
import tinker
from hypothesis import strategies as st
from tinker import types
from tinker.proto.response_conv import deserialize_sample_response

from deployments.wire_proto import pb

pytestmark = pytest.mark.serve
MALLORY, BYSTANDER = "tml-mallory", "tml-bystander"
PROTO = {"content-type": "application/x-protobuf"}


def call(url, method, path, key=MALLORY, headers=None, **kwargs) -> requests.Response:
    headers = {"X-API-Key": key, **(headers or {})}
    return requests.request(method, f"{url}{path}", headers=headers, timeout=120, **kwargs)


def result(url, request_id, key=MALLORY) -> requests.Response:
    for _ in range(120):
        response = call(url, "POST", "/api/v1/retrieve_future", key, json={"request_id": request_id})
        if response.status_code != 408:
            return response
    raise TimeoutError(request_id)


def assert_refused(response: requests.Response, *statuses: int) -> dict:
    assert response.status_code in (statuses or (400, 401, 404, 413, 422)), (response.status_code, response.text)
    body = response.json()
    assert body["category"] == "user" and body["error"], body
    return body


def session(url, key=MALLORY) -> str:
    return call(url, "POST", "/api/v1/create_session", key, json={"tags": []}).json()["session_id"]


def model(url, key=MALLORY, seq=0, session_id=None) -> str:
    body = {"session_id": session_id or session(url, key), "model_seq_id": seq, "base_model": "tiny-a"}
    body["lora_config"] = {"rank": 2, "seed": 1}
    created = call(url, "POST", "/api/v1/create_model", key, json=body)
    return result(url, created.json()["request_id"], key).json()["model_id"]


def fb_message(model_id: str, seq_id: int, tokens=(1, 2, 3, 4)) -> pb.ForwardBackwardRequest:
    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.asarray(tokens, dtype="<i4").tobytes()
    target = datum.loss_fn_inputs["target_tokens"]
    target.dtype = pb.DTYPE_INT64
    target.shape.append(len(tokens))
    target.dense = np.asarray(tokens, dtype="<i8").tobytes()
    return msg


@pytest.fixture(scope="module")
def bystander(tiny_url):
    """A tenant training quietly: its model's log-probs are recorded before the attacks."""
    service = tinker.ServiceClient(base_url=tiny_url, api_key=BYSTANDER)
    tc = service.create_lora_training_client(base_model="tiny-a", rank=4, seed=11).result()
    datum = types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7]), loss_fn_inputs={"target_tokens": [6, 7, 8]})
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    before = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    yield tc, datum, before
    service.close("success").result()


def test_the_reported_malformed_inputs_get_4xx(tiny_url, bystander):
    url = tiny_url
    mine = model(url)
    odd_tokens = fb_message(mine, 1)
    odd_tokens.data[0].model_input[0].encoded_text.tokens = b"\x01\x02\x03"
    bomb = fb_message(mine, 2)
    sparse = bomb.data[0].loss_fn_inputs["weights"]
    sparse.dtype = pb.DTYPE_FLOAT32
    sparse.shape.extend([4, 65_000_000])
    sparse.sparse_csr.values = np.ones(1, "<f4").tobytes()
    sparse.sparse_csr.crow_indices = np.array([0, 1, 1, 1, 1], "<i8").tobytes()
    sparse.sparse_csr.col_indices = np.array([0], "<i8").tobytes()
    for msg in (odd_tokens, bomb):  # accepted, and its future fails with the reason (its seq_id is freed)
        submitted = call(url, "POST", "/api/v1/forward_backward", data=msg.SerializeToString(), headers=PROTO)
        failure = result(url, submitted.json()["request_id"]).json()
        assert failure["category"] == "user" and ("int32" in failure["error"] or "shape" in failure["error"])
    s = session(url)
    refused = [
        (
            "POST",
            "/api/v1/create_model",
            {"json": {"session_id": "nul\x00", "model_seq_id": 0, "base_model": "tiny-a"}},
        ),
        ("POST", "/api/v1/get_info", {"json": {"model_id": "\ud800"}}),
        ("POST", "/api/v1/get_info", {"json": {"model_id": "x" * 5000}}),
        (
            "POST",
            "/api/v1/create_model",
            {"json": {"session_id": s, "model_seq_id": 5, "base_model": "tiny-a", "lora_config": {"seed": 2**70}}},
        ),
        ("POST", "/api/v1/retrieve_future", {"json": {"request_id": "req-" + "9" * 400 + "-" + "0" * 32}}),
        (
            "POST",
            "/api/v1/asample",
            {"json": {"base_model": "tiny-a", "num_samples": 10**6, "prompt": {"chunks": [{"tokens": [1, 2]}]}}},
        ),
        (
            "POST",
            "/api/v1/asample",
            {
                "json": {
                    "base_model": "tiny-a",
                    "prompt": {"chunks": [{"tokens": [1]}]},
                    "sampling_params": {"temperature": -1},
                }
            },
        ),
        ("POST", "/generate", {"json": {"model_id": "tiny-a", "messages": [{"role": "user", "content": "hi"}] * 800}}),
        ("POST", "/fwdbwd", {"json": {"model_id": "chatty", "data": [[{"role": "user", "content": "x"}] * 800]}}),
        ("POST", "/api/v1/asample", {"json": {"base_model": "tiny-a", "prompt": {"chunks": [{"tokens": ["x"]}]}}}),
        ("POST", "/api/v1/asample", {"json": {"base_model": "tiny-a", "prompt": {"chunks": [{"tokens": [2**70]}]}}}),
        ("POST", "/api/v1/optim_step", {"json": {"model_id": mine, "seq_id": 2**63}}),
        ("POST", "/add_lora", {"json": {"model_id": "../../etc/evil"}}),
        ("POST", "/add_lora", {"json": {"model_id": "/abs/path"}}),
        ("POST", "/api/v1/load_weights", {"json": {"model_id": mine, "path": "tinker://../../weights/x"}}),
        ("POST", "/api/v1/save_weights", {"json": {"model_id": mine, "path": "../escape"}}),
        (
            "POST",
            "/api/v1/create_model",
            {"json": {"session_id": "../escape-session", "model_seq_id": 0, "base_model": "tiny-a"}},
        ),
    ]
    odd_version = call(url, "POST", "/api/v1/create_session", json={"tags": [], "sdk_version": "\ud800"})
    assert odd_version.status_code == 200  # stored with the lone surrogate replaced
    prompt = {"chunks": [{"tokens": [1, 2]}]}
    sampled = call(url, "POST", "/api/v1/asample", json={"base_model": "tiny-a", "prompt": prompt})
    simple = call(url, "POST", "/retrieve_future", json={"request_id": sampled.json()["request_id"]})
    assert simple.status_code in (202, 400) and (simple.status_code == 202 or simple.json()["category"] == "user")
    start = time.time()
    for method, path, kwargs in refused:
        response = call(url, method, path, **kwargs)
        if response.status_code == 200 and "request_id" in response.json():  # refused through its future
            assert result(url, response.json()["request_id"]).json()["category"] == "user", path
        else:
            assert_refused(response)
    assert time.time() - start < 30  # none of them takes the server long


def test_bodies_over_the_limit_are_refused_even_chunked(tiny_url, tiny_config):
    limit = tiny_config.max_request_bytes

    def chunks():
        for _ in range(limit // 65536 + 2):
            yield b"\x00" * 65536

    response = call(tiny_url, "POST", "/api/v1/forward_backward", data=chunks(), headers=PROTO)
    assert_refused(response, 413)
    assert_refused(
        call(tiny_url, "POST", "/api/v1/create_session", data=chunks(), headers={"content-type": "application/json"}),
        413,
        400,
    )


def test_an_unplannable_request_fails_alone_and_does_not_wedge_the_actor(tiny_url, bystander):
    mine = model(tiny_url)
    empty = pb.ForwardBackwardRequest(model_id=mine, seq_id=1, loss_fn="cross_entropy")  # zero datums
    submitted = call(tiny_url, "POST", "/api/v1/forward_backward", data=empty.SerializeToString(), headers=PROTO)
    assert "at least one datum" in result(tiny_url, submitted.json()["request_id"]).json()["error"]
    tc, datum, _ = bystander
    start = time.time()
    assert tc.forward_backward([datum], "cross_entropy").result(timeout=60).metrics["loss:sum"] > 0
    assert time.time() - start < 60


def test_nan_hyperparameters_and_temperatures_fail_only_their_own_request(tiny_url, bystander):
    mine = model(tiny_url)
    step = call(
        tiny_url,
        "POST",
        "/api/v1/optim_step",
        json={"model_id": mine, "seq_id": 1, "adam_params": {"learning_rate": "NaN"}},
    )
    if step.status_code == 200:
        failure = result(tiny_url, step.json()["request_id"])
        assert failure.status_code == 200 and failure.json()["category"] == "user"
    else:
        assert_refused(step, 400)
    prompt = {"chunks": [{"tokens": [1, 2, 3]}]}
    tiny = {"base_model": "tiny-a", "prompt": prompt, "sampling_params": {"temperature": 1e-30, "max_tokens": 3}}
    greedy = {"base_model": "tiny-a", "prompt": prompt, "sampling_params": {"temperature": 0, "max_tokens": 3}}
    answers = []

    def sample(body):
        answers.append(call(tiny_url, "POST", "/api/v1/asample", json=body))

    threads = [threading.Thread(target=sample, args=(body,)) for body in (tiny, greedy, tiny)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = [result(tiny_url, a.json()["request_id"]) for a in answers]
    assert all(r.status_code == 200 and r.headers["content-type"] == "application/x-protobuf" for r in results)
    samples = [deserialize_sample_response(r.content).sequences for r in results]
    assert (
        len({tuple(tuple(s.tokens) for s in seqs) for seqs in samples}) == 1
    )  # a near-zero temperature samples greedily
    # the same log-probs too, up to float rounding: the three may share a batch, or not
    logprobs = [np.array([s.logprobs for s in seqs]) for seqs in samples]
    assert all(np.allclose(lp, logprobs[0], rtol=0, atol=1e-5) for lp in logprobs)


def test_schemathesis_over_the_json_routes_finds_no_5xx(tiny_url, bystander):
    spec = requests.get(f"{tiny_url}/openapi.json", timeout=30).json()
    operations = [result.ok() for result in schemathesis.openapi.from_dict(spec).get_all_operations()]
    # logging out revokes the caller's own key (tested in test_sdk_account): the fuzzer keeps its key
    operations = [op for op in operations if (op.method.upper(), op.path) != ("DELETE", "/api/v1/auth/apikey/me")]
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    failures, called = [], set()

    @hypothesis.settings(
        max_examples=400, deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck)
    )
    @hypothesis.given(data=st.data())
    def fuzz(data):
        operation = data.draw(st.sampled_from(operations))
        case = data.draw(operation.as_strategy(generation_mode=data.draw(st.sampled_from(modes))))
        response = case.call(base_url=tiny_url, headers={"X-API-Key": MALLORY}, timeout=120)
        called.add((case.method, case.path))
        if (
            response.status_code >= 500
            or response.status_code in (408, 409, 429)
            and "retrieve_future" not in case.path
        ):
            failures.append((case.method, case.path, response.status_code, response.text[:300]))

    fuzz()
    assert failures == [] and len(called) >= 25  # most of the JSON routes were reached
    assert call(tiny_url, "GET", "/healthz").status_code == 200


def test_random_truncated_and_bit_flipped_protobuf_bodies_find_no_5xx(tiny_url, bystander):
    rng = random.Random(0)
    mine = model(tiny_url)
    valid = fb_message(mine, 1).SerializeToString()
    bodies = [rng.randbytes(rng.randint(0, 300)) for _ in range(60)]
    bodies += [valid[: rng.randint(0, len(valid))] for _ in range(60)]
    for _ in range(120):
        flipped = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        bodies.append(bytes(flipped))
    for body in bodies:
        response = call(tiny_url, "POST", "/api/v1/forward_backward", data=body, headers=PROTO)
        assert response.status_code < 500, response.text
        if response.status_code == 200:
            assert result(tiny_url, response.json()["request_id"]).status_code == 200
        else:
            assert_refused(response)


def test_the_bystander_is_bit_for_bit_untouched_and_keeps_training(tiny_url, bystander):
    tc, datum, before = bystander
    assert tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist() == before
    assert tc.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"] > 0
    assert tc.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["grad_norm:mean"] > 0


def test_no_id_or_name_writes_or_deletes_outside_the_checkpoint_root(tiny_url, tiny_config, tmp_path):
    root = Path(tiny_config.checkpoint_root)
    outside = root.parent / "not-thinkers"
    outside.mkdir(exist_ok=True)
    (outside / "precious.txt").write_text("keep me")

    def outside_files() -> set[Path]:  # (the test app's database file sits beside the root: not counted)
        return {p for p in root.parent.rglob("*") if root not in p.parents and not p.name.startswith(root.name)}

    before = outside_files()
    mine = model(tiny_url)
    s = session(tiny_url)
    hostile = ["../not-thinkers", "../../not-thinkers/precious.txt", "/tmp/x", "a\x00b", "\ud800", "..", "."]
    for name in hostile:
        for method, path, body in [
            ("POST", "/api/v1/save_weights", {"model_id": mine, "path": name}),
            ("POST", "/api/v1/save_weights_for_sampler", {"model_id": mine, "path": name}),
            ("POST", "/api/v1/create_model", {"session_id": name, "model_seq_id": 0, "base_model": "tiny-a"}),
            ("POST", "/add_lora", {"model_id": name}),
            ("POST", "/fwdbwd", {"model_id": name, "data": [[{"role": "user", "content": "x"}]]}),
            ("POST", "/api/v1/load_weights", {"model_id": mine, "path": f"tinker://{name}/weights/x"}),
            (
                "POST",
                "/api/v1/create_sampling_session",
                {"session_id": s, "sampling_session_seq_id": 0, "model_path": f"tinker://{mine}/weights/{name}"},
            ),
        ]:
            response = call(tiny_url, method, path, json=body)
            if response.status_code == 200 and "request_id" in response.json():
                assert result(tiny_url, response.json()["request_id"]).json()["category"] == "user"
            else:
                assert_refused(response)
        response = call(tiny_url, "DELETE", f"/api/v1/training_runs/{mine}/checkpoints/weights/{name}")
        assert response.status_code in (400, 404)
    assert outside_files() == before and (outside / "precious.txt").read_text() == "keep me"
