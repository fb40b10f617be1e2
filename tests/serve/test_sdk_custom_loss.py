"""Server-side custom losses through the official SDK: `create_custom_loss` uploads the traced graph
(the server turns on `custom_loss_server_side`), and `forward_backward_custom` with the handle is one
forward+backward on the server, with the same losses, metrics and gradients as the SDK's client-side
path. Hostile graphs and foreign loss ids fail as user errors."""

import dataclasses
import os

import numpy as np
import pytest
import requests
import tinker
import torch
from tinker import types

pytestmark = pytest.mark.serve


def clipped_pg(logprobs, advantages, sampler_logprobs):
    ratio = torch.exp(logprobs - sampler_logprobs)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    objective = torch.minimum(ratio * advantages, clipped * advantages)
    return -objective.sum(), {
        "custom/clipped:mean": (ratio != clipped).float().mean(),
        "custom/tokens:sum": (advantages != 0).float().sum(),
    }


RANKS = {"logprobs": 1, "advantages": 1, "sampler_logprobs": 1}


def batch(seed: int = 0) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    data = []
    for n in (6, 9, 4):
        tokens = rng.integers(1, 100, size=n + 1).tolist()
        inputs = {
            "target_tokens": tokens[1:],
            "advantages": rng.normal(size=n).round(3).astype(np.float32),
            "sampler_logprobs": (-rng.random(n) * 6).round(3).astype(np.float32),
        }
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs))
    return data


@pytest.fixture(scope="module")
def handle(service):
    """The loss, created once: the SDK refuses to create the same traced loss twice in a session."""
    return service.create_custom_loss(clipped_pg, RANKS).result()


def test_server_side_matches_the_client_side_path(service, handle):
    assert handle.loss_id, "the server turned custom_loss_server_side on, so the SDK uploaded the graph"
    client_side = dataclasses.replace(handle, loss_id=None)  # the SDK's own forward + forward_backward path
    server_tc = service.create_lora_training_client(base_model="tiny-a", rank=4, seed=11).result()
    local_tc = service.create_lora_training_client(base_model="tiny-a", rank=4, seed=11).result()
    adam = types.AdamParams(learning_rate=1.0, eps=1.0)  # eps 1: the step is about lr * gradient

    for step in range(2):
        data = batch(step)
        server = server_tc.forward_backward_custom(data, handle).result()
        local = local_tc.forward_backward_custom(data, client_side).result()
        for key in ("custom/clipped:mean", "custom/tokens:sum"):
            assert server.metrics[key] == pytest.approx(local.metrics[key], abs=1e-5)
        for a, b in zip(server.loss_fn_outputs, local.loss_fn_outputs):
            np.testing.assert_allclose(a["logprobs"].to_numpy(), b["logprobs"].to_numpy(), atol=1e-5)
        expected_loss = sum(
            clipped_pg(
                torch.tensor(out["logprobs"].to_numpy()),
                torch.tensor(d.loss_fn_inputs["advantages"].to_numpy()),
                torch.tensor(d.loss_fn_inputs["sampler_logprobs"].to_numpy()),
            )[0].item()
            for out, d in zip(server.loss_fn_outputs, data)
        )
        assert server.metrics["loss:sum"] == pytest.approx(expected_loss, abs=1e-4)
        server_step = server_tc.optim_step(adam).result()
        local_step = local_tc.optim_step(adam).result()
        assert server_step.metrics["grad_norm:mean"] > 0
        assert server_step.metrics["grad_norm:mean"] == pytest.approx(local_step.metrics["grad_norm:mean"], rel=1e-5)

    probe = batch(7)
    after_server = server_tc.forward(probe, "cross_entropy").result()
    after_local = local_tc.forward(probe, "cross_entropy").result()
    for a, b in zip(after_server.loss_fn_outputs, after_local.loss_fn_outputs):
        np.testing.assert_allclose(a["logprobs"].to_numpy(), b["logprobs"].to_numpy(), atol=1e-5)


def test_a_loss_id_serves_its_own_session_only(handle, tiny_url):
    other = tinker.ServiceClient(base_url=tiny_url)
    try:
        tc = other.create_lora_training_client(base_model="tiny-a", rank=4).result()
        with pytest.raises(tinker.RequestFailedError, match="unknown loss_id"):
            tc.forward_backward(batch(), "custom", {"loss_id": handle.loss_id}).result()
        with pytest.raises(tinker.RequestFailedError, match="unknown loss_id"):
            tc.forward_backward(batch(), "custom", {"loss_id": "no-such-loss"}).result()
        tc.forward_backward(batch(), "cross_entropy").result()  # the client goes on
    finally:
        other.close("success").result()


def create_raw(tiny_url, session_id, seq, graph, inputs=None):
    """POST create_custom_loss as the SDK does, then the future's answer."""
    key = {"X-API-Key": os.environ["TINKER_API_KEY"]}
    body = {
        "session_id": session_id,
        "custom_loss_seq_id": seq,
        "name": "evil",
        "inputs": inputs or [{"name": "logprobs", "rank": 1}],
        "graph": graph,
        "type": "create_custom_loss",
    }
    response = requests.post(f"{tiny_url}/api/v1/create_custom_loss", json=body, headers=key, timeout=30)
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    answer = requests.post(f"{tiny_url}/api/v1/retrieve_future", json={"request_id": request_id}, headers=key)
    assert answer.status_code == 200
    return answer.json()


OUT = {"dict": {}}  # no metrics


def graph_calling(target, *args, op="call_function"):
    return {
        "format": 1,
        "nodes": [
            {"op": "placeholder", "name": "logprobs", "target": "logprobs", "args": [], "kwargs": {}},
            {"op": op, "name": "x", "target": target, "args": list(args), "kwargs": {}},
            {"op": "call_method", "name": "loss", "target": "sum", "args": [{"ref": "logprobs"}], "kwargs": {}},
            {
                "op": "output",
                "name": "output",
                "target": "output",
                "args": [{"tuple": [{"ref": "loss"}, {"dict": {}}]}],
            },
        ],
    }


@pytest.mark.parametrize(
    "graph",
    [
        graph_calling("builtins.__import__", "os"),
        graph_calling("builtins.eval", "__import__('os').system('true')"),
        graph_calling("builtins.open", "/etc/passwd"),
        graph_calling("torch.load", "/etc/passwd"),
        graph_calling("subprocess.run", ["true"]),
        graph_calling("__reduce__", {"ref": "logprobs"}, op="call_method"),
        graph_calling("getattr", {"ref": "logprobs"}, "__class__"),
    ],
    ids=["import", "eval", "open", "torch.load", "subprocess", "dunder-method", "dunder-attribute"],
)
def test_hostile_graphs_fail_their_future_as_user_errors(service, tiny_url, graph):
    session_id = service.holder.get_session_id()
    answer = create_raw(tiny_url, session_id, 1000 + hash(str(graph)) % 1000, graph)
    assert answer.get("category") == "user", answer
    assert "may" in answer["error"] or "attribute" in answer["error"]


def test_a_good_raw_upload_is_idempotent_per_seq(service, tiny_url):
    session_id = service.holder.get_session_id()
    graph = graph_calling("torch.exp", {"ref": "logprobs"})
    first = create_raw(tiny_url, session_id, 5000, graph)
    assert first["loss_id"] and create_raw(tiny_url, session_id, 5000, graph) == first
    other = graph_calling("torch.log", {"ref": "logprobs"})
    assert create_raw(tiny_url, session_id, 5000, other)["category"] == "user"
