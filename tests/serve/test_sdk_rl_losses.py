"""The cookbook's RL losses through the official SDK: stable_reinforce over sequences this server
recorded (record_stability_info, provenance spans) and gspo with its sequence_ratio_mask."""

import numpy as np
import pytest
import tinker
from tinker import types

pytestmark = pytest.mark.serve
PROMPT = [5, 9, 14, 3, 7]


@pytest.fixture(scope="module")
def rollout(service):
    """A training client, and two sequences sampled from its own weights with record_stability_info."""
    tc = service.create_lora_training_client(base_model="tiny-a", rank=4, seed=2).result()
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    params = types.SamplingParams(max_tokens=6, seed=3, stop=[])
    sequences = sampler.sample(types.ModelInput.from_ints(PROMPT), 2, params).result().sequences
    assert all(s.sequence_id for s in sequences)
    return tc, sequences


def datum(sequence, advantage: float, spans: bool = True) -> types.Datum:
    """The cookbook's single-turn datum: prompt + sample, advantages on the sampled tokens only."""
    tokens = list(sequence.tokens)
    inputs = {
        "target_tokens": PROMPT[1:] + tokens,
        "logprobs": [0.0] * (len(PROMPT) - 1) + list(sequence.logprobs),
        "advantages": [0.0] * (len(PROMPT) - 1) + [advantage] * len(tokens),
    }
    d = types.Datum(model_input=types.ModelInput.from_ints(PROMPT + tokens[:-1]), loss_fn_inputs=inputs)
    if not spans:
        return d
    sid = sequence.sequence_id
    return d.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sid, offset=0, length=len(PROMPT)),
            types.SampledProvenanceSpan(sequence_id=sid, offset=0, length=len(tokens) - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=len(PROMPT) - 1),
            types.SampledProvenanceSpan(sequence_id=sid, offset=0, length=len(tokens)),
        ],
    )


def test_stable_reinforce_on_policy_is_reinforce_with_the_recorded_sampler_logprobs(rollout):
    """Same weights for sampler and learner: every ratio is 1 (to round-off), nothing is truncated or
    masked, and the loss is -sum(A * lp) over the sampled tokens only."""
    tc, sequences = rollout
    advantages = [1.0, -0.5]
    result = tc.forward_backward([datum(s, a) for s, a in zip(sequences, advantages)], "stable_reinforce").result()
    m = result.metrics
    assert m["sampled_tokens:sum"] == 12 and m["masked_tokens:sum"] == 0 and m["truncated_tokens:sum"] == 0
    assert m["kl_sampler:sum"] == pytest.approx(0.0, abs=1e-6)
    expected = -sum(a * sum(s.logprobs) for s, a in zip(sequences, advantages))
    assert m["loss:sum"] == pytest.approx(expected, abs=1e-4)
    learner = np.concatenate([o["logprobs"].to_numpy()[len(PROMPT) - 1 :] for o in result.loss_fn_outputs])
    np.testing.assert_allclose(learner, np.concatenate([s.logprobs for s in sequences]), atol=1e-4)
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    # after the step the learner moved: ratios differ from 1 but the recorded sampler stays the reference
    again = tc.forward_backward([datum(sequences[0], 1.0)], "stable_reinforce").result().metrics
    assert again["kl_sampler:sum"] > 1e-6


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d, s: types.Datum(model_input=d.model_input, loss_fn_inputs=d.loss_fn_inputs), "provenance spans"),
        (lambda d, s: _with_advantage_on_prompt(d, s), "not a sampled token"),
        (lambda d, s: _with_sequence_id(d, s, s.sequence_id + "9"), "unknown sequence id"),
        (lambda d, s: _with_sequence_id(d, s, "req-0-0:0"), "unknown sequence id"),
        (lambda d, s: _with_first_sampled_token(d, s), "tokens differ"),
    ],
)
def test_stable_reinforce_refuses_what_the_records_do_not_back(rollout, mutate, message):
    tc, sequences = rollout
    bad = mutate(datum(sequences[0], 1.0), sequences[0])
    with pytest.raises(tinker.RequestFailedError, match=message):
        tc.forward_backward([bad], "stable_reinforce").result()
    assert tc.forward_backward([datum(sequences[0], 1.0)], "stable_reinforce").result()  # the client goes on


def test_another_sessions_sequences_read_as_unknown(service, rollout, tiny_url):
    _, sequences = rollout
    other = tinker.ServiceClient(base_url=tiny_url)
    try:
        tc = other.create_lora_training_client(base_model="tiny-a", rank=4, seed=2).result()
        with pytest.raises(tinker.RequestFailedError, match="unknown sequence id"):
            tc.forward_backward([datum(sequences[0], 1.0)], "stable_reinforce").result()
    finally:
        other.close("success").result()


def test_gspo_through_the_sdk(rollout):
    tc, sequences = rollout
    data = []
    for s in sequences:
        d = datum(s, 1.0, spans=False)
        mask = [0.0] * (len(PROMPT) - 1) + [1.0] * len(s.tokens)
        data.append(_with_input(d, "sequence_ratio_mask", mask))
    result = tc.forward_backward(data, "gspo").result()
    assert np.isfinite(result.metrics["loss:sum"]) and "clipped_sequences:mean" in result.metrics


def _with_input(d: types.Datum, key: str, values: list[float]) -> types.Datum:
    inputs = {k: v.data for k, v in d.loss_fn_inputs.items()}
    inputs[key] = values
    return types.Datum(
        model_input=d.model_input,
        loss_fn_inputs=inputs,
        model_input_spans=d.model_input_spans,
        loss_fn_input_spans=d.loss_fn_input_spans,
    )


def _with_advantage_on_prompt(d: types.Datum, s) -> types.Datum:
    advantages = list(d.loss_fn_inputs["advantages"].data)
    advantages[0] = 1.0
    return _with_input(d, "advantages", advantages)


def _with_sequence_id(d: types.Datum, s, sequence_id: str) -> types.Datum:
    def renamed(spans):
        return [type(span)(sequence_id=sequence_id, offset=span.offset, length=span.length) for span in spans]

    return types.Datum(
        model_input=d.model_input,
        loss_fn_inputs=d.loss_fn_inputs,
        model_input_spans=renamed(d.model_input_spans),
        loss_fn_input_spans=renamed(d.loss_fn_input_spans),
    )


def _with_first_sampled_token(d: types.Datum, s) -> types.Datum:
    targets = list(d.loss_fn_inputs["target_tokens"].data)
    targets[len(PROMPT) - 1] = (targets[len(PROMPT) - 1] + 1) % 200
    return _with_input(d, "target_tokens", targets)


def test_target_prompt_logprobs_dense_and_sparse_keep_their_layout(rollout):
    """Cell [i, j] is the log-prob of id [i, j] at prompt position i + 1, the same numbers as the
    prompt's own log-probs and its top-k; -1 (dense) or unlisted (CSR) cells ask for nothing."""
    import torch

    tc, _ = rollout
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(PROMPT)
    params = types.SamplingParams(max_tokens=1, seed=1)
    reference = sampler.sample(prompt, 1, params, include_prompt_logprobs=True, topk_prompt_logprobs=3).result()
    ids = np.full((len(PROMPT) - 1, 2), -1, dtype=np.int64)
    ids[:, 0] = PROMPT[1:]  # the prompt's own next tokens
    ids[1, 1] = reference.topk_prompt_logprobs[2][1][0]  # position 2's second most likely token
    dense = sampler.sample(prompt, 1, params, target_prompt_logprobs=types.TensorData.from_numpy(ids)).result()
    got = dense.target_prompt_logprobs.to_numpy()
    assert got.shape == (len(PROMPT) - 1, 2) and dense.target_prompt_logprobs.sparse_crow_indices is None
    np.testing.assert_allclose(got[:, 0], reference.prompt_logprobs[1:], atol=1e-5)
    assert got[1, 1] == pytest.approx(reference.topk_prompt_logprobs[2][1][1], abs=1e-5)
    assert (got[[0, 2, 3], 1] == 0.0).all()

    sparse_ids = torch.tensor(ids.clip(min=0)).masked_fill(torch.tensor(ids < 0), 0).to_sparse_csr()
    sparse = types.TensorData(
        data=sparse_ids.values().tolist(),
        dtype="int64",
        shape=list(ids.shape),
        sparse_crow_indices=sparse_ids.crow_indices().tolist(),
        sparse_col_indices=sparse_ids.col_indices().tolist(),
    )
    answer = sampler.sample(prompt, 1, params, target_prompt_logprobs=sparse).result().target_prompt_logprobs
    assert answer.sparse_crow_indices == sparse.sparse_crow_indices
    assert answer.sparse_col_indices == sparse.sparse_col_indices
    np.testing.assert_allclose(np.asarray(answer.data), got[ids >= 0], atol=1e-6)


@pytest.mark.parametrize(
    "ids, message",
    [
        (np.full((len(PROMPT) - 1, 2), -1), "asks for no token id"),
        (np.zeros((len(PROMPT), 2), dtype=np.int64), "needs \\[4, K >= 1\\]"),
        (np.full((len(PROMPT) - 1, 1), 10**6), "token ids must be in"),
    ],
)
def test_target_prompt_logprobs_that_cannot_be_answered_are_user_errors(rollout, ids, message):
    tc, _ = rollout
    sampler = tc.save_weights_and_get_sampling_client().result()
    target = types.TensorData.from_numpy(np.asarray(ids, dtype=np.int64))
    with pytest.raises((tinker.BadRequestError, tinker.RequestFailedError), match=message):
        sampler.sample(
            types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=1), target_prompt_logprobs=target
        ).result()
