"""tinker-cookbook 0.6.1's own RL trainer (`tinker_cookbook.rl.train.main`, unmodified) against a
served app, offline: a tiny token environment, with the cookbook's default RL loss
`stable_reinforce` (it samples with record_stability_info and trains with provenance spans) and with
`gspo` (rl.train sends no sequence_ratio_mask). Each run trains two iterations: finite rewards,
nonzero gradients, and the cookbook's own sampler-vs-learner KL at zero (on-policy)."""

import asyncio
import json
import math

import pytest
import tinker

pytestmark = pytest.mark.serve

PROMPT = [10, 20, 30, 40]


def cookbook_rl():
    """The cookbook's RL modules, with the Env / dataset types a task defines."""
    from tinker_cookbook.rl import train
    from tinker_cookbook.rl.types import Env, EnvGroupBuilder, RLDataset, RLDatasetBuilder, StepResult

    class EvenTokens(Env):
        """Reward: the share of sampled tokens that are even (a dense, learnable signal)."""

        async def initial_observation(self):
            return tinker.ModelInput.from_ints(PROMPT), []

        async def step(self, action, *, extra=None):
            reward = sum(1 for t in action if t % 2 == 0) / max(len(action), 1)
            return StepResult(
                reward=reward,
                episode_done=True,
                next_observation=tinker.ModelInput.from_ints([]),
                next_stop_condition=[],
            )

    class Group(EnvGroupBuilder):
        async def make_envs(self):
            return [EvenTokens() for _ in range(4)]

        def logging_tags(self):
            return ["even"]

    class Dataset(RLDataset):
        def get_batch(self, index):
            return [Group() for _ in range(2)]

        def __len__(self):
            return 3

    import chz

    @chz.chz
    class Builder(RLDatasetBuilder):
        async def __call__(self):
            return Dataset(), None

    return train, Builder


@pytest.mark.parametrize("loss_fn", ["stable_reinforce", "gspo"])
def test_the_cookbooks_rl_train_runs_offline(loss_fn, tiny_url, tiny_model_dir, tmp_path):
    from tinker_cookbook.tokenizer_utils import register_tokenizer
    from transformers import AutoTokenizer

    register_tokenizer("tiny-a", lambda: AutoTokenizer.from_pretrained(tiny_model_dir))
    train, Builder = cookbook_rl()
    config = train.Config(
        learning_rate=1e-3,
        dataset_builder=Builder(),
        model_name="tiny-a",
        recipe_name="thinker-offline-test",
        max_tokens=6,
        log_path=str(tmp_path / loss_fn),
        base_url=tiny_url,
        loss_fn=loss_fn,
        lora_rank=4,
        eval_every=0,
        save_every=0,
        max_steps=2,
        num_groups_to_log=0,
        rollout_json_export=False,
    )
    asyncio.run(train.main(config))
    rows = [json.loads(line) for line in (tmp_path / loss_fn / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 2, rows
    rewards = [v for r in rows for k, v in r.items() if k.endswith("reward/total")]
    assert len(rewards) >= 2 and all(math.isfinite(v) for v in rewards), sorted(rows[-1])
    trained = [r for r in rows if "grad_norm:mean" in r]  # the server's optim_step metrics, per iteration
    assert len(trained) >= 2 and all(math.isfinite(r["grad_norm:mean"]) and r["grad_norm:mean"] > 0 for r in trained)
    # on-policy: the learner's log-probs equal the sampler's (the cookbook's own KL check)
    assert all(abs(r["optim/kl_sample_train_v1"]) < 1e-4 for r in trained), trained
