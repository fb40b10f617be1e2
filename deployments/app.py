"""build_app(): the only place that knows every part. `serve_config.yaml` imports it.

Validates the config once, binds one model deployment per base model (pinned to its GPUs when
configured) and the ingress with a dict of model handles keyed by base model name. (Futures
live in the metadata database and the model deployments: there is no future store.)
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from actors.model_actor import ModelActor, default_backend
from configs.schema import BaseModelConfig, ThinkerConfig, model_deployment_name
from deployments.ingress import Ingress

UNBOUNDED = 100_000  # queued requests per replica: ordering and batching happen inside the actors


def bind_model(index: int, model: BaseModelConfig, config: ThinkerConfig, backend_factory: Any) -> Application:
    return (
        serve.deployment(ModelActor)
        .options(
            name=model_deployment_name(index, model),
            num_replicas=1,  # adapters and optimizer state live in this one actor
            max_ongoing_requests=UNBOUNDED,
            ray_actor_options={"num_cpus": model.num_cpus, "num_gpus": model.num_gpus},
            health_check_period_s=10,
            health_check_timeout_s=120,
        )
        .bind(
            model,
            config.cache_dir,
            config.checkpoint_root,
            backend_factory,
            config.database_url,
            config.quotas,
            config.future_ttl_s,
            config.durable_training,
            config.snapshot_interval_s,
        )
    )


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application builder named in serve_config.yaml; `args` is a ThinkerConfig dict."""
    return build_thinker_app(ThinkerConfig.model_validate(args or {}))


def build_thinker_app(config: ThinkerConfig, backend_factory: Any = default_backend) -> Application:
    """Binds the deployments. `backend_factory(model_config, cache_dir)` builds each model
    actor's backend (tests pass a fake)."""
    models = {m.name: bind_model(i, m, config, backend_factory) for i, m in enumerate(config.models)}
    return (
        serve.deployment(Ingress)
        .options(
            name="ingress",
            num_replicas=config.ingress_replicas,
            max_ongoing_requests=UNBOUNDED,
            ray_actor_options={"num_cpus": 0},
        )
        .bind(models, config)
    )
