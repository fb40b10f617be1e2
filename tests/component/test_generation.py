"""Batched generation: mixed adapters in one batch equal each alone; sampling controls; stops."""

import numpy as np
import pytest
import torch

from actors.hf.backend import HFBackend
from actors.work import CreateModelWork, LoraSpec, SampleWork, SamplingParams
from configs.errors import UserError
from configs.schema import BaseModelConfig
from tests.conftest import TINY_LLAMA

VOCAB = TINY_LLAMA["vocab_size"]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    be = HFBackend(BaseModelConfig(name="tiny", random_init=TINY_LLAMA, torch_threads=2), cache)
    for model_id, seed in (("a", 1), ("b", 2)):
        be.create_model(CreateModelWork(model_id, LoraSpec(rank=4, seed=seed)))
        with torch.no_grad():  # non-zero B, so each adapter really changes the outputs
            for w in be.adapters.get(model_id).weights.values():
                w.B.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return be


def prompt(seed, n=6):
    return np.random.default_rng(seed).integers(0, 256, n)


def work(sampler_id, prompt_seed, **params):
    return SampleWork(sampler_id, None, prompt(prompt_seed), params=SamplingParams(**{"max_tokens": 8, **params}))


def tokens(result):
    return [s.tokens.tolist() for s in result.sequences]


def test_mixed_adapter_batch_equals_each_request_alone(backend):
    works = [
        work("a", 0, temperature=0),
        work("b", 1, temperature=0),
        work("tiny", 2, temperature=0),
        work("a", 3, temperature=0.8, seed=5),
    ]
    together = backend.sample(works)
    alone = [backend.sample([w])[0] for w in works]
    assert [tokens(r) for r in together] == [tokens(r) for r in alone]
    for r1, r2 in zip(together, alone):
        np.testing.assert_allclose(r1.sequences[0].logprobs, r2.sequences[0].logprobs, atol=1e-4)
    assert tokens(together[0]) != tokens(backend.sample([work("b", 0, temperature=0)])[0])  # adapters differ


def test_sampled_logprobs_are_the_models_own(backend):
    from actors.work import Datum, ForwardBackwardWork

    result = backend.sample([work("a", 4, temperature=1.0, seed=1, stop_at_eos=False)])[0]
    sampled = result.sequences[0]
    sequence = np.concatenate([prompt(4), sampled.tokens])
    datum = Datum(sequence[:-1], {"target_tokens": sequence[1:]})
    forward = backend.forward_backward(ForwardBackwardWork("a", None, [datum], "cross_entropy", forward_only=True))
    np.testing.assert_allclose(
        forward.loss_fn_outputs[0]["logprobs"][-len(sampled.tokens) :], sampled.logprobs, atol=1e-4
    )


def test_same_seed_same_output_and_samples_differ(backend):
    first = backend.sample(
        [SampleWork("a", None, prompt(5), num_samples=3, params=SamplingParams(max_tokens=8, seed=9))]
    )
    again = backend.sample(
        [SampleWork("a", None, prompt(5), num_samples=3, params=SamplingParams(max_tokens=8, seed=9))]
    )
    assert tokens(first[0]) == tokens(again[0])
    assert len({tuple(t) for t in tokens(first[0])}) > 1


def test_top_k_one_is_greedy(backend):
    greedy = backend.sample([work("a", 6, temperature=0)])[0]
    top1 = backend.sample([work("a", 6, temperature=1.5, top_k=1, seed=3)])[0]
    tiny_p = backend.sample([work("a", 6, temperature=1.5, top_p=1e-6, seed=4)])[0]
    assert tokens(greedy) == tokens(top1) == tokens(tiny_p)


def test_stop_tokens_and_strings_end_the_sequence_and_are_included(backend):
    free = backend.sample([work("a", 7, temperature=0, max_tokens=12, stop_at_eos=False)])[0].sequences[0]
    assert free.stop_reason == "length" and len(free.tokens) == 12
    stop_token = int(free.tokens[3])
    stopped = backend.sample([work("a", 7, temperature=0, max_tokens=12, stop_tokens=(stop_token,))])[0].sequences[0]
    first = free.tokens.tolist().index(stop_token)
    assert stopped.stop_reason == "stop" and stopped.tokens.tolist() == free.tokens[: first + 1].tolist()
    text = backend.tokenizer.decode(free.tokens[:5].tolist())
    if text:
        stop_string = text[-1]
        by_string = backend.sample([work("a", 7, temperature=0, max_tokens=12, stop_strings=(stop_string,))])[0]
        seq = by_string.sequences[0]
        assert seq.stop_reason == "stop" and stop_string in backend.tokenizer.decode(seq.tokens.tolist())
        assert stop_string not in backend.tokenizer.decode(seq.tokens[:-1].tolist())


def test_prompt_logprobs_and_top_k(backend):
    w = SampleWork(
        "b", None, prompt(8), params=SamplingParams(max_tokens=1), prompt_logprobs=True, topk_prompt_logprobs=3
    )
    result = backend.sample([w])[0]
    assert np.isnan(result.prompt_logprobs[0]) and np.all(np.isfinite(result.prompt_logprobs[1:]))
    assert result.topk_prompt_ids.shape == (6, 3)
    assert np.all(result.topk_prompt_logprobs[1:, 0] >= result.prompt_logprobs[1:] - 1e-5)  # top-1 is the max
    assert result.topk_prompt_logprobs[0, 0] == -99999.0


def test_bad_requests_fail_alone(backend):
    good = work("a", 9, temperature=0)
    results = backend.sample(
        [
            SampleWork("a", None, np.array([VOCAB + 1])),
            good,
            work("a", 9, temperature=-1.0),
            work("nobody", 9),
        ]
    )
    assert isinstance(results[0], UserError) and "prompt token" in str(results[0])
    assert tokens(results[1]) == tokens(backend.sample([good])[0])
    assert isinstance(results[2], UserError)
    assert "nobody" in str(results[3])


def test_a_request_that_cannot_be_sampled_fails_alone(backend):
    good = work("a", 0, temperature=0)
    bad = work("b", 1, temperature=float("nan"))
    tiny = work("a", 0, temperature=1e-30)  # divides to infinity: sampled greedily instead
    outcomes = backend.sample([good, bad, tiny])
    assert isinstance(outcomes[1], UserError) and "finite temperature" in str(outcomes[1])
    assert tokens(outcomes[0]) == tokens(outcomes[2]) == tokens(backend.sample([good])[0])


def test_a_row_whose_sampling_breaks_fails_only_its_own_request():
    from actors.generation import GenRow, RowState, sample_step
    from actors.work import SamplingParams

    rows = [
        GenRow("", np.arange(3), SamplingParams(temperature=1.0), 4, frozenset(), torch.Generator().manual_seed(i))
        for i in range(2)
    ]
    states = [RowState(), RowState()]
    logits = torch.zeros(2, 8)
    logits[1] = float("nan")  # no probability distribution at all in row 1
    sample_step(logits, rows, states, decode=None)
    assert states[0].error is None and len(states[0].tokens) == 1
    assert states[1].error is not None and states[1].stop_reason == "error" and states[1].tokens == []


def test_finite_logits_that_overflow_at_the_temperature_are_the_users_error():
    """A diverged adapter with huge but finite logits and a low temperature: no 500, a user error that
    says why, and the batch-mate samples on (found by schemathesis over /generate)."""
    from actors.generation import GenRow, RowState, sample_step
    from actors.work import SamplingParams

    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=2e-5)]
    rows = [GenRow("", np.arange(3), p, 4, frozenset(), torch.Generator().manual_seed(0)) for p in params]
    states = [RowState(), RowState()]
    logits = torch.zeros(2, 8)
    logits[1, 0], logits[1, 1] = 3e38, -3e38  # finite, but divided by 2e-5 they are not
    sample_step(logits, rows, states, decode=None)
    assert states[0].error is None and len(states[0].tokens) == 1
    assert isinstance(states[1].error, UserError) and "temperature" in str(states[1].error)
