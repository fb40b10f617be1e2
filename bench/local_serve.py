"""The benchmarks' server: a Thinker app on a local Ray cluster, HTTP on 127.0.0.1 only."""

from __future__ import annotations

import atexit
import shutil
import socket
import tempfile
from pathlib import Path


def serve_thinker(config) -> str:
    """Start Ray and Serve on a free 127.0.0.1 port, run the app of `config` (a ThinkerConfig);
    returns its base URL. Ray shuts everything down when the benchmark's process exits."""
    return serve_thinker_apps({"thinker": config})["thinker"]


def serve_thinker_apps(configs: dict) -> dict[str, str]:
    """Several apps side by side (name -> ThinkerConfig), each under /name; name -> base URL.
    Each app whose config names no database or checkpoint root gets its own, in a temporary
    folder removed at exit: a benchmark measures a fresh service, not the runs, samplers and
    pending requests that earlier runs left in the default database (a restarted service
    restores those)."""
    import ray
    from ray import serve

    from deployments.app import build_thinker_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # never a cluster left by `ray start`
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    single = len(configs) == 1
    urls = {}
    for name, config in configs.items():
        config = _fresh_state(config)
        prefix = "/" if single else f"/{name}"
        serve.run(build_thinker_app(config), name=name, route_prefix=prefix)
        urls[name] = f"http://127.0.0.1:{port}" + ("" if single else prefix)
    return urls


def _fresh_state(config):
    default_db = config.database_url is None
    default_root = config.checkpoint_root == type(config).model_fields["checkpoint_root"].default
    if not (default_db or default_root):
        return config
    folder = Path(tempfile.mkdtemp(prefix="thinker-bench-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    update = {}
    if default_db:
        update["database_url"] = f"sqlite:///{folder / 'thinker.sqlite3'}"
    if default_root:
        update["checkpoint_root"] = str(folder / "checkpoints")
    return config.model_copy(update=update)
