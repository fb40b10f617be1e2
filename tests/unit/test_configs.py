"""Every shipped Serve config validates against the schema; the schema rejects unknown keys."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from configs.schema import AuthConfig, BaseModelConfig, MegatronConfig, RequestLimits, TenantQuotas, ThinkerConfig

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIGS = [REPO / "serve_config.yaml", *sorted((REPO / "configs").glob("*.yaml"))]


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_args_validate(path):
    config = yaml.safe_load(path.read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    assert config["http_options"]["host"] in ("127.0.0.1", "0.0.0.0")
    ThinkerConfig.model_validate(app["args"])


def test_default_config_serves_the_embedded_model():
    (model,) = ThinkerConfig().models
    assert model.source == "embedded:SmolLM2-135M-Instruct"


def test_unknown_keys_and_duplicate_names_are_rejected():
    with pytest.raises(ValidationError, match="extra"):
        BaseModelConfig(name="m", lora_rank=8)
    with pytest.raises(ValidationError, match="unique"):
        ThinkerConfig(models=[BaseModelConfig(name="m"), BaseModelConfig(name="m")])


def test_every_config_field_is_described():
    for model in (ThinkerConfig, BaseModelConfig, MegatronConfig, AuthConfig, TenantQuotas, RequestLimits):
        undocumented = [name for name, field in model.model_fields.items() if not field.description]
        assert undocumented == []
