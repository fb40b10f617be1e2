"""The official tinker SDK, unmodified, against a real Serve app of Thinker (tiny models)."""

import math
import time

import numpy as np
import pytest
import requests
import tinker
from tinker import types

from tests.conftest import TINY_LLAMA

pytestmark = pytest.mark.serve
VOCAB = TINY_LLAMA["vocab_size"]


@pytest.fixture(scope="module")
def url(tiny_url):
    return tiny_url


@pytest.fixture(scope="module")
def service(url):
    client = tinker.ServiceClient(base_url=url)
    yield client
    client.close("success").result()


def datum(seed: int, n: int = 10, **extra) -> types.Datum:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, n + 1).tolist()
    inputs = {"target_tokens": tokens[1:], "weights": [1.0] * n, **extra}
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def logprobs_of(output) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].data, dtype=np.float64) for o in output.loss_fn_outputs]


def test_capabilities_list_every_base_model(url):
    caps = tinker.RestClient(base_url=url).get_server_capabilities().result()
    assert [(m.model_name, m.trainable) for m in caps.supported_models] == [("tiny-a", True), ("tiny-b", True)]


def test_create_model_and_get_info(service):
    tc = service.create_lora_training_client(base_model="tiny-b", rank=4, seed=3).result()
    info = tc.get_info()
    assert info.model_data.model_name == "tiny-b"
    assert info.lora_rank == 4
    assert info.model_id.endswith(":train:" + info.model_id.rsplit(":", 1)[1])


def test_forward_backward_each_loss_matches_its_formula(service):
    tc = service.create_lora_training_client(base_model="tiny-a", rank=4, seed=0).result()
    data = [datum(1), datum(2, n=6)]
    forward = tc.forward(data, "cross_entropy").result()
    lp = logprobs_of(forward)
    assert forward.metrics["loss:sum"] == pytest.approx(-sum(x.sum() for x in lp), rel=1e-5)

    rng = np.random.default_rng(0)
    q = [x + rng.normal(0, 0.1, x.shape) for x in lp]
    adv = [rng.normal(size=x.shape) for x in lp]
    rl_data = [
        types.Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "logprobs": qi.tolist(),
                "advantages": ai.tolist(),
            },
        )
        for d, qi, ai in zip(data, q, adv)
    ]
    ratio = [np.exp(x - qi) for x, qi in zip(lp, q)]
    expected = {
        "importance_sampling": -sum((r * a).sum() for r, a in zip(ratio, adv)),
        "ppo": -sum(np.minimum(r * a, np.clip(r, 0.9, 1.1) * a).sum() for r, a in zip(ratio, adv)),
        "cispo": -sum((np.clip(r, 0.8, 1.2) * x * a).sum() for r, x, a in zip(ratio, lp, adv)),
        "dro": -sum((x * a - 0.5 * 0.1 * (x - qi) ** 2).sum() for x, qi, a in zip(lp, q, adv)),
    }
    configs = {"ppo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, "dro": {"beta": 0.1}}
    for loss_fn, value in expected.items():
        out = tc.forward_backward(rl_data, loss_fn, configs.get(loss_fn)).result()
        assert out.metrics["loss:sum"] == pytest.approx(value, rel=1e-4, abs=1e-4), loss_fn
        for got, want in zip(logprobs_of(out), lp):
            np.testing.assert_allclose(got, want, atol=1e-5)
    out = tc.forward_backward(data, "cross_entropy").result()
    assert out.metrics["loss:sum"] == pytest.approx(forward.metrics["loss:sum"], rel=1e-5)
    assert tc.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm:mean"] > 0


def test_forward_backward_custom_uses_client_side_loss(service):
    tc = service.create_lora_training_client(base_model="tiny-a", rank=4, seed=0).result()
    data = [datum(3)]

    def squared_logprob_loss(data, logprobs_list):
        loss = sum((lp**2).sum() for lp in logprobs_list)
        return loss, {"custom_thing:sum": 1.0}

    out = tc.forward_backward_custom(data, squared_logprob_loss).result()
    lp = logprobs_of(tc.forward(data, "cross_entropy").result())
    assert out.metrics["loss:sum"] == pytest.approx(sum((x**2).sum() for x in lp), rel=1e-4)
    # the server's surrogate -sum(w * lp) with w = -d(loss)/d(lp) = -2 lp
    assert out.metrics["surrogate_loss:sum"] == pytest.approx(sum((2 * x * x).sum() for x in lp), rel=1e-4)
    assert out.metrics["custom_thing:sum"] == 1.0
    assert tc.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm:mean"] > 0


def test_optim_step_lowers_the_loss(service):
    tc = service.create_lora_training_client(base_model="tiny-b", rank=8, seed=0).result()
    data = [datum(i, n=16) for i in range(4)]
    losses = []
    for _ in range(15):
        fb = tc.forward_backward(data, "cross_entropy")
        op = tc.optim_step(types.AdamParams(learning_rate=1e-2))
        losses.append(fb.result().metrics["loss:sum"])
        op.result()
    assert losses[-1] < 0.7 * losses[0], losses


def test_pipelined_submissions_run_in_order(service):
    tc = service.create_lora_training_client(base_model="tiny-a", rank=4, seed=5).result()
    data = [datum(7)]
    base = logprobs_of(tc.forward(data, "cross_entropy").result())
    futures = [
        tc.forward(data, "cross_entropy"),
        tc.forward_backward(data, "cross_entropy"),
        tc.optim_step(types.AdamParams(learning_rate=5e-2)),
        tc.forward(data, "cross_entropy"),
        tc.forward_backward(data, "cross_entropy"),
    ]
    first, fb, _, after, fb_after = [f.result() for f in futures]
    np.testing.assert_allclose(logprobs_of(first)[0], base[0], atol=1e-6)
    np.testing.assert_allclose(logprobs_of(fb)[0], base[0], atol=1e-6)
    assert not np.allclose(logprobs_of(after)[0], base[0], atol=1e-4)
    np.testing.assert_allclose(logprobs_of(fb_after)[0], logprobs_of(after)[0], atol=1e-6)


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda: datum(1, target_tokens=[1, 2, 3]), r"shape \[3\] must be \[10\]"),
        (lambda: datum(1, target_tokens=[VOCAB + 5] * 10), "outside"),
        (lambda: datum(1, weights=[math.nan] * 10), "NaN"),
    ],
)
def test_malformed_datum_fails_the_future_and_the_client_keeps_working(service, bad, match):
    tc = service.create_lora_training_client(base_model="tiny-a", rank=4, seed=0).result()
    with pytest.raises(tinker.RequestFailedError, match=match) as info:
        tc.forward_backward([datum(0), bad()], "cross_entropy").result()
    assert info.value.category == "user" or getattr(info.value.category, "value", None) == "user"
    out = tc.forward_backward([datum(0)], "cross_entropy").result()
    assert out.metrics["loss:sum"] > 0
    assert tc.optim_step(types.AdamParams(learning_rate=1e-3)).result() is not None


def test_unknown_loss_and_bad_config_fail_with_user_errors(service):
    tc = service.create_lora_training_client(base_model="tiny-a", rank=4, seed=0).result()
    with pytest.raises(tinker.RequestFailedError, match="unknown loss"):
        tc.forward_backward([datum(0)], "crossentropy").result()
    with pytest.raises(tinker.RequestFailedError, match="beta"):
        tc.forward_backward([datum(0, logprobs=[0.0] * 10, advantages=[1.0] * 10)], "dro").result()
    assert tc.forward([datum(0)], "cross_entropy").result().metrics["loss:sum"] > 0


def test_unknown_base_model_is_not_found(service):
    with pytest.raises(tinker.NotFoundError):
        service.create_lora_training_client(base_model="no-such-model", rank=4).result()


def test_two_base_models_train_independently(service):
    a = service.create_lora_training_client(base_model="tiny-a", rank=4, seed=0).result()
    b = service.create_lora_training_client(base_model="tiny-b", rank=4, seed=0).result()
    data = [datum(11)]
    la = logprobs_of(a.forward(data, "cross_entropy").result())[0]
    lb = logprobs_of(b.forward(data, "cross_entropy").result())[0]
    assert not np.allclose(la, lb)  # different random base weights


def test_retried_submission_is_executed_once(url):
    """The same (model_id, seq_id) posted twice accumulates its gradient once."""
    from tinker.proto.request_conv import forward_backward_request_to_proto

    def fresh_model() -> str:
        sid = requests.post(f"{url}/api/v1/create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
        body = {"session_id": sid, "model_seq_id": 0, "base_model": "tiny-a", "lora_config": {"rank": 4, "seed": 1}}
        rid = requests.post(f"{url}/api/v1/create_model", json=body).json()["request_id"]
        return poll(url, rid).json()["model_id"]

    def fb_body(model_id: str) -> bytes:
        request = types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(data=[datum(4)], loss_fn="cross_entropy"),
            model_id=model_id,
            seq_id=1,
        )
        return forward_backward_request_to_proto(request).SerializeToString()

    norms = []
    for posts in (1, 2):
        model_id = fresh_model()
        ids = {
            requests.post(
                f"{url}/api/v1/forward_backward",
                data=fb_body(model_id),
                headers={"content-type": "application/x-protobuf"},
            ).json()["request_id"]
            for _ in range(posts)
        }
        for rid in ids:
            assert poll(url, rid).status_code == 200
        step = {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 1e-3}}
        rid = requests.post(f"{url}/api/v1/optim_step", json=step).json()["request_id"]
        norms.append(poll(url, rid).json()["metrics"]["grad_norm:mean"])
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)


def poll(url: str, request_id: str, deadline_s: float = 60) -> requests.Response:
    end = time.time() + deadline_s
    while time.time() < end:
        response = requests.post(f"{url}/api/v1/retrieve_future", json={"request_id": request_id})
        if response.status_code != 408:
            return response
    raise TimeoutError(request_id)
