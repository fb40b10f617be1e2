"""The benchmarks' server: a Thinker app on a local Ray cluster, HTTP on 127.0.0.1 only."""

from __future__ import annotations

import socket


def serve_thinker(config) -> str:
    """Start Ray and Serve on a free 127.0.0.1 port, run the app of `config` (a ThinkerConfig);
    returns its base URL. Ray shuts everything down when the benchmark's process exits."""
    return serve_thinker_apps({"thinker": config})["thinker"]


def serve_thinker_apps(configs: dict) -> dict[str, str]:
    """Several apps side by side (name -> ThinkerConfig), each under /name; name -> base URL."""
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
        prefix = "/" if single else f"/{name}"
        serve.run(build_thinker_app(config), name=name, route_prefix=prefix)
        urls[name] = f"http://127.0.0.1:{port}" + ("" if single else prefix)
    return urls
