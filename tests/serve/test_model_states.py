"""Capabilities and health answer at once whatever the models are doing: a model still loading is
listed with its state (and what Serve says of it) instead of being waited for."""

import time

import pytest
import requests
from ray import serve
from ray.serve.api import _run

from configs.schema import BaseModelConfig, ThinkerConfig
from deployments.app import build_thinker_app
from tests.conftest import database_file
from tests.fakes import FakeBackend

pytestmark = pytest.mark.serve
LOAD_S = 12.0


class SlowLoadingBackend(FakeBackend):
    """A backend whose model takes LOAD_S seconds to load (its replica is not ready until then)."""

    def __init__(self, config=None, cache_dir=None):
        if getattr(config, "name", "") == "slow":
            time.sleep(LOAD_S)
        super().__init__(config, cache_dir)


def test_capabilities_and_health_answer_while_a_model_loads(serve_instance, checkpoint_root):
    config = ThinkerConfig(
        models=[BaseModelConfig(name="quick", num_cpus=0), BaseModelConfig(name="slow", num_cpus=0)],
        checkpoint_root=checkpoint_root,
        database_url=database_file(checkpoint_root),
    )
    url = f"{serve_instance}/states"
    _run(
        build_thinker_app(config, backend_factory=SlowLoadingBackend),
        name="states",
        route_prefix="/states",
        _blocking=False,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # the ingress comes up first; the slow model keeps loading
            try:
                health = requests.get(f"{url}/api/v1/healthz", timeout=5)
                if health.status_code == 200:
                    break
            except requests.RequestException:  # not routed yet, or the proxy held it for a replica
                pass
            assert time.monotonic() < deadline, "the ingress never came up"
            time.sleep(0.2)
        start = time.monotonic()
        caps = requests.get(f"{url}/api/v1/get_server_capabilities", timeout=30).json()
        assert time.monotonic() - start < 10
        models = {m["model_name"]: m for m in caps["supported_models"]}
        assert models["slow"]["state"] == "loading" and models["slow"]["trainable"] is False
        assert requests.get(f"{url}/api/v1/healthz", timeout=5).json()["models"]["slow"] == "loading"
        deadline = time.monotonic() + 60
        while models["slow"]["state"] != "ready":  # and once it has loaded, it is listed as usual
            assert time.monotonic() < deadline, models
            time.sleep(1)
            caps = requests.get(f"{url}/api/v1/get_server_capabilities", timeout=30).json()
            models = {m["model_name"]: m for m in caps["supported_models"]}
        assert models["slow"]["trainable"] and models["quick"]["state"] == "ready"
        assert requests.get(f"{url}/api/v1/healthz", timeout=5).json()["models"] == {"quick": "ready", "slow": "ready"}
    finally:
        serve.delete("states")
