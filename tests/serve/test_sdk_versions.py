"""The window of SDK versions: tinker 0.25.0 and 0.30.4 (as well as 0.38, the rest of the suite)
train, save, sample, resume and list against the same server. Each old SDK is installed on
first use into the test cache (pip, no dependencies: they run on this environment's packages)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tinker

pytestmark = pytest.mark.serve
CACHE = Path(os.environ.get("THINKER_TEST_CACHE", Path.home() / ".cache" / "thinker" / "test-sdks"))
FLOW = Path(__file__).parent / "sdk_window" / "old_sdk_flow.py"


def sdk(version: str) -> Path:
    target = CACHE / f"tinker-{version}"
    if not (target / "tinker").is_dir():
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
        subprocess.run([*pip, f"tinker=={version}"], check=True, timeout=600)
    return target


@pytest.mark.parametrize("version", ["0.25.0", "0.30.4"])
def test_an_older_sdk_trains_saves_samples_resumes_and_lists(tiny_url, version):
    service = tinker.ServiceClient(base_url=tiny_url)  # a 0.38 client on the same server meanwhile
    env = {**os.environ, "PYTHONPATH": str(sdk(version))}
    result = subprocess.run(
        [sys.executable, str(FLOW), tiny_url, "tiny-a"], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["losses"][1] < seen["losses"][0]
    assert seen["resumed_loss"] == pytest.approx(seen["losses"][1], rel=0.5)
    assert seen["samples"] == [3, 3]
    assert seen["checkpoint_types"] == ["training"]  # an external export is hidden from 0.25 and listed to 0.30
    assert seen["external_listed"] == (version != "0.25.0")
    if version == "0.25.0":
        assert seen["archive"] == ["adapter_config.json", "adapter_model.safetensors", "checkpoint_complete"]
    service.close("success").result()
