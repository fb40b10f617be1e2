"""Continuous batching (actors.decoding): requests that join and leave a running batch sample the
same tokens as each alone; chunked prefill; rows leave at once; a bad request fails alone."""

import numpy as np
import pytest
import torch

from actors.hf.backend import HFBackend
from actors.hf.packed_attention import FOLDED_STEP
from actors.work import CreateModelWork, LoraSpec, SampleResult, SampleWork, SamplingParams
from configs.errors import ServerError, ThinkerError, UserError
from configs.schema import BaseModelConfig
from tests.conftest import TINY_LLAMA


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    config = BaseModelConfig(name="tiny", random_init=TINY_LLAMA, torch_threads=2, max_sample_rows=12)
    be = HFBackend(config, cache)
    for model_id, seed in (("a", 1), ("b", 2)):
        be.create_model(CreateModelWork(model_id, LoraSpec(rank=4, seed=seed)))
        with torch.no_grad():  # non-zero B, so each adapter really changes the outputs
            for w in be.adapters.get(model_id).weights.values():
                w.B.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return be


def engine(backend, chunk=512, max_rows=12, fold=True):
    return backend.decode_engine(max_rows=max_rows, max_adapters=8, prefill_chunk_tokens=chunk, fold_prefill=fold)


def work(sampler_id, prompt_seed, length=6, n=1, tenant=None, **params):
    prompt = np.random.default_rng(prompt_seed).integers(0, 256, length)
    params = SamplingParams(**{"max_tokens": 10, "stop_at_eos": False, "temperature": 1.0, "seed": 7, **params})
    return SampleWork(sampler_id, None, prompt, num_samples=n, params=params, tenant=tenant)


def drive(eng, arrivals: dict[int, list[tuple[str, SampleWork]]]) -> tuple[dict, dict]:
    """Run the engine a step at a time, submitting each step's arrivals first; every request's
    outcome and the step at which it came back."""
    results, done_at, step = {}, {}, 0
    total = sum(len(a) for a in arrivals.values())
    while len(results) < total:
        for name, w in arrivals.get(step, []):
            eng.submit(w, name)
        finished = []
        eng.step(finished)
        for name, outcome in finished:
            results[name], done_at[name] = outcome, step
        step += 1
        assert step < 500, "the engine stopped making progress"
    return results, done_at


def tokens(result: SampleResult):
    return [s.tokens.tolist() for s in result.sequences]


WORKS = {
    "a-long": work("a", 0, length=20, n=3, max_tokens=16),
    "b-short": work("b", 1, length=3, n=2, max_tokens=4, seed=3),
    "base": work("tiny", 2, length=9, n=1, max_tokens=12, temperature=0.7),
    "a-greedy": work("a", 3, length=5, n=2, max_tokens=9, temperature=0),
    "b-topk": work("b", 4, length=14, n=4, max_tokens=7, top_k=5, top_p=0.9),
}


APART = pytest.mark.parametrize("fold", [True, False], ids=["folded", "apart"])  # prompts in the decode forward or not


@APART
def test_requests_joining_a_running_batch_sample_what_each_samples_alone(backend, fold):
    arrivals = {0: [("a-long", WORKS["a-long"])], 2: [("b-short", WORKS["b-short"]), ("base", WORKS["base"])]}
    arrivals[5] = [("a-greedy", WORKS["a-greedy"])]
    arrivals[6] = [("b-topk", WORKS["b-topk"])]
    together, _ = drive(engine(backend, fold=fold), arrivals)
    for name, w in WORKS.items():
        (alone,) = backend.sample([w])  # the static path, this request by itself
        assert tokens(together[name]) == tokens(alone), name
        for mine, its in zip(together[name].sequences, alone.sequences):
            np.testing.assert_allclose(mine.logprobs, its.logprobs, atol=5e-4)  # fp32 in other batch shapes
            assert mine.stop_reason == its.stop_reason


@APART
def test_chunked_prefill_gives_the_same_samples_and_prompt_scores(backend, fold, monkeypatch):
    w = work("a", 5, length=23, n=2, max_tokens=6)
    w.prompt_logprobs, w.topk_prompt_logprobs = True, 3
    other = work("b", 6, length=4, max_tokens=20)
    calls = record_forwards(backend, monkeypatch)
    chunked, _ = drive(engine(backend, chunk=5, fold=fold), {0: [("other", other)], 1: [("w", w)]})
    if fold:  # each chunk rides in a decode step of "other"
        assert [c for c in calls if c[2]] == [("fold", 0, (4,)), *[("fold", 1, (5,))] * 4, ("fold", 1, (3,))]
    monkeypatch.undo()
    (alone,) = backend.sample([w])
    assert tokens(chunked["w"]) == tokens(alone)
    np.testing.assert_allclose(chunked["w"].prompt_logprobs, alone.prompt_logprobs, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(chunked["w"].topk_prompt_ids, alone.topk_prompt_ids)
    np.testing.assert_allclose(chunked["w"].topk_prompt_logprobs, alone.topk_prompt_logprobs, rtol=1e-4, atol=1e-5)
    assert tokens(chunked["other"]) == tokens(backend.sample([other])[0])


def test_a_short_request_leaves_without_waiting_for_a_long_one(backend):
    eng = engine(backend)
    results, done_at = drive(
        eng, {0: [("long", work("a", 7, max_tokens=40))], 3: [("short", work("b", 8, max_tokens=2))]}
    )
    assert done_at["short"] <= 3 + 1  # its prefill (in step 3's forward) samples the first token, step 4 the second
    assert done_at["long"] == 39  # step 0 prefills and samples the first token, each later step one more
    assert len(results["long"].sequences[0].tokens) == 40
    assert eng.running_rows == 0 and not eng.busy


def test_rows_wait_for_room_and_then_join(backend):
    eng = engine(backend, max_rows=4)
    arrivals = {0: [("first", work("a", 9, n=3, max_tokens=12)), ("second", work("b", 10, n=3, max_tokens=3))]}
    results, done_at = drive(eng, arrivals)
    assert done_at["second"] > done_at["first"]  # 3 + 3 rows > 4: the second waited for room
    for name in ("first", "second"):
        assert tokens(results[name]) == tokens(backend.sample([arrivals[0][["first", "second"].index(name)][1]])[0])


@APART
def test_a_bad_request_fails_alone(backend, fold):
    bad = work("a", 11)
    bad.prompt = np.array([1, 2, 10_000])
    missing = work("nobody", 12)
    results, _ = drive(engine(backend, fold=fold), {0: [("good", work("b", 13)), ("bad", bad), ("missing", missing)]})
    assert isinstance(results["bad"], UserError)
    assert isinstance(results["missing"], ThinkerError)
    assert tokens(results["good"]) == tokens(backend.sample([work("b", 13)])[0])


def test_a_cancelled_request_leaves_and_frees_its_rows(backend):
    cancelled = set()
    backend.cancelled = cancelled.__contains__
    try:
        eng = engine(backend)
        victim, other = work("a", 14, n=2, max_tokens=50), work("b", 15, max_tokens=6)
        victim.request_id = "req-1"
        eng.submit(victim, "victim")
        eng.submit(other, "other")
        finished = []
        eng.step(finished)
        cancelled.add("req-1")
        for _ in range(8):
            eng.step(finished)
        outcomes = dict(finished)
        assert isinstance(outcomes["victim"], UserError) and "cancel" in str(outcomes["victim"])
        assert tokens(outcomes["other"]) == tokens(backend.sample([work("b", 15, max_tokens=6)])[0])
        assert eng.running_rows == 0
    finally:
        backend.cancelled = HFBackend.cancelled


def test_the_tenant_with_fewer_rows_is_admitted_first(backend):
    eng = engine(backend, max_rows=2)
    arrivals = {
        0: [
            ("x1", work("a", 16, n=2, max_tokens=3, tenant="x")),
            ("x2", work("a", 17, n=2, max_tokens=3, tenant="x")),
            ("y1", work("b", 18, n=2, max_tokens=3, tenant="y")),
        ]
    }
    _, done_at = drive(eng, arrivals)
    assert done_at["x1"] < done_at["y1"] < done_at["x2"]


def test_on_a_tiny_model_sampling_and_training_each_keep_their_share(backend):
    """The scheduler with this engine: a stream of training passes and a stream of sampling
    requests, both always waiting; each kind gets about half of the compute thread's time."""
    import asyncio

    from actors.scheduler import Scheduler, SchedulerLimits
    from actors.work import Datum, ForwardBackwardWork

    limits = SchedulerLimits(
        max_sample_rows=12,
        max_pass_tokens=64,  # one request a pass
        max_pass_adapters=8,
        cross_adapter_batching=True,
        batch_window_s=0.0,
        gap_timeout_s=5.0,
        sampling_share=0.5,
        decode_slice_s=0.02,
    )
    sched = Scheduler(
        backend.forward_backward_batch, backend.check_forward_backward, backend.sample, limits, decoder=engine(backend)
    )
    tokens_T = np.arange(48) % 200

    def train(seq_id):
        data = [Datum(tokens_T, {"target_tokens": tokens_T})]
        return ForwardBackwardWork("b", seq_id, data, "cross_entropy", tenant="trainer")

    async def streams():
        done = asyncio.Event()

        async def sampling():
            pending, finished = set(), 0
            while not done.is_set():
                while len(pending) < 3:
                    pending.add(asyncio.ensure_future(sched.sample(work("a", 20 + finished, n=2, max_tokens=16))))
                ready, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                finished += len(ready)
            await asyncio.gather(*pending)
            return finished

        async def training():
            pending = set()
            for i in range(1, 16):
                pending.add(asyncio.ensure_future(sched.forward_backward(train(i))))
                if len(pending) == 3:
                    _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.gather(*pending)
            done.set()

        sampled, _ = await asyncio.gather(sampling(), training())
        return sampled

    sampled = asyncio.run(streams())
    trace = list(sched.trace)
    passes = sum(1 for kind, _ in trace if kind == "train")
    assert passes == 15 and sampled >= 3
    contended = trace[: max(i for i, (kind, _) in enumerate(trace) if kind == "train") + 1]
    used = {kind: sum(s for k, s in contended if k == kind) for kind in ("train", "sample")}
    assert used["sample"] / (used["sample"] + used["train"]) == pytest.approx(0.5, abs=0.2)


@APART
def test_a_fault_in_one_request_fails_it_alone(backend, monkeypatch, fold):
    """An unexpected error while preparing, prefilling or joining one request (a full disk when a
    spilled sampler comes back, out of memory for a long prompt) answers that request with a
    ServerError; the others sample as alone, and nothing is left in the engine."""
    eng = engine(backend, fold=fold)
    rows_of = eng._rows_of

    def flaky_rows_of(w):
        if w.sampler_id == "b" and len(w.prompt) == 7:
            raise OSError("No space left on device")
        return rows_of(w)

    eng._rows_of = flaky_rows_of
    merge = eng._merge

    def flaky_merge(pairs, length):
        if length == 9:
            raise RuntimeError("out of memory")
        return merge(pairs, length)

    eng._merge = flaky_merge
    arrivals = {
        0: [("good", work("a", 30, max_tokens=12)), ("disk", work("b", 31, length=7))],
        2: [("oom", work("a", 32, length=9)), ("late", work("b", 33, length=4))],
    }
    results, _ = drive(eng, arrivals)
    assert isinstance(results["disk"], ServerError) and "No space" in str(results["disk"])
    assert isinstance(results["oom"], ServerError) and "out of memory" in str(results["oom"])
    for name in ("good", "late"):
        assert tokens(results[name]) == tokens(backend.sample([dict(arrivals[0] + arrivals[2])[name]])[0])
    assert eng.running_rows == 0 and not eng.busy


def test_a_request_cancelled_before_its_prefill_never_runs(backend):
    cancelled = {"req-9"}
    backend.cancelled = cancelled.__contains__
    try:
        eng = engine(backend, chunk=4, max_rows=2)
        first = work("a", 34, n=2, max_tokens=6)
        waiting = work("b", 35, length=40, max_tokens=6)
        waiting.request_id = "req-9"
        cancelled.clear()
        eng.submit(first, "first")
        eng.submit(waiting, "waiting")
        finished = []
        eng.step(finished)  # "waiting" has no room yet
        cancelled.add("req-9")
        while len(finished) < 2:
            eng.step(finished)
        outcomes = dict(finished)
        assert isinstance(outcomes["waiting"], UserError) and "cancel" in str(outcomes["waiting"])
        assert not eng.busy
    finally:
        backend.cancelled = HFBackend.cancelled


def record_forwards(backend, monkeypatch, poison=None) -> list[tuple]:
    """Patch the decoder's forward: each call is recorded as ("fold", decode rows, prompt lengths),
    ("prefill", rows, width) or ("decode", rows); one whose prompts hold `poison` raises."""
    real = backend.model.model.forward
    calls = []

    def forward(*args, input_ids=None, **kwargs):
        fold = kwargs.get(FOLDED_STEP)
        if fold is not None:
            calls.append(("fold", fold.rows, tuple(fold.prompt_lengths)))
            prompts = input_ids[:, fold.rows :]
        elif input_ids.shape[1] > 1 or kwargs.get("attention_mask") is None:
            calls.append(("prefill", *input_ids.shape))
            prompts = input_ids
        else:
            calls.append(("decode", input_ids.shape[0]))
            prompts = input_ids[:, :0]
        if poison is not None and (prompts == poison).any():
            raise RuntimeError("injected fault")
        return real(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(backend.model.model, "forward", forward)
    return calls


def test_joining_prompts_ride_in_the_decode_step_and_a_fault_in_one_fails_only_its_cause(backend, monkeypatch):
    """The prompts admitted in one step are prefilled in the forward of that step's decode step
    (one forward a step). If that forward fails, each is prefilled alone and then the decode step
    runs on its own: only the request at fault fails, the running rows and the others sample as
    alone."""
    poison = 255  # any prefill holding this token faults
    prompts = {"x": work("a", 40, length=5), "y": work("b", 41, length=11, n=2), "z": work("tiny", 42, length=3)}
    for w in prompts.values():
        w.prompt = np.where(w.prompt == poison, 1, w.prompt)
    calls = record_forwards(backend, monkeypatch, poison)
    results, _ = drive(engine(backend), {0: list(prompts.items())})
    assert calls[0] == ("fold", 0, (5, 11, 3))  # the three prompts in one forward
    assert {c[:2] for c in calls[1:]} <= {("fold", 4), ("fold", 3), ("fold", 2), ("fold", 1)}  # one forward a step
    bad, late_bad = work("a", 43, length=6), work("b", 44, length=8)
    bad.prompt[2] = late_bad.prompt[0] = poison
    calls.clear()
    arrivals = {0: [*prompts.items(), ("bad", bad)], 2: [("late", work("tiny", 45, length=4)), ("late-bad", late_bad)]}
    again, _ = drive(engine(backend), arrivals)
    alone = [("fold", 0, (n,)) for n in (5, 11, 3, 6)]  # each prompt in a forward of its own, in order
    assert calls[:6] == [("fold", 0, (5, 11, 3, 6)), *alone, ("fold", 4, ())]  # the bad one failed alone
    step2 = calls.index(("fold", 4, (4, 8)))  # the four rows (10 tokens each) decode; two prompts join
    assert calls[step2 + 1 : step2 + 4] == [("fold", 0, (4,)), ("fold", 0, (8,)), ("fold", 5, ())]  # "late" joined
    for name in ("bad", "late-bad"):
        assert isinstance(again[name], ServerError) and "injected fault" in str(again[name])
    monkeypatch.undo()
    alone = {**prompts, "late": arrivals[2][0][1]}
    for name, w in alone.items():
        assert tokens(again[name]) == tokens(backend.sample([w])[0]), name
        if name in results:
            assert tokens(results[name]) == tokens(again[name]), name


def test_a_step_prefills_at_most_its_budget(backend, monkeypatch):
    calls = record_forwards(backend, monkeypatch)
    shorts = [(f"short{i}", work("b", 51 + i, length=2)) for i in range(3)]
    arrivals = {0: [("long", work("a", 50, length=60)), *shorts]}
    results, _ = drive(engine(backend, chunk=64), arrivals)
    prompt_tokens = [sum(c[2]) if c[0] == "fold" else c[1] * c[2] for c in calls if c[0] != "decode"]
    assert all(n <= 64 for n in prompt_tokens), calls
    assert all(isinstance(r, SampleResult) for r in results.values())


def test_apart_prompts_joining_together_share_one_prefill_and_a_fault_in_it_fails_only_its_cause(backend, monkeypatch):
    """Without folded steps, requests admitted in one step are prefilled in one batched forward. If that forward fails,
    each is prefilled alone: only the request at fault fails; the others sample as alone."""
    poison = 255  # any prefill holding this token faults
    prompts = {"x": work("a", 40, length=5), "y": work("b", 41, length=11, n=2), "z": work("tiny", 42, length=3)}
    for w in prompts.values():
        w.prompt = np.where(w.prompt == poison, 1, w.prompt)
    real = backend.model.forward
    prefills = []

    def forward(*args, input_ids=None, **kwargs):
        if input_ids.shape[1] > 1:
            prefills.append(input_ids.shape[0])
            if (input_ids == poison).any():
                raise RuntimeError("injected fault")
        return real(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(backend.model, "forward", forward)
    results, _ = drive(engine(backend, fold=False), {0: list(prompts.items())})
    assert prefills == [3]  # one forward for the three prompts
    bad = work("a", 43, length=6)
    bad.prompt[2] = poison
    prefills.clear()
    arrivals = {0: [*prompts.items(), ("bad", bad)]}
    again, _ = drive(engine(backend, fold=False), arrivals)
    assert prefills == [4, 1, 1, 1, 1]  # the batched one failed: each alone, in order
    assert isinstance(again["bad"], ServerError) and "injected fault" in str(again["bad"])
    monkeypatch.setattr(backend.model, "forward", real)
    for name, w in prompts.items():
        assert tokens(results[name]) == tokens(again[name]) == tokens(backend.sample([w])[0]), name


def test_apart_a_step_prefills_at_most_its_budget_padding_included(backend, monkeypatch):
    real = backend.model.forward
    shapes = []

    def forward(*args, input_ids=None, **kwargs):
        if input_ids.shape[1] > 1 or kwargs.get("attention_mask") is None:
            shapes.append(tuple(input_ids.shape))
        return real(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(backend.model, "forward", forward)
    shorts = [(f"short{i}", work("b", 51 + i, length=2)) for i in range(3)]
    arrivals = {0: [("long", work("a", 50, length=60)), *shorts]}
    results, _ = drive(engine(backend, chunk=64, fold=False), arrivals)
    assert all(rows * width <= 64 for rows, width in shapes), shapes
    assert all(isinstance(r, SampleResult) for r in results.values())
