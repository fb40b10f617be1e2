"""Sampling through the official SDK: sampling clients, parameters, logprobs, stop reasons."""

import numpy as np
import pytest
import tinker
from tinker import types

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def trained(service):
    """A training client that learned one reply, and its tokenizer."""
    tc = service.create_lora_training_client(base_model="tiny-a", rank=16, seed=0).result()
    tokenizer = tc.get_tokenizer()
    prompt = chat_prompt(tokenizer).to_ints()
    ids = prompt + tokenizer("pong<|im_end|>", add_special_tokens=False)["input_ids"]
    weights = [0.0] * (len(prompt) - 1) + [1.0] * (len(ids) - len(prompt))  # learn the reply only
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:], "weights": weights}
    )
    for _ in range(40):
        tc.forward_backward([datum], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-3))
    tc.forward([datum], "cross_entropy").result()
    return tc, tokenizer, tc.save_weights_and_get_sampling_client().result()


def chat_prompt(tokenizer, content="ping") -> types.ModelInput:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return types.ModelInput.from_ints(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_snapshot_sampler_reproduces_what_was_trained(trained):
    tc, tokenizer, sampler = trained
    result = sampler.sample(chat_prompt(tokenizer), 1, types.SamplingParams(max_tokens=10, temperature=0)).result()
    (sequence,) = result.sequences
    assert tokenizer.decode(sequence.tokens) == "pong<|im_end|>"  # the EOS stop token is included
    assert sequence.stop_reason == "stop"
    assert all(lp <= 0 for lp in sequence.logprobs) and len(sequence.logprobs) == len(sequence.tokens)


def test_snapshot_is_frozen_while_training_goes_on(trained, service):
    _, tokenizer, _ = trained
    tc = service.create_lora_training_client(base_model="tiny-a", rank=4, seed=1).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    before = sampler.compute_logprobs(chat_prompt(tokenizer)).result()
    tc.forward_backward(
        [types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4]})],
        "cross_entropy",
    )
    tc.optim_step(types.AdamParams(learning_rate=1e-1)).result()
    assert sampler.compute_logprobs(chat_prompt(tokenizer)).result() == before


def test_sampling_parameters_and_stop_reasons(trained):
    _, tokenizer, sampler = trained
    prompt = chat_prompt(tokenizer, "hello there")
    params = types.SamplingParams(max_tokens=5, temperature=1.0, top_p=0.95, top_k=50, seed=7, stop=[])
    first = sampler.sample(prompt, 4, params).result()
    again = sampler.sample(prompt, 4, params).result()
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert all(s.stop_reason == "length" and len(s.tokens) == 5 for s in first.sequences)
    greedy = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=0, stop=[])).result()
    stop_id = greedy.sequences[0].tokens[2]
    stopped = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=0, stop=[stop_id])).result()
    expected = greedy.sequences[0].tokens[: greedy.sequences[0].tokens.index(stop_id) + 1]
    assert stopped.sequences[0].tokens == expected and stopped.sequences[0].stop_reason == "stop"
    by_string = sampler.sample(
        chat_prompt(tokenizer), 1, types.SamplingParams(max_tokens=8, temperature=0, stop="on")
    ).result()
    assert tokenizer.decode(by_string.sequences[0].tokens) == "pon"


def test_compute_logprobs_equal_the_training_forward(trained):
    tc, tokenizer, _ = trained
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = chat_prompt(tokenizer)
    logprobs = sampler.compute_logprobs(prompt).result()
    assert logprobs[0] is None and len(logprobs) == prompt.length
    tokens = prompt.to_ints()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:]}
    )
    forward = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    np.testing.assert_allclose(logprobs[1:], forward, atol=1e-4)


def test_topk_prompt_logprobs(trained):
    _, tokenizer, sampler = trained
    prompt = chat_prompt(tokenizer)
    response = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True, topk_prompt_logprobs=2
    ).result()
    assert response.topk_prompt_logprobs[0] is None
    assert len(response.topk_prompt_logprobs[1]) == 2
    assert response.topk_prompt_logprobs[1][0][1] >= response.prompt_logprobs[1] - 1e-5


def test_base_model_sampler_and_sampler_info(service, tiny_url):
    sampler = service.create_sampling_client(base_model="tiny-b").result()
    result = sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 2, types.SamplingParams(max_tokens=3)).result()
    assert len(result.sequences) == 2 and all(len(s.tokens) <= 3 for s in result.sequences)


def test_unsupported_sampling_option_is_a_user_error(service):
    sampler = service.create_sampling_client(base_model="tiny-a").result()
    with pytest.raises(tinker.BadRequestError, match="topk_sample_logprobs"):
        sampler.sample(
            types.ModelInput.from_ints([5, 6]), 1, types.SamplingParams(max_tokens=2), topk_sample_logprobs=2
        ).result()


def test_cancel_future_stops_a_running_sample_and_its_batch_mates_finish(tiny_url):
    """cancel_future (turned on in dynamic_config): the cancelled sample's rows stop at the next
    token and its future fails as a user error; the samples batched with it run to the end;
    another tenant cannot cancel it."""
    import os

    import requests

    key = {"X-API-Key": os.environ["TINKER_API_KEY"]}

    def post(path, body, headers=key):
        return requests.post(f"{tiny_url}/api/v1/{path}", json=body, headers=headers, timeout=60)

    session = post("create_session", {"tags": [], "sdk_version": "0.38.0"}).json()["session_id"]
    sampler = post(
        "create_sampling_session", {"session_id": session, "sampling_session_seq_id": 0, "base_model": "tiny-a"}
    )
    sampler_id = sampler.json()["sampling_session_id"]
    long = {"max_tokens": 200, "stop": [], "seed": 1}
    ids = [
        post(
            "asample",
            {
                "sampling_session_id": sampler_id,
                "prompt": {"chunks": [{"tokens": [1, 2, 3]}]},
                "num_samples": 4,
                "sampling_params": long,
            },
        ).json()["request_id"]
        for _ in range(3)
    ]
    assert post("cancel_future", {"request_id": ids[0]}, {"X-API-Key": "tml-not-the-owner"}).status_code == 404
    assert post("cancel_future", {"request_id": ids[0]}).status_code == 200

    def outcome(request_id):
        while True:
            answer = post("retrieve_future", {"request_id": request_id})
            if answer.status_code != 408:
                return answer

    cancelled = outcome(ids[0])
    assert cancelled.status_code == 200 and cancelled.json()["category"] == "user"
    assert "cancelled" in cancelled.json()["error"]
    for request_id in ids[1:]:
        done = outcome(request_id)
        assert done.status_code == 200 and done.headers["content-type"] == "application/x-protobuf"
    assert post("cancel_future", {"request_id": ids[1]}).status_code == 200  # finished: left alone
    assert outcome(ids[1]).headers["content-type"] == "application/x-protobuf"
