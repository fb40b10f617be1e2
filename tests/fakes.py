"""Test doubles: a pure-Python backend that records what it was asked to do."""

import json
import os
import threading
import time

import numpy as np

from actors.work import (
    CreateModelWork,
    ForwardBackwardResult,
    ForwardBackwardWork,
    ModelDescription,
    ModelInfo,
    OptimStepResult,
    OptimStepWork,
    SampleResult,
    SampleWork,
)
from configs.errors import NotFoundError, UserError


class FakeBackend:
    """Implements actors.backend.Backend without a model.

    forward_backward sleeps `loss_fn_config["fake_delay_s"]` seconds if given, fails with a
    UserError for loss "fake_user_error" and with a RuntimeError for "fake_crash"; loss
    "fake_diverged" reports a NaN loss, and an optim_step with learning_rate >= 5 an infinite norm.
    """

    def __init__(self, config=None, cache_dir=None):
        self.name = getattr(config, "name", "fake")
        self.calls: list[tuple[str, str, int | None]] = []
        self.models: dict[str, ModelInfo] = {}
        self.compute_thread_inits: list[str] = []  # names of the threads that called init_compute_thread
        self.compute_thread_policies: list[int] = []  # their Linux scheduling policies then
        self.steps: dict[str, int] = {}  # optim_steps taken, per model (its "state")

    def init_compute_thread(self) -> None:
        self.compute_thread_inits.append(threading.current_thread().name)
        if hasattr(os, "sched_getscheduler"):
            self.compute_thread_policies.append(os.sched_getscheduler(0))

    def close(self) -> None:
        pass

    def describe(self) -> ModelDescription:
        return ModelDescription(name=self.name, vocab_size=100, max_seq_len=64, max_batch_tokens=1024)

    def create_model(self, work: CreateModelWork) -> ModelInfo:
        self.calls.append(("create_model", work.model_id, 0))
        info = ModelInfo(work.model_id, self.name, work.lora, "fake", None, work.user_metadata)
        self.models[work.model_id] = info
        return info

    def get_info(self, model_id: str) -> ModelInfo:
        if model_id not in self.models:
            raise NotFoundError(model_id)
        return self.models[model_id]

    def list_models(self) -> list[str]:
        return list(self.models)

    def adapter_counts(self) -> tuple[int, int]:
        return len(self.models), 0

    def list_samplers(self) -> list[str]:
        return []

    def unload_model(self, model_id: str) -> None:
        self.get_info(model_id)
        del self.models[model_id]

    def forward_backward(self, work: ForwardBackwardWork) -> ForwardBackwardResult:
        self.get_info(work.model_id)
        self.calls.append(("forward_backward", work.model_id, work.seq_id))
        time.sleep(float(work.loss_fn_config.get("fake_delay_s", 0)))
        if work.loss_fn == "fake_user_error":
            raise UserError("fake user error")
        if work.loss_fn == "fake_crash":
            raise RuntimeError("fake crash")
        outputs = [{"logprobs": np.zeros(len(d.tokens), np.float32)} for d in work.data]
        loss = float("nan") if work.loss_fn == "fake_diverged" else float(len(self.calls))
        return ForwardBackwardResult(outputs, {"loss:sum": loss})

    def sample(self, works: list[SampleWork]) -> list[SampleResult]:
        return [SampleResult(sequences=[]) for _ in works]

    def forward_backward_batch(self, works: list[ForwardBackwardWork]) -> list:
        outcomes = []
        for work in works:
            try:
                outcomes.append(self.forward_backward(work))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def save_state(self, model_id: str, with_optimizer: bool) -> dict[str, bytes]:
        self.get_info(model_id)
        return {"fake_state.json": json.dumps({"model_id": model_id, "steps": self.steps.get(model_id, 0)}).encode()}

    def snapshot_state(self, model_id: str):
        files = self.save_state(model_id, with_optimizer=True)
        return lambda: files

    def load_state(self, model_id: str, files: dict[str, bytes], with_optimizer: bool) -> None:
        self.get_info(model_id)
        self.steps[model_id] = json.loads(files["fake_state.json"])["steps"]

    def check_forward_backward(self, work: ForwardBackwardWork) -> None:
        self.get_info(work.model_id)

    def optim_step(self, work: OptimStepWork) -> OptimStepResult:
        self.get_info(work.model_id)
        self.calls.append(("optim_step", work.model_id, work.seq_id))
        self.steps[work.model_id] = self.steps.get(work.model_id, 0) + 1
        if work.adam.learning_rate >= 5.0:  # "diverged"
            return OptimStepResult({"grad_norm:mean": float("inf"), "update:mean": float("nan")})
        return OptimStepResult({"grad_norm:mean": 0.0})
