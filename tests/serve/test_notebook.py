"""examples/notebook.ipynb, executed with nbclient as a user runs it: a Ray cluster started with
`ray start --head` (client server on), the default app served on it with `serve run`, and the
notebook's kernel connecting over the Ray client (ray://). Its outputs are checked."""

import json
import re
import subprocess
import sys

import nbformat
import pytest
import tinker
from nbclient import NotebookClient
from tinker import types

from tests.conftest import REPO, free_port
from tests.ray_cluster import RayCluster, serve_config_copy

pytestmark = [pytest.mark.serve, pytest.mark.default_model]
NOTEBOOK = REPO / "examples" / "notebook.ipynb"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def served(tmp_path_factory, default_model_dir):
    """(the cluster, the app's URL, its config file)."""
    folder = tmp_path_factory.mktemp("notebook-cluster")
    cluster = RayCluster(folder)
    try:
        cluster.wait_for_client_server()
        config = serve_config_copy(REPO / "serve_config.yaml", folder, free_port())
        yield cluster, cluster.serve_run(config), config
    finally:
        cluster.stop()


def test_the_notebook_trains_plots_and_samples_over_the_ray_client(served, tmp_path):
    cluster, _, _ = served
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    env = {**cluster.env, "RAY_ADDRESS": cluster.client_address, "TINKER_API_KEY": "tml-notebook-test"}
    client.execute(env=env)
    nbformat.write(notebook, tmp_path / "executed.ipynb")  # kept for a look when it fails
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")

    losses = json.loads(re.search(r"^losses (\[.*\])$", text, re.M).group(1))
    assert len(losses) == 12 and all(x >= 0 for x in losses)
    assert losses[-1] < 0.2 * losses[0], losses  # it learned the made-up answer
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
    sampled = re.search(r"^sampled: '(.*)'$", text, re.M).group(1)
    assert "Bluebird" in sampled, sampled


def test_thinker_status_shows_models_adapters_and_tenants_of_the_running_app(served):
    cluster, url, config = served
    service = tinker.ServiceClient(base_url=url, api_key="tml-status-test")
    model = service.create_lora_training_client(BASE_MODEL, rank=4).result()
    model.forward(
        [types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4]})],
        "cross_entropy",
    ).result()
    command = [sys.executable, "-m", "actors.cli", "--config", str(config), "status", "--address", cluster.address]
    shown = subprocess.run(command, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    lines = shown.stdout.splitlines()
    assert lines[0] == "app 'thinker': 1 base model(s)"
    assert lines[1].split() == [
        BASE_MODEL,
        "[HEALTHY]",
        "adapters",
        "1",
        "resident",
        "/",
        "0",
        "offloaded,",
        "0",
        "queued,",
        "0",
        "running",
    ]
    assert len(lines) == 3 and lines[2].strip().endswith(": 1 training model(s), 0 sampler(s)")
    service.close("success").result()
