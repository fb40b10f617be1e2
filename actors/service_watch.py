"""What `thinker serve` and `thinker status` see of a running app.

- `serve_command` runs Ray Serve's own `serve run CONFIG` (same flags, same logs, Ctrl-C stops it)
  and watches the app's capabilities route beside it: one progress line per change while base
  models load (and every PROGRESS_EVERY_S), one "ready at URL" line once all are ready.
- `status` asks a running app's model deployments through Ray (an operator's view: no key) what
  they hold and have waiting, and the metadata database which tenants hold what.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from actors.metadata.database import Database
from actors.metadata.registry import Registry
from configs.errors import NotFoundError

PROGRESS_EVERY_S = 10.0
POLL_S = 1.0


def serve_command(config_path: str) -> int:
    """`serve run config_path`; its exit status."""
    url = app_url(config_path)
    child = subprocess.Popen([_serve_bin(), "run", config_path])
    try:
        watch(child, url)
        return child.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to both; serve run shuts its app down
        child.send_signal(signal.SIGINT)
        return child.wait()


def app_url(config_path: str) -> str:
    """Where the (one) app of a Serve config answers over HTTP."""
    spec = yaml.safe_load(Path(config_path).read_text())
    http = spec.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    (app,) = spec["applications"]
    prefix = (app.get("route_prefix") or "/").rstrip("/")
    return f"http://{host}:{http.get('port', 8000)}{prefix}"


def watch(child: subprocess.Popen, url: str, out=sys.stderr) -> bool:
    """Progress lines until every base model is ready (True) or `serve run` ends (False)."""
    start, last_line, last_at = time.monotonic(), None, 0.0
    while child.poll() is None:
        states = _model_states(url)
        elapsed = time.monotonic() - start
        if states and all(state == "ready" for state, _ in states.values()):
            print(f"thinker: ready at {url} ({', '.join(states)}) after {elapsed:.0f} s", file=out, flush=True)
            return True
        line = _progress(states)
        if line != last_line or time.monotonic() - last_at >= PROGRESS_EVERY_S:
            print(f"thinker: {line} ({elapsed:.0f} s)", file=out, flush=True)
            last_line, last_at = line, time.monotonic()
        time.sleep(POLL_S)
    return False


def _model_states(url: str) -> dict[str, tuple[str, str | None]]:
    """Each base model's (state, what Serve says), or {} while the app does not answer yet."""
    try:
        answer = requests.get(f"{url}/api/v1/get_server_capabilities", timeout=10)
        models = answer.json()["supported_models"] if answer.status_code == 200 else []
    except (requests.RequestException, ValueError, KeyError):
        return {}
    return {m["model_name"]: (m.get("state", "ready"), m.get("detail")) for m in models}


def _progress(states: dict[str, tuple[str, str | None]]) -> str:
    if not states:
        return "starting Ray and Serve"
    waiting = [(name, state, detail) for name, (state, detail) in states.items() if state != "ready"]
    parts = [f"{state} {name}" + (f": {detail}" if detail else "") for name, state, detail in waiting]
    return "; ".join(parts)


@dataclass
class ModelStatus:
    base_model: str
    state: str  # what Serve says of the deployment: HEALTHY, UPDATING (loading), UNHEALTHY, ...
    resident: int | None = None
    offloaded: int | None = None
    queued: int | None = None
    running: int | None = None
    tenants: Counter = field(default_factory=Counter)  # tenant -> live training models
    samplers: Counter = field(default_factory=Counter)  # tenant -> live sampling sessions


def status(address: str, app: str, database: Database) -> list[ModelStatus]:
    """Every base model of the Serve app `app` on the Ray cluster at `address`."""
    import ray
    from ray import serve

    ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    try:
        application = serve.status().applications.get(app)
        if application is None:
            raise NotFoundError(f"no Serve application {app!r} on the Ray cluster at {address}")
        found = []
        for name, deployment in sorted(application.deployments.items()):
            if name.startswith("model-"):
                state = getattr(deployment.status, "value", deployment.status)  # an Enum in Ray 2.60
                found.append(_model_status(serve.get_deployment_handle(name, app), str(state)))
        registry = Registry(database)
        for model in found:
            model.tenants.update(run.tenant_id for run in registry.live_runs_of(model.base_model))
            model.samplers.update(s.tenant_id for s in registry.live_samplers_of(model.base_model))
        return found
    finally:
        ray.shutdown()


def _model_status(handle, state: str) -> ModelStatus:
    try:
        held = handle.status.remote().result(timeout_s=30)
    except Exception:  # still loading, or failed: Serve's state says which
        name = handle.deployment_name.split("-", 2)[-1]
        return ModelStatus(base_model=name, state=str(state))
    return ModelStatus(state=str(state), **held)


def status_report(models: list[ModelStatus], app: str) -> str:
    """The table `thinker status` prints."""
    lines = [f"app {app!r}: {len(models)} base model(s)"]
    for m in models:
        counts = (
            ""
            if m.resident is None
            else (f"adapters {m.resident} resident / {m.offloaded} offloaded, {m.queued} queued, {m.running} running")
        )
        lines.append(f"  {m.base_model}  [{m.state}]  {counts}".rstrip())
        for tenant in sorted(set(m.tenants) | set(m.samplers)):
            lines.append(f"    tenant {tenant}: {m.tenants[tenant]} training model(s), {m.samplers[tenant]} sampler(s)")
    return "\n".join(lines)


def _serve_bin() -> str:
    beside = Path(sys.executable).parent / "serve"
    return str(beside) if beside.exists() else (shutil.which("serve") or "serve")
