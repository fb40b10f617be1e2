"""What `thinker serve` and `thinker status` see of a running app.

- `serve_command` runs Ray Serve's own `serve run CONFIG` (same logs; Ctrl-C or SIGTERM stops it,
  forwarded once, in its own session so the terminal's Ctrl-C does not reach it twice) and
  watches the app beside it: one progress line per change while base models load (and every
  PROGRESS_EVERY_S), one "ready at URL" line once all are ready. The states come from healthz
  (public, also with auth.mode: keys), Serve's message for a waiting model from capabilities.
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
from configs.errors import NotFoundError, UserError

PROGRESS_EVERY_S = 10.0
POLL_S = 1.0
STATUS_TIMEOUT_S = 30.0


def serve_command(config_path: str) -> int:
    """`serve run config_path`; its exit status (128 + the signal that ended it, as a shell says)."""
    url = app_url(config_path)
    child = subprocess.Popen([_serve_bin(), "run", config_path], start_new_session=True)
    stopping = []

    def stop(signum, frame) -> None:  # forwarded once: a second SIGINT would cut serve run's shutdown short
        if not stopping:
            stopping.append(signum)
            child.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if not watch(child, url) and not stopping:
        print(f"thinker: serve run ended (exit status {child.returncode}) before the app was ready", file=sys.stderr)
    code = child.wait()
    return 128 - code if code < 0 else code


def serve_app(spec: dict, name: str | None = None) -> dict:
    """The Thinker application of a Serve config: the one named `name`, else the one that imports
    deployments.app, else the only one."""
    apps = spec.get("applications") or []
    if name is not None:
        found = [a for a in apps if a.get("name", "default") == name]
    else:
        found = [a for a in apps if str(a.get("import_path", "")).startswith("deployments.app:")] or apps
    if len(found) != 1:
        raise UserError(f"the config has {len(found)} Thinker applications; name one (--app)")
    return found[0]


def app_url(config_path: str) -> str:
    """Where the Thinker app of a Serve config answers over HTTP."""
    spec = yaml.safe_load(Path(config_path).read_text())
    http = spec.get("http_options") or {}
    host = str(http.get("host", "127.0.0.1"))
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    host = f"[{host}]" if ":" in host else host
    prefix = serve_app(spec).get("route_prefix", "/")
    if prefix is None:
        raise UserError("the app has no route_prefix (no HTTP): thinker serve cannot watch it; use serve run")
    return f"http://{host}:{http.get('port', 8000)}{prefix.rstrip('/')}"


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
    """Each base model's (state, what Serve says of it), or {} while the app does not answer yet."""
    try:
        health = requests.get(f"{url}/api/v1/healthz", timeout=10)
        states = health.json()["models"] if health.status_code == 200 else {}
    except (requests.RequestException, ValueError, KeyError):
        return {}
    details: dict[str, str | None] = {}
    if any(state != "ready" for state in states.values()):
        try:  # Serve's message of a waiting model (a 401 with auth.mode: keys: no details then)
            answer = requests.get(f"{url}/api/v1/get_server_capabilities", timeout=10)
            models = answer.json()["supported_models"] if answer.status_code == 200 else []
            details = {m["model_name"]: m.get("detail") for m in models}
        except (requests.RequestException, ValueError, KeyError):
            pass
    return {name: (state, details.get(name)) for name, state in states.items()}


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


def status(address: str, app: str, database: Database, names: dict[str, str]) -> list[ModelStatus]:
    """Every base model of the Serve app `app` on the Ray cluster at `address` (`names`: deployment
    name -> base model name, from the config)."""
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
                base_model = names.get(name, name)
                found.append(_model_status(serve.get_deployment_handle(name, app), base_model, str(state)))
        registry = Registry(database)
        for model in found:
            model.tenants.update(run.tenant_id for run in registry.live_runs_of(model.base_model))
            model.samplers.update(s.tenant_id for s in registry.live_samplers_of(model.base_model))
        return found
    finally:
        ray.shutdown()


def _model_status(handle, base_model: str, state: str) -> ModelStatus:
    try:
        held = handle.status.remote().result(timeout_s=STATUS_TIMEOUT_S)
    except Exception as exc:  # still loading, or failed: Serve's state says which; the reason too
        return ModelStatus(base_model=base_model, state=f"{state}: {type(exc).__name__}: {str(exc)[:200]}")
    return ModelStatus(state=state, **held)


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
