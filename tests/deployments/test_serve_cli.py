"""`moe-cluster serve` as the README runs it: starts, answers, stops cleanly on SIGTERM."""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import requests

from tests.deployments.conftest import free_port
from tests.test_demo_model import DEMO

pytestmark = pytest.mark.slow
ROOT = DEMO.parent.parent


def test_serve_starts_answers_and_stops(tmp_path):
    http, grpc_port = free_port(), free_port()
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="/tmp/moe-cli-")}
    proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", "serve", "--num-workers", "1",
                             "--http-port", str(http), "--grpc-port", str(grpc_port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.time() + 240
        while time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("ready:") or proc.poll() is not None:
                break
        assert any(line.startswith("ready:") for line in lines), "".join(lines[-30:])
        r = requests.post(f"http://127.0.0.1:{http}/v1/completions", timeout=120,
                          json={"model": "demo", "prompt": "def main(", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        drained = _sigterm_while_streaming(proc, f"http://127.0.0.1:{http}")
        assert proc.wait(timeout=120) == 0
        out = proc.stdout.read()
        in_flight = re.search(r"draining (\d+) in-flight request", out)
        assert in_flight and int(in_flight.group(1)) >= 1, out[-3000:]  # at least the stream
        assert drained["finish_reason"] == "length" and drained["tokens"] == 200  # the stream finished
        assert drained["refused"] == 503 and drained["ready"] == 503  # new requests were turned away
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _sigterm_while_streaming(proc, base: str) -> dict:
    """SIGTERM once a long stream is under way; then a new request must get 503 while the
    stream runs on to its end (the drain window)."""
    result: dict = {"tokens": 0, "finish_reason": None}
    started = threading.Event()

    def stream():
        body = {"prompt": "def main(", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
        with requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    result["tokens"] += 1
                    result["finish_reason"] = choice["finish_reason"] or result["finish_reason"]
                    started.set()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert started.wait(60)
    proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 30
    while time.time() < deadline and "refused" not in result:
        r = requests.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
        if r.status_code != 200:
            result["refused"] = r.status_code
            result["ready"] = requests.get(f"{base}/ready", timeout=30).status_code
        time.sleep(0.05)
    t.join(timeout=120)
    return result


def test_bad_config_is_one_clear_line(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications:\n  - name: moe\n    import_path: deployments.app:app_builder\n"
                   "    args: {num_workers: -1}\n")
    r = subprocess.run([sys.executable, "-m", "deployments.cli", "serve", "--config", str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "num_workers: Input should be greater than or equal to 0" in r.stderr and "Traceback" not in r.stderr
