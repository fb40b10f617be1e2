"""`auth.mode: keys`: only keys issued with `thinker keys create` get in; revoking one works at once."""

import subprocess
import sys

import pytest
import requests
import tinker
import yaml

from configs.schema import BaseModelConfig, ThinkerConfig
from deployments.app import build_thinker_app
from tests.conftest import REPO, run_app
from tests.fakes import FakeBackend

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def keys_app(serve_instance, tmp_path_factory, postgres_server_url):
    """A keys-mode app whose metadata live in PostgreSQL (the other apps of the suite use SQLite)."""
    from tests.postgres import fresh_database

    folder = tmp_path_factory.mktemp("keys-app")
    config = ThinkerConfig(
        models=[BaseModelConfig(name="fake", num_cpus=0)],
        checkpoint_root=str(folder / "checkpoints"),
        database_url=fresh_database(postgres_server_url),
        auth={"mode": "keys"},
    )
    config_file = folder / "serve_config.yaml"
    app = {"name": "keys", "import_path": "deployments.app:build_app", "args": config.model_dump()}
    config_file.write_text(yaml.safe_dump({"applications": [app]}))
    url = run_app(serve_instance, build_thinker_app(config, backend_factory=FakeBackend), "keys")
    return url, str(config_file)


def thinker(config_file: str, *args: str) -> subprocess.CompletedProcess:
    """The operator's command line, as an operator runs it."""
    command = [sys.executable, "-m", "actors.cli", "--config", config_file, *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=True)


def post(url: str, path: str, key: str | None, **kwargs) -> requests.Response:
    headers = {"X-API-Key": key} if key is not None else {}
    return requests.post(f"{url}/api/v1/{path}", headers=headers, timeout=30, **kwargs)


def test_unknown_or_missing_keys_get_401_with_a_json_body(keys_app):
    url, _ = keys_app
    for key in (None, "tml-not-issued", "x" * 5000):
        response = post(url, "create_session", key, json={"tags": []})
        assert response.status_code == 401
        assert response.json()["category"] == "user" and response.json()["error"]
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200  # probes need no key


def test_an_issued_key_works_through_the_sdk_and_stops_at_once_when_revoked(keys_app):
    url, config_file = keys_app
    created = thinker(config_file, "keys", "create", "--tenant", "team-a", "--name", "ci")
    key = created.stdout.strip()
    assert key.startswith("tml-") and "team-a" in created.stderr
    service = tinker.ServiceClient(base_url=url, api_key=key)
    tc = service.create_lora_training_client(base_model="fake", rank=2).result()
    assert tc.get_info().model_id.endswith(":train:0")
    runs = tinker.RestClient(base_url=url, api_key=key).list_training_runs().result().training_runs
    assert [r.model_owner for r in runs] == ["team-a"]

    listed = thinker(config_file, "keys", "list").stdout
    key_id = listed.split("\t")[0]
    assert "team-a\tci" in listed and key not in listed
    thinker(config_file, "keys", "revoke", key_id)
    response = post(url, "create_session", key, json={"tags": []})
    assert response.status_code == 401 and "revoked" in response.json()["error"]
    with pytest.raises(tinker.AuthenticationError):
        tinker.RestClient(base_url=url, api_key=key).list_training_runs().result()
