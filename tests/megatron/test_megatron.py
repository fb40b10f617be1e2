"""The Megatron backend on CPU (gloo): parity with transformers and with the HF backend, PEFT
interop both ways, data parallelism, and recovery from a dead rank."""

import time

import numpy as np
import pytest
import ray
import torch

from actors.hf.backend import HFBackend
from actors.hf.base_model import load_base_model
from actors.megatron import backend as megatron_backend
from actors.megatron.backend import MegatronBackend
from actors.megatron.group import RankGroup, fits
from actors.work import (
    AdamParams,
    CreateModelWork,
    Datum,
    ForwardBackwardWork,
    LoraSpec,
    OptimStepWork,
    SamplerInfo,
    SampleWork,
    SamplingParams,
)
from configs.errors import ServerError, UserError
from configs.schema import BaseModelConfig
from losses.graph_rules import CustomLoss
from tests.conftest import TINY_LLAMA

pytestmark = pytest.mark.megatron
VOCAB = TINY_LLAMA["vocab_size"]


def megatron_config(tp=1, pp=1, dp=1, megatron_extra=None, **extra) -> BaseModelConfig:
    layout = {"tensor_parallel": tp, "pipeline_parallel": pp, "data_parallel": dp, "cpus_per_rank": 0.25}
    layout.update(megatron_extra or {})
    return BaseModelConfig(name="tiny", random_init=TINY_LLAMA, backend="megatron", megatron=layout, **extra)


@pytest.fixture(scope="module")
def cache(serve_instance, tmp_path_factory) -> str:  # serve_instance: the session's Ray cluster
    return str(tmp_path_factory.mktemp("megatron-cache"))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_logits_equal_transformers(cache, tp, pp):
    group = RankGroup(megatron_config(tp, pp), cache)
    try:
        tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 11))
        (logits,) = group.reports(group.call("next_logits", "", tokens, [11, 11], True))
    finally:
        group.close()
    reference = load_base_model(BaseModelConfig(name="tiny", random_init=TINY_LLAMA), cache).model
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(tokens)).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_an_uneven_pipeline_split_equals_transformers_too(cache):
    """3 layers at PP=2, one on the last stage (which also holds the LM head)."""
    three = {**TINY_LLAMA, "num_hidden_layers": 3}
    layout = {"pipeline_parallel": 2, "last_stage_layers": 1, "cpus_per_rank": 0.25}
    config = BaseModelConfig(name="tiny3", random_init=three, backend="megatron", megatron=layout)
    group = RankGroup(config, cache)
    try:
        tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 9))
        (logits,) = group.reports(group.call("next_logits", "", tokens, [9, 9], True))
        layers = group.call("layer_numbers")
    finally:
        group.close()
    assert sorted(layers) == [[1, 2], [3]]
    reference = load_base_model(BaseModelConfig(name="tiny3", random_init=three), cache).model
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(tokens)).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def data(seed: int) -> list[Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for n in (7, 12, 4):
        tokens = rng.integers(0, VOCAB, n + 1)
        weights = rng.normal(size=n).astype(np.float32)
        out.append(Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": weights}))
    return out


def trajectory(backend, steps=3) -> list[tuple[float, float]]:
    backend.create_model(CreateModelWork("m", LoraSpec(rank=4, seed=3)))
    points = []
    for step in range(steps):
        result = backend.forward_backward(ForwardBackwardWork("m", None, data(step), "cross_entropy"))
        # eps 1e-8, not Tinker's 1e-12: with clipping, elements whose gradient is round-off noise
        # would otherwise take full-size Adam steps, differently in each backend.
        adam = AdamParams(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=1.0, eps=1e-8)
        norm = backend.optim_step(OptimStepWork("m", None, adam)).metrics["grad_norm:mean"]
        points.append((result.metrics["loss:sum"], norm))
    return points


@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_lora_training_equals_the_hf_backend_and_checkpoints_cross_over(cache, tp, pp, dp):
    megatron = MegatronBackend(megatron_config(tp, pp, dp), cache)
    hf = HFBackend(BaseModelConfig(name="tiny", random_init=TINY_LLAMA, torch_threads=2), cache)
    try:
        ours, theirs = trajectory(megatron), trajectory(hf)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
        probe = [ForwardBackwardWork("m", None, data(9), "cross_entropy", forward_only=True)]
        hf.load_state("m", megatron.save_state("m", with_optimizer=True), with_optimizer=True)  # Megatron -> HF
        np.testing.assert_allclose(
            hf.forward_backward(probe[0]).loss_fn_outputs[0]["logprobs"],
            megatron.forward_backward(probe[0]).loss_fn_outputs[0]["logprobs"],
            atol=1e-5,
        )
        hf.optim_step(OptimStepWork("m", None, AdamParams(learning_rate=1e-2)))  # (no gradient: nothing moves)
        hf.forward_backward(ForwardBackwardWork("m", None, data(5), "cross_entropy"))
        hf.optim_step(OptimStepWork("m", None, AdamParams(learning_rate=1e-2)))
        megatron.load_state("m", hf.save_state("m", with_optimizer=True), with_optimizer=True)  # HF -> Megatron
        np.testing.assert_allclose(
            megatron.forward_backward(probe[0]).loss_fn_outputs[0]["logprobs"],
            hf.forward_backward(probe[0]).loss_fn_outputs[0]["logprobs"],
            atol=1e-5,
        )
    finally:
        megatron.close()


def kill_a_rank(backend: MegatronBackend) -> None:
    ray.kill(backend._group._actors[1], no_restart=True)


def rank_loss_run(cache, kills: set[str]) -> tuple[list, list]:
    """Five training steps with a snapshot sampler after each, then a sample from every sampler;
    a rank killed before each point named in `kills`. The losses and samples."""
    backend = MegatronBackend(megatron_config(tp=2), cache)
    adam = AdamParams(learning_rate=5e-2, weight_decay=0.01, eps=1e-8)
    losses = []
    try:
        backend.create_model(CreateModelWork("m", LoraSpec(rank=4, seed=3)))
        backend.create_sampler(SamplerInfo("f", "tiny", model_path="p"), backend.save_state("m", False))
        for step in range(5):
            if f"fb{step}" in kills:
                kill_a_rank(backend)
            for half in (data(step)[:2], data(step)[2:]):  # gradients accumulated over two requests
                losses.append(backend.forward_backward(ForwardBackwardWork("m", None, half, "cross_entropy")))
            if step == 2:  # a save between gradients and their step: a restore point without the gradients
                backend.save_state("m", with_optimizer=True)
            if f"step{step}" in kills:
                kill_a_rank(backend)
            backend.optim_step(OptimStepWork("m", None, adam))
            backend.snapshot_sampler("m", SamplerInfo(f"s{step}", "tiny", source_model_id="m"))
        if "sample" in kills:
            kill_a_rank(backend)
        params = SamplingParams(max_tokens=4, seed=7, stop_at_eos=False)
        samples = [
            backend.sample([SampleWork(s, None, np.arange(5), 2, params)])[0]
            for s in ["f", *(f"s{i}" for i in range(5))]
        ]
        assert not any(isinstance(s, Exception) for s in samples), samples
        return [r.metrics["loss:sum"] for r in losses], samples
    finally:
        backend.close()


def test_a_lost_rank_costs_a_delay_not_an_error_and_every_adapter_comes_back_exactly(cache, monkeypatch):
    """Kills before a forward_backward, between accumulated gradients and their optim_step, and
    before sampling: no request fails, and losses and seeded samples equal an unbroken run's, with
    restore points (every 2 steps here) and journals both replayed, and snapshot samplers from
    both the journal and their exported files."""
    monkeypatch.setattr(megatron_backend, "JOURNAL_STEPS", 2)
    expected_losses, expected_samples = rank_loss_run(cache, set())
    losses, samples = rank_loss_run(cache, {"fb1", "step2", "step3", "sample"})
    np.testing.assert_allclose(losses, expected_losses, rtol=0, atol=1e-5)
    assert len(set(np.round(losses, 4))) > 5  # the model did train
    for got, want in zip(samples, expected_samples):
        assert [s.tokens.tolist() for s in got.sequences] == [s.tokens.tolist() for s in want.sequences]
        for a, b in zip(got.sequences, want.sequences):
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)


def test_a_rank_lost_twice_in_a_row_fails_that_request_alone_and_the_next_one_heals(cache, monkeypatch):
    backend = MegatronBackend(megatron_config(tp=2), cache)
    try:
        trajectory(backend, steps=1)
        probe = ForwardBackwardWork("m", None, data(7), "cross_entropy", forward_only=True)
        before = backend.forward_backward(probe).loss_fn_outputs[0]["logprobs"]
        rebuild = backend._group.rebuild

        def rebuild_and_lose_a_rank():
            rebuild()
            kill_a_rank(backend)

        monkeypatch.setattr(backend._group, "rebuild", rebuild_and_lose_a_rank)
        kill_a_rank(backend)
        with pytest.raises(ServerError, match="rank failed"):
            backend.forward_backward(probe)
        monkeypatch.setattr(backend._group, "rebuild", rebuild)
        np.testing.assert_allclose(backend.forward_backward(probe).loss_fn_outputs[0]["logprobs"], before, atol=1e-6)
    finally:
        backend.close()


def test_a_group_the_cluster_cannot_place_fails_clearly_instead_of_waiting_forever(cache):
    config = megatron_config(tp=2)
    config.megatron.cpus_per_rank, config.megatron.setup_timeout_s = 64.0, 2.0
    with pytest.raises(ServerError, match="did not provide 2 x"):
        RankGroup(config, cache)
    assert not [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "PENDING"]


def test_a_group_no_node_could_hold_fails_within_seconds_saying_what_it_asked_and_what_the_nodes_have(cache):
    config = megatron_config(tp=2)
    config.megatron.cpus_per_rank = 3.0  # 2 x 3 CPUs: the suite's one node has 4 (setup_timeout_s stays 900 s)
    started = time.monotonic()
    with pytest.raises(ServerError, match=r"asks for 2 x \{'CPU': 3\.0\} \(PACK\).*the nodes have \[\{'CPU': 4\.0"):
        RankGroup(config, cache)
    assert time.monotonic() - started < config.megatron.unplaceable_after_s + 15
    assert not [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "PENDING"]


def test_placement_fits_as_ray_places_bundles():
    two_nodes = [{"CPU": 4.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 2.0}]
    assert fits({"CPU": 1.0, "GPU": 1.0}, 4, "PACK", two_nodes)
    assert not fits({"CPU": 1.0, "GPU": 1.0}, 5, "SPREAD", two_nodes)
    assert not fits({"CPU": 1.0, "GPU": 1.0}, 4, "STRICT_PACK", two_nodes)
    assert fits({"CPU": 1.0, "GPU": 1.0}, 2, "STRICT_PACK", two_nodes)
    assert not fits({"CPU": 1.0, "GPU": 1.0}, 3, "STRICT_SPREAD", two_nodes)
    assert fits({"CPU": 0.25}, 4, "PACK", [{"CPU": 1.0}])
    assert not fits({"CPU": 1.0, "GPU": 1.0}, 1, "PACK", [{"CPU": 16.0}])


def test_a_layout_that_does_not_divide_the_model_is_refused_before_any_rank_starts(cache):
    with pytest.raises(UserError, match="cannot split num_attention_heads 4 by 3, num_key_value_heads 2 by 3"):
        MegatronBackend(megatron_config(tp=3), cache)
    with pytest.raises(UserError, match="leaves no layers"):
        MegatronBackend(megatron_config(pp=2, megatron_extra={"last_stage_layers": 2}), cache)


def uploaded(fn, ranks, key: str) -> CustomLoss:
    """A loss as the SDK's create_custom_loss uploads it (traced graph as plain data)."""
    from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

    handle = trace_loss(fn, ranks, "session")
    return CustomLoss(key, key, handle.name, [x.model_dump() for x in handle.inputs], encode_graph(handle).model_dump())


def weighted_nll(logprobs, weights):
    return -(logprobs * weights).sum(), {"custom/tokens:sum": (weights != 0).float().sum()}


def no_backward(logprobs, weights):
    return (3.0 % logprobs).sum(), {}  # torch has no derivative for remainder


def test_several_adapters_share_a_pipeline_pass_and_train_as_they_would_alone(cache):
    """At PP=2, 12 rows in 3 micro-batches of 4 mix the rows of four adapters (one with a loss
    uploaded as a graph); a broken loss, registered or uploaded, fails alone."""
    import tests.custom_loss_example  # noqa: F401  (the backend validates against this registry)
    import tests.failing_loss  # noqa: F401

    losses = {"custom_losses": ["tests.custom_loss_example", "tests.failing_loss"]}
    graph = uploaded(weighted_nll, {"logprobs": 1, "weights": 1}, "weighted-nll")
    failing = uploaded(no_backward, {"logprobs": 1, "weights": 1}, "no-backward")
    megatron = MegatronBackend(megatron_config(pp=2, megatron_extra={"microbatches": 3}, **losses), cache)
    hf = HFBackend(BaseModelConfig(name="tiny", random_init=TINY_LLAMA, torch_threads=2), cache)
    try:
        for backend in (megatron, hf):
            for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):
                backend.create_model(CreateModelWork(name, LoraSpec(rank=4, seed=seed)))
        adam = AdamParams(learning_rate=1e-2, eps=1e-8)
        results = {}
        for backend, label in ((megatron, "megatron"), (hf, "hf")):
            works = [
                ForwardBackwardWork("a", None, data(0), "cross_entropy"),
                ForwardBackwardWork("b", None, data(2), "weighted_squared_logprob", {"scale": 0.5}),
                ForwardBackwardWork("c", None, data(1), "cross_entropy", forward_only=True),
                ForwardBackwardWork("d", None, data(4), "custom", custom_loss=graph),
            ]
            if backend is megatron:
                works.append(ForwardBackwardWork("c", None, data(3), "broken_loss"))
                works.append(ForwardBackwardWork("c", None, data(5), "custom", custom_loss=failing))
            outcomes = backend.forward_backward_batch(works)
            if backend is megatron:
                assert isinstance(outcomes[4], ServerError) and "this loss is broken" in str(outcomes[4])
                assert isinstance(outcomes[5], UserError) and "gradient failed" in str(outcomes[5])
            norms = [backend.optim_step(OptimStepWork(m, None, adam)).metrics["grad_norm:mean"] for m in "abcd"]
            probe = [
                backend.forward_backward(ForwardBackwardWork(m, None, data(9), "cross_entropy", forward_only=True))
                for m in "abcd"
            ]
            results[label] = (outcomes[:4], norms, probe)
        (m_out, m_norms, m_probe), (h_out, h_norms, h_probe) = results["megatron"], results["hf"]
        for ours, theirs in zip(m_out, h_out):
            assert ours.metrics["loss:sum"] == pytest.approx(theirs.metrics["loss:sum"], rel=1e-5, abs=1e-5)
            for a, b in zip(ours.loss_fn_outputs, theirs.loss_fn_outputs):
                np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5)
        assert "custom/squares:sum" in m_out[1].metrics  # (summed over the micro-batches b ran in)
        assert m_out[3].metrics["custom/tokens:sum"] == h_out[3].metrics["custom/tokens:sum"] == 23
        np.testing.assert_allclose(m_norms, h_norms, rtol=1e-4, atol=1e-6)
        assert m_norms[2] == 0.0  # forward-only and the broken request: no gradient for c
        for ours, theirs in zip(m_probe, h_probe):
            np.testing.assert_allclose(
                ours.loss_fn_outputs[0]["logprobs"], theirs.loss_fn_outputs[0]["logprobs"], atol=1e-5
            )
    finally:
        megatron.close()
