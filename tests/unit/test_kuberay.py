"""The KubeRay manifests and the images they run, checked offline for what the cluster would refuse.

- Each RayService validates against KubeRay's CRD schema (tests/data/kuberay), with undeclared
  fields refused as `kubectl apply` (strict field validation) refuses them.
- Its serveConfigV2 validates against Ray's Serve schema (unknown keys refused: Ray ignores them) and
  its args against ThinkerConfig; the import path builds the app, whose deployments the overrides name.
- Every replica (at the autoscaling maxima) and every Megatron rank group fits the worker groups at
  their maxReplicas, placed as Ray places them; the head computes nothing.
- The Dockerfiles start FROM Ray's image of the pinned Ray and Python; the manifests run the images
  the README builds; secrets reach every pod through the environment.
No Ray is started and no image is built.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import math
import re
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml
from fsspec.registry import known_implementations
from pydantic import BaseModel, ValidationError
from ray.serve._private.build_app import build_app as build_deployments
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from configs.schema import ThinkerConfig
from deployments.app import model_deployment_name

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((REPO / "configs" / "kuberay").glob("*.yaml"))
CRD = REPO / "tests" / "data" / "kuberay" / "rayservice-v1.schema.json.gz"  # KubeRay's, see its README
PYPROJECT = (REPO / "pyproject.toml").read_text()
RAY_VERSION = re.search(r'"ray\[serve\]==([\d.]+)"', PYPROJECT).group(1)
PY_TAG = "py" + re.search(r'requires-python = ">=(\d+)\.(\d+)', PYPROJECT).expand(r"\1\2")
TORCH_PIN = re.search(r"torch==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
DOCKERFILES = {"Dockerfile": "cpu", "Dockerfile.cuda": "gpu"}  # file -> the platform tag of Ray's image


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def serve_config(manifest: dict) -> dict:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def groups(manifest: dict) -> list[dict]:
    """Head first, then the worker groups."""
    cluster = manifest["spec"]["rayClusterConfig"]
    return [{"groupName": "head", **cluster["headGroupSpec"]}, *cluster["workerGroupSpecs"]]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def secret_envs(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


@pytest.fixture(autouse=True)
def database_secret_in_env(monkeypatch):
    """What the Secret puts in every pod's environment, so that the embedded configs validate here."""
    for path in MANIFESTS:
        for app in serve_config(load(path))["applications"]:
            if "database_url_env" in app["args"]:
                monkeypatch.setenv(app["args"]["database_url_env"], "postgresql+psycopg://thinker:pw@postgres/thinker")


# ---- KubeRay's CRD ----------------------------------------------------------------------------


def strict(schema: dict) -> dict:
    """The CRD's schema as the API server applies it with strict field validation: a structural
    schema would prune an undeclared field silently, `kubectl apply` refuses it."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = strict(schema["additionalProperties"])
    if "items" in schema:
        schema["items"] = strict(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(s) for s in schema[key]]
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]  # quantities: 4 or "4"
    return schema


@pytest.fixture(scope="module")
def rayservice_schema() -> dict:
    return strict(json.loads(gzip.decompress(CRD.read_bytes())))


def crd_errors(manifest: dict, schema: dict) -> list[str]:
    errors = jsonschema.Draft7Validator(schema).iter_errors(manifest)
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_kuberay_crd(path, rayservice_schema):
    manifest = load(path)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert crd_errors(manifest, rayservice_schema) == []


def test_unknown_or_mistyped_fields_are_refused(rayservice_schema):
    manifest = load(REPO / "configs" / "kuberay" / "rayservice-hf.yaml")
    typo = copy.deepcopy(manifest)
    cluster = typo["spec"]["rayClusterConfig"]
    cluster["workerGroupSpec"] = cluster.pop("workerGroupSpecs")
    assert any("'workerGroupSpec' was unexpected" in e for e in crd_errors(typo, rayservice_schema))
    misplaced = copy.deepcopy(manifest)
    misplaced["spec"]["rayClusterConfig"]["headGroupSpec"]["maxReplicas"] = 1
    assert any("'maxReplicas' was unexpected" in e for e in crd_errors(misplaced, rayservice_schema))
    mistyped = copy.deepcopy(manifest)
    mistyped["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "1"
    assert any("is not of type 'integer'" in e for e in crd_errors(mistyped, rayservice_schema))


# ---- serveConfigV2: Ray's Serve schema and Thinker's ---------------------------------------------


def nested_models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in nested_models(arg)]


def unknown_keys(raw: dict, model: type[BaseModel], where: str) -> list[str]:
    """Keys that `model` does not declare: Ray's Serve schema ignores them, so a typo would vanish."""
    fields = {field.alias or name: field for name, field in model.model_fields.items()}
    found = []
    for key, value in raw.items():
        if key not in fields:
            found.append(f"{where}.{key}")
            continue
        for nested in nested_models(fields[key].annotation):
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    found += unknown_keys(item, nested, f"{where}.{key}")
    return found


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_serve_config_validates_against_ray_serve_and_thinker(path):
    config = serve_config(load(path))
    ServeDeploySchema.model_validate(config)
    assert unknown_keys(config, ServeDeploySchema, "serveConfigV2") == []
    assert config["http_options"]["host"] == "0.0.0.0"  # reachable from the Service, not only the pod
    for app in config["applications"]:
        assert app["import_path"] == "deployments.app:build_app"
        thinker = ThinkerConfig.model_validate(app["args"])
        for module in {m for model in thinker.models for m in model.custom_losses}:
            assert importlib.util.find_spec(module), f"custom loss module {module} is not importable"
        for override in app.get("deployments", []):
            if "autoscaling_config" in override:
                AutoscalingConfig.model_validate(override["autoscaling_config"])


def test_unknown_serve_keys_are_refused():
    config = serve_config(load(REPO / "configs" / "kuberay" / "rayservice-hf.yaml"))
    config["applications"][0]["deployments"][0]["autoscaling"] = config["applications"][0]["deployments"][0].pop(
        "autoscaling_config"
    )
    ServeDeploySchema.model_validate(config)  # Ray itself lets it through
    assert unknown_keys(config, ServeDeploySchema, "serveConfigV2") == [
        "serveConfigV2.applications.deployments.autoscaling"
    ]


def built_deployments(app: dict) -> dict[str, typing.Any]:
    """The deployments the import path builds from these args, as `serve run` turns an Application
    into deployments (no Ray started), keyed by name."""
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    built = build_deployments(builder(app["args"]), name=app["name"])
    return {d.name: d for d in built.deployments}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_deployment_overrides_name_deployments_the_app_builds(path):
    for app in serve_config(load(path))["applications"]:
        names = set(built_deployments(app))
        assert "ingress" in names
        assert {o["name"] for o in app.get("deployments", [])} <= names


# ---- placement: what Ray asks of the worker groups ------------------------------------------------


def quantity(value) -> float:
    """A Kubernetes CPU quantity as `ray start` gets it from KubeRay (rounded up to whole CPUs)."""
    value = str(value)
    return math.ceil(float(value[:-1]) / 1000 if value.endswith("m") else float(value))


def ray_resources(group: dict) -> dict[str, float]:
    """What a pod of this group advertises to Ray: rayStartParams, else its container's limits."""
    params = group.get("rayStartParams", {})
    resources = ray_container(group).get("resources", {})
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    cpus = params.get("num-cpus", limits.get("cpu", requests.get("cpu", 0)))
    gpus = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
    return {"CPU": quantity(cpus), "GPU": float(gpus)}


def cluster_nodes(manifest: dict) -> list[dict]:
    """Every pod the cluster may have: the head and each worker group at maxReplicas."""
    nodes = []
    for group in groups(manifest):
        count = 1 if group["groupName"] == "head" else group["maxReplicas"] * group.get("numOfHosts", 1)
        nodes += [{"name": f"{group['groupName']}-{i}", **ray_resources(group)} for i in range(count)]
    return nodes


def fits(node: dict, demand: dict) -> bool:
    return all(node[k] >= v - 1e-9 for k, v in demand.items())


def take(node: dict, demand: dict) -> None:
    for k, v in demand.items():
        node[k] -= v


def place_actor(nodes: list[dict], demand: dict) -> dict | None:
    """First fit; Ray keeps work that needs no GPU off GPU nodes while others have room."""
    order = sorted(nodes, key=lambda n: n["GPU"] > 0) if not demand.get("GPU") else nodes
    node = next((n for n in order if fits(n, demand)), None)
    if node is not None:
        take(node, demand)
    return node


def place_group(nodes: list[dict], bundles: list[dict], strategy: str) -> list[str] | None:
    """The node of each bundle of a placement group, in bundle (rank) order, taken from `nodes`; None
    (and nothing taken) if it cannot be placed. PACK fills a node before the next; SPREAD prefers a node
    the group does not use yet; the STRICT_ forms allow nothing else."""
    trial = copy.deepcopy(nodes)
    if strategy == "STRICT_PACK":
        total = {k: sum(b.get(k, 0) for b in bundles) for k in ("CPU", "GPU")}
        node = next((n for n in trial if fits(n, total)), None)
        if node is None:
            return None
        take(node, total)
        chosen = [node] * len(bundles)
    else:
        chosen = []
        for bundle in bundles:
            if strategy == "PACK":
                order = [*reversed(chosen), *trial]
            else:
                order = [n for n in trial if n not in chosen] + ([] if strategy == "STRICT_SPREAD" else chosen)
            node = next((n for n in order if fits(n, bundle)), None)
            if node is None:
                return None
            take(node, bundle)
            chosen.append(node)
    nodes[:] = trial
    return [n["name"] for n in chosen]


def placement(manifest: dict) -> dict[str, list[str]]:
    """Places, in the order Ray meets them, each model deployment, its Megatron ranks, then the ingress
    at its autoscaling maximum; returns the nodes of each Megatron group. Fails on what does not fit."""
    nodes = cluster_nodes(manifest)
    head = nodes[0]
    assert head["CPU"] == 0 and head["GPU"] == 0, "the head must compute nothing (num-cpus: 0, no GPUs)"
    rank_nodes = {}
    for app in serve_config(manifest)["applications"]:
        overrides = {o["name"]: o for o in app.get("deployments", [])}
        config = ThinkerConfig.model_validate(app["args"])
        deployments = built_deployments(app)
        for i, model in enumerate(config.models):
            name = model_deployment_name(i, model)
            demand = actor_demand(deployments[name], overrides.get(name, {}))
            assert place_actor(nodes, demand), f"{name} ({demand}) fits no worker"
            if model.backend == "megatron":
                m = model.megatron
                bundle = {"CPU": m.cpus_per_rank, "GPU": m.gpus_per_rank}
                world = m.tensor_parallel * m.pipeline_parallel * m.data_parallel
                placed = place_group(nodes, [bundle] * world, m.placement_strategy)
                assert placed, f"the {world} ranks of {model.name} ({bundle}, {m.placement_strategy}) do not fit"
                rank_nodes[model.name] = placed
                if m.placement_strategy in ("PACK", "STRICT_PACK"):  # megatron's rank order: a TP group's ranks adjoin
                    tp_groups = [placed[r : r + m.tensor_parallel] for r in range(0, world, m.tensor_parallel)]
                    assert all(len(set(g)) == 1 for g in tp_groups), f"a tensor-parallel group spans nodes: {placed}"
        override = overrides.get("ingress", {})
        replicas = override.get("autoscaling_config", {}).get("max_replicas", deployments["ingress"].num_replicas)
        demand = actor_demand(deployments["ingress"], override)
        for i in range(replicas):
            assert place_actor(nodes, demand), f"ingress replica {i + 1} of {replicas} ({demand}) fits no worker"
    return rank_nodes


def actor_demand(deployment, override: dict) -> dict:
    options = override.get("ray_actor_options", deployment.ray_actor_options or {})  # replaced whole, as Serve does
    return {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0) or 0}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_replica_and_rank_fits_the_worker_groups(path):
    placement(load(path))


def test_megatron_manifest_spreads_its_pipeline_over_two_gpu_nodes():
    manifest = load(REPO / "configs" / "kuberay" / "rayservice-megatron.yaml")
    ((name, nodes),) = placement(manifest).items()
    assert len(set(nodes)) == 2 and all(n.startswith("gpu-") for n in nodes), nodes


def with_model(name: str, **changes) -> dict:
    """A manifest of configs/kuberay whose first model has these changes (`megatron` merged)."""
    manifest = load(REPO / "configs" / "kuberay" / name)
    config = serve_config(manifest)
    model = config["applications"][0]["args"]["models"][0]
    if "megatron" in changes:
        model["megatron"] = {**model.get("megatron", {}), **changes.pop("megatron")}
    model.update(changes)
    manifest["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    return manifest


@pytest.mark.parametrize(
    "name, changes, error",
    [
        ("rayservice-hf.yaml", {"num_gpus": 2}, "fits no worker"),  # the GPU pods have one each
        ("rayservice-megatron.yaml", {"megatron": {"tensor_parallel": 4}}, "do not fit"),  # 8 ranks, 4 GPUs
        ("rayservice-megatron.yaml", {"megatron": {"tensor_parallel": 4, "pipeline_parallel": 1}}, "spans nodes"),
        ("rayservice-megatron.yaml", {"megatron": {"placement_strategy": "STRICT_PACK"}}, "do not fit"),
    ],
)
def test_a_placement_that_does_not_fit_is_refused(name, changes, error):
    with pytest.raises(AssertionError, match=error):
        placement(with_model(name, **changes))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_cluster_shape(path):
    """GPU pods get the GPUs Ray counts; autoscaled groups have the autoscaler; the Serve port is open."""
    manifest = load(path)
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == RAY_VERSION
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    port = serve_config(manifest)["http_options"]["port"]
    for group in groups(manifest):
        container = ray_container(group)
        limits = container["resources"]["limits"]
        assert ray_resources(group)["GPU"] == float(limits.get("nvidia.com/gpu", 0)), group["groupName"]
        assert {"containerPort": port, "name": "serve"} in container["ports"], group["groupName"]
    scales = any(g["minReplicas"] < g["maxReplicas"] for g in cluster["workerGroupSpecs"])
    assert cluster.get("enableInTreeAutoscaling") is True or not scales


# ---- secrets, object storage and images ------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_database_url_comes_from_a_secret_on_every_pod(path):
    manifest = load(path)
    (app,) = serve_config(manifest)["applications"]
    assert "database_url" not in app["args"]  # a password must not sit in the RayService
    for group in groups(manifest):
        assert app["args"]["database_url_env"] in secret_envs(ray_container(group)), group["groupName"]


def test_database_url_env_is_read_when_the_config_is_validated(monkeypatch):
    monkeypatch.setenv("TEST_THINKER_DB", "postgresql+psycopg://u:p@db/thinker")
    config = ThinkerConfig.model_validate({"database_url_env": "TEST_THINKER_DB"})
    assert config.database_url == "postgresql+psycopg://u:p@db/thinker"
    assert ThinkerConfig.model_validate(config.model_dump()).database_url == config.database_url
    monkeypatch.delenv("TEST_THINKER_DB")
    with pytest.raises(ValidationError, match="TEST_THINKER_DB, which is not set"):
        ThinkerConfig.model_validate({"database_url_env": "TEST_THINKER_DB"})
    with pytest.raises(ValidationError, match="not both"):
        ThinkerConfig.model_validate({"database_url_env": "HOME", "database_url": "sqlite://"})


def pip_installs(dockerfile: str) -> list[str]:
    """The `pip install` commands of a Dockerfile (continuation lines joined), in order."""
    text = dockerfile.replace("\\\n", " ")
    return [c.strip() for line in text.splitlines() for c in line.split("&&") if "pip install" in c]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_builds_on_rays_image_of_the_pinned_versions(name):
    text = (REPO / name).read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert base == f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-{DOCKERFILES[name]}"
    installs = pip_installs(text)
    torch = [i for i, c in enumerate(installs) if f"torch=={TORCH_PIN}" in c]
    package = [i for i, c in enumerate(installs) if re.search(r"\s\.(\s|$)", c)]
    assert torch and package and torch[0] < package[0], "torch (pinned) must be installed before the package"
    cpu_index = "--index-url https://download.pytorch.org/whl/cpu" in installs[torch[0]]
    assert cpu_index == (DOCKERFILES[name] == "cpu")  # the CPU image must not pull the CUDA build
    for path in MANIFESTS:  # every checkpoint root's fsspec implementation is in the image
        for app in serve_config(load(path))["applications"]:
            scheme = app["args"]["checkpoint_root"].split("://")[0] if "://" in app["args"]["checkpoint_root"] else ""
            if scheme:
                package_name = known_implementations[scheme]["class"].split(".")[0]
                assert any(re.search(rf"\b{package_name}\b", c) for c in installs), (scheme, package_name)


def test_manifests_run_the_images_the_readme_builds():
    built = dict(
        (dockerfile, image)
        for image, dockerfile in re.findall(r"docker build -t (\S+) -f (\S+) \.", (REPO / "README.md").read_text())
    )
    assert set(built) == set(DOCKERFILES)
    version = re.search(r'^version = "(.+)"', PYPROJECT, flags=re.M).group(1)
    assert all(image.split(":")[-1].startswith(version) for image in built.values())
    for path in MANIFESTS:
        for group in groups(load(path)):
            gpu = float(ray_container(group)["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
            image = built["Dockerfile.cuda" if gpu else "Dockerfile"]
            assert all(c["image"] == image for c in group["template"]["spec"]["containers"]), group["groupName"]


def test_there_is_one_manifest_per_backend():
    backends = {
        model["backend"] if "backend" in model else "hf"
        for path in MANIFESTS
        for app in serve_config(load(path))["applications"]
        for model in app["args"]["models"]
    }
    assert backends == {"hf", "megatron"}
