"""Servers the serving benchmark starts as child processes: moe-cluster through its CLI, and the
peers it is compared with (`transformers serve`, continuous batching), each on 127.0.0.1 only.

Each is started, waited for (its HTTP health route), sampled (its process tree, for the CPU
table) and stopped with SIGTERM (then SIGKILL to its process group if it will not go).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    def __init__(self, name: str, argv: list[str], url: str, health: str, log_path: str,
                 env: dict[str, str] | None = None):
        self.name, self.url, self.health = name, url, health
        self.log_path = log_path
        self._log = open(log_path, "wb")
        # its own session: a stop reaches every process it started, and no one else's
        self.proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before it was ready: "
                                   f"{self.tail()}")
            try:
                if requests.get(self.url + self.health, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout_s:g} s: {self.tail()}")

    def pids(self) -> list[int]:
        """The server's process tree (Ray's raylet, GCS, workers and replicas hang below the driver)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.Error:
            return []

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._log.close()

    def tail(self, chars: int = 2000) -> str:
        self._log.flush()
        return Path(self.log_path).read_text(errors="replace")[-chars:]


def moe_cluster(model: str, port: int, app_args: dict, routers: int, tmp: str,
                env: dict[str, str] | None = None) -> ServerProcess:
    """`moe-cluster serve` with the local Serve config, its application args overridden by
    `app_args`, HTTP on `port` and gRPC on `port + 1` (so parallel runs do not collide), Ray's
    files under `tmp`, `env` added to its environment (Ray's and Serve's switches)."""
    import yaml

    conf = yaml.safe_load((ROOT / "deployments" / "serve_local.yaml").read_text())
    conf["applications"][0]["args"] = {**conf["applications"][0]["args"], **app_args}
    path = os.path.join(tmp, "serve.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(conf, f)
    argv = [sys.executable, "-m", "deployments.cli", "serve", "--config", path, "--model", model,
            "--routers", str(routers), "--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", str(port + 1)]
    env = {"RAY_TMPDIR": tmp, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT), **(env or {})}
    return ServerProcess("moe-cluster", argv, f"http://127.0.0.1:{port}", "/health", os.path.join(tmp, "server.log"),
                         env)


def transformers_serve(model: str, port: int, device: str, tmp: str) -> ServerProcess:
    """`transformers serve` (transformers' own OpenAI server: one Python process, continuous
    batching with a paged cache) on the same checkpoint, fp32, bound to 127.0.0.1. Requests must
    name the model exactly as given here (it refuses any other name with a 400)."""
    exe = Path(sys.executable).with_name("transformers")
    argv = [str(exe), "serve", "--continuous-batching", "--device", device, "--dtype", "float32",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", model]  # run in ROOT
    return ServerProcess("transformers-serve", argv, f"http://127.0.0.1:{port}", "/health",
                         os.path.join(tmp, "transformers-serve.log"), {"HF_HUB_OFFLINE": "1"})


def request_body(kind: str, model: str, prompt: str, max_tokens: int) -> dict:
    """The same greedy completion for each server, EOS ignored so every stream is max_tokens long:
    moe-cluster takes `ignore_eos`; transformers serve takes a generation config without an EOS."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if kind == "moe-cluster":
        return {**body, "ignore_eos": True, "stream_options": {"include_usage": True}}
    gen = {"max_new_tokens": max_tokens, "do_sample": False, "eos_token_id": None}
    return {**body, "generation_config": json.dumps(gen)}


def scratch_dir() -> str:
    # short: Ray's Unix sockets live under it (paths are limited to ~107 bytes)
    return tempfile.mkdtemp(prefix="moeb-", dir="/tmp")
