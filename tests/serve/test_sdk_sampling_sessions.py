"""retrieve_futures and join_sampling_session, which the server turns on in client/config: every
SDK sampling client long-polls one retrieve_futures per clone, and a client rebuilt from a pickle or
a sampler handle asks join_sampling_session for its own clone number."""

import os
import pickle
import time

import pytest
import requests
import tinker
from tinker import types

pytestmark = pytest.mark.serve
PARAMS = types.SamplingParams(max_tokens=4, seed=1, stop=[])
PROMPT = types.ModelInput.from_ints([3, 1, 4, 1, 5])


def post(tiny_url, route, body, key=None, timeout=60):
    headers = {"X-API-Key": key or os.environ["TINKER_API_KEY"]}
    return requests.post(f"{tiny_url}/api/v1/{route}", json=body, headers=headers, timeout=timeout)


def target_of(session_id, clone=0):
    return {"type": "sampling_session", "sampling_session_id": session_id, "cloned_sampler_id": clone}


def poll(tiny_url, session_id, clone=0, cursor=0, timeout=0, key=None):
    """One retrieve_futures call as the SDK's poller makes it."""
    body = {"target": target_of(session_id, clone), "prev_cursor": cursor, "timeout": timeout}
    return post(tiny_url, "retrieve_futures", body, key=key)


def test_the_sdk_samples_through_retrieve_futures_and_the_cursor_moves_on(service, tiny_url):
    assert service.holder.get_client_config().sample_use_retrieve_futures
    sampler = service.create_sampling_client(base_model="tiny-a").result()
    futures = [sampler.sample(PROMPT, 1, PARAMS) for _ in range(3)]
    results = [f.result() for f in futures]
    assert all(len(r.sequences) == 1 for r in results)
    session_id = sampler._sampling_session_id

    seen = poll(tiny_url, session_id).json()
    assert len(seen["completions"]) == 3
    assert {c["state"] for c in seen["completions"]} == {"finished"}
    assert seen["cursor"] > 0
    # nothing new after the cursor: an immediate empty answer with the same cursor
    assert poll(tiny_url, session_id, cursor=seen["cursor"]).json() == {"completions": [], "cursor": seen["cursor"]}
    # a short long-poll waits its timeout, then answers empty
    start = time.monotonic()
    assert poll(tiny_url, session_id, cursor=seen["cursor"], timeout=0.5).json()["completions"] == []
    assert time.monotonic() - start >= 0.5
    # another clone's poller sees none of these
    assert poll(tiny_url, session_id, clone=7).json()["completions"] == []


def test_another_tenants_session_is_unknown(service, tiny_url):
    sampler = service.create_sampling_client(base_model="tiny-a").result()
    sampler.sample(PROMPT, 1, PARAMS).result()
    assert poll(tiny_url, sampler._sampling_session_id, key="tml-someone-else-rf").status_code == 404
    join = {"sampling_session_id": sampler._sampling_session_id}
    assert post(tiny_url, "join_sampling_session", join, key="tml-someone-else-rf").status_code == 404
    assert post(tiny_url, "join_sampling_session", {"sampling_session_id": "nope:sample:1"}).status_code == 404


def test_rebuilt_clients_join_with_their_own_clone_numbers(service, tiny_url):
    tc = service.create_lora_training_client(base_model="tiny-a", rank=4, seed=5).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    expected = sampler.sample(PROMPT, 1, PARAMS).result().sequences[0].tokens

    unpickled = pickle.loads(pickle.dumps(sampler))
    from_handle = tinker.SamplingClient.from_sampler_handle(sampler.get_sampler_handle())
    for clone in (unpickled, from_handle):
        assert clone.sample(PROMPT, 1, PARAMS).result().sequences[0].tokens == expected
    assert {unpickled._cloned_sampler_id, from_handle._cloned_sampler_id} == {1, 2}
    session_id = sampler._sampling_session_id
    joined = post(tiny_url, "join_sampling_session", {"sampling_session_id": session_id}).json()
    assert joined == {"type": "join_sampling_session", "client_counter": 3}
    # each clone's completions are its own
    for clone in (1, 2):
        assert len(poll(tiny_url, session_id, clone=clone).json()["completions"]) == 1


def test_a_failed_sample_is_reported_failed_and_its_error_fetched(service, tiny_url):
    """The model actor refuses the request (an out-of-vocabulary id): the poller reports it failed,
    the SDK fetches the error, and the client samples on."""
    sampler = service.create_sampling_client(base_model="tiny-a").result()
    prompt = types.ModelInput.from_ints([1, 2, 3])
    target = types.TensorData(data=[9999999, 1], dtype="int64", shape=[2, 1])
    with pytest.raises(tinker.RequestFailedError, match="token ids must be in"):
        sampler.sample(prompt, 1, PARAMS, target_prompt_logprobs=target).result()
    assert len(sampler.sample(prompt, 1, PARAMS).result().sequences) == 1
    session_id = sampler._sampling_session_id
    assert [c["state"] for c in poll(tiny_url, session_id).json()["completions"]] == ["failed", "finished"]
