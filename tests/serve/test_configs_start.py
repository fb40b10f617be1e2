"""Every Serve config of the repository either starts on this machine, as a user starts it
(`thinker serve CONFIG`, which is `serve run CONFIG` saying when it is ready) and trains a step
through the official SDK, or says in its first lines that it needs GPUs."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tinker
import yaml
from tinker import types

from configs.schema import ThinkerConfig
from tests.conftest import REPO, free_port
from tests.ray_cluster import serve_config_copy

CONFIGS = [REPO / "serve_config.yaml", *sorted((REPO / "configs").glob("*.yaml"))]
READY_TIMEOUT_S = 420


def thinker_config(path: Path) -> ThinkerConfig:
    (app,) = yaml.safe_load(path.read_text())["applications"]
    return ThinkerConfig.model_validate(app.get("args") or {})


def needs_gpus(path: Path) -> bool:
    models = thinker_config(path).models
    return any(m.num_gpus > 0 or (m.megatron is not None and m.megatron.gpus_per_rank > 0) for m in models)


GPU_CONFIGS = [p for p in CONFIGS if needs_gpus(p)]
CPU_CONFIGS = [p for p in CONFIGS if not needs_gpus(p)]


def test_the_repository_has_configs_of_both_kinds():
    assert {p.name for p in CPU_CONFIGS} >= {"serve_config.yaml", "tiny_cpu.yaml", "megatron_cpu.yaml"}
    assert {p.name for p in GPU_CONFIGS} >= {"gpu_single.yaml", "megatron_gpu.yaml"}


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_a_gpu_config_says_so_in_its_first_lines(path):
    head = "\n".join(path.read_text().splitlines()[:3])
    assert "needs" in head.lower() and "GPU" in head, head


class ThinkerServe:
    """`thinker serve CONFIG` in its own process group, with a Ray of its own (RAY_ADDRESS=local:
    never the suite's cluster nor one a test started with `ray start`)."""

    def __init__(self, config: Path):
        env = {**os.environ, "RAY_ADDRESS": "local"}
        command = [sys.executable, "-m", "actors.cli", "serve", str(config)]
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            if line.startswith("thinker: "):
                self.lines.append(line.strip())
                if line.startswith("thinker: ready at "):
                    self._ready.set()

    def wait_ready(self) -> str:
        assert self._ready.wait(READY_TIMEOUT_S), f"not ready after {READY_TIMEOUT_S} s: {self.lines[-5:]}"
        return self.lines[-1].removeprefix("thinker: ready at ").split(" ")[0]

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; the whole group if it does not end."""
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            raise


@pytest.mark.serve
@pytest.mark.parametrize("path", CPU_CONFIGS, ids=lambda p: p.name)
def test_a_cpu_config_starts_with_thinker_serve_and_trains_a_step(path, tmp_path, default_model_dir):
    serve = ThinkerServe(serve_config_copy(path, tmp_path, free_port()))
    try:
        url = serve.wait_ready()
        assert any("starting" in line or "loading" in line for line in serve.lines)  # it said what it waited for
        base_model = thinker_config(path).models[0].name
        service = tinker.ServiceClient(base_url=url, api_key="tml-config-test")
        model = service.create_lora_training_client(base_model, rank=4).result()
        tokens = np.random.default_rng(0).integers(1, 200, 17).tolist()
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 16},
        )
        output = model.forward_backward([datum], "cross_entropy").result()
        model.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        assert np.isfinite(output.metrics["loss:sum"]) and output.metrics["loss:sum"] > 0
        service.close("success").result()
    finally:
        started = time.monotonic()
        serve.stop()
        assert time.monotonic() - started < 90
