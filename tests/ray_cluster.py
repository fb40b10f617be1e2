"""A Ray cluster of a test's own, started and served as a user does: `ray start --head` (with the
Ray client server) and `serve run CONFIG --address ...`. It lives beside the suite's cluster
(free ports throughout) and is stopped by ending its `ray start --block` process, which takes
down exactly the processes it started (`ray stop` would stop every cluster on the machine)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from tests.conftest import REPO, free_port

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120


def serve_config_copy(source: Path, folder: Path, http_port: int) -> Path:
    """`source` (a Serve config of this repository) with its HTTP port and storage moved into `folder`."""
    config = yaml.safe_load(source.read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": http_port}
    for app in config["applications"]:
        args = app.setdefault("args", {})
        args["checkpoint_root"] = str(folder / "checkpoints")
        args["database_url"] = f"sqlite:///{folder / 'thinker.db'}"
    copy = folder / source.name
    copy.write_text(yaml.safe_dump(config, sort_keys=False))
    return copy


class RayCluster:
    def __init__(self, folder: Path, num_cpus: int = 2):
        self.folder = folder
        self.gcs_port, self.client_port = free_port(), free_port()
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": self.address}
        self.env.pop("RAY_ADDRESS")  # set per command: `ray start` must not read it
        command = [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={self.gcs_port}",
            f"--ray-client-server-port={self.client_port}",
            f"--num-cpus={num_cpus}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ]
        self._log = open(folder / "ray-start.log", "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            command, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_for_port(self.client_port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def client_address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    def wait_for_client_server(self, tries: int = 5) -> None:
        """Until a Ray client connects: the port opens before the server can start a session."""
        probe = f"import ray; ray.init({self.client_address!r}); ray.shutdown()"
        for attempt in range(1, tries + 1):
            done = subprocess.run(
                [sys.executable, "-c", probe], env=self.env, capture_output=True, text=True, timeout=120
            )
            if done.returncode == 0:
                return
            assert attempt < tries, f"no Ray client session: {done.stderr[-2000:]}"
            time.sleep(2)

    def serve_run(self, config: Path, timeout_s: float = 600) -> str:
        """`serve run CONFIG --address ... --non-blocking`, then wait for /healthz; the app's base URL."""
        subprocess.run(
            [str(BIN / "serve"), "run", str(config), "--address", self.address, "--non-blocking"],
            cwd=REPO,
            env=self.env,
            check=True,
            timeout=timeout_s,
            capture_output=True,
        )
        http = yaml.safe_load(config.read_text())["http_options"]
        url = f"http://127.0.0.1:{http['port']}"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                health = requests.get(f"{url}/api/v1/healthz", timeout=5)
                if health.status_code == 200 and all(s == "ready" for s in health.json()["models"].values()):
                    return url
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"{config.name} did not come up: {self.log_tail()}"
            time.sleep(1)

    def log_tail(self) -> str:
        self._log.flush()
        return (self.folder / "ray-start.log").read_text()[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self._log.close()

    def _wait_for_port(self, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray start did not come up:\n{self.log_tail()}")
            time.sleep(0.5)
