"""`moe-cluster serve` as the README runs it: starts, answers, stops cleanly on SIGTERM."""
import os
import signal
import subprocess
import sys
import tempfile
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
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_config_is_one_clear_line(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications:\n  - name: moe\n    import_path: deployments.app:app_builder\n"
                   "    args: {num_workers: -1}\n")
    r = subprocess.run([sys.executable, "-m", "deployments.cli", "serve", "--config", str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "num_workers: Input should be greater than or equal to 0" in r.stderr and "Traceback" not in r.stderr
