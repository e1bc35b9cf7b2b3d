"""Standalone expert workers (deployments/standalone_worker.py) as the data-plane tests start them:
processes on this machine, which the tests and their "router" (the test process) call one node."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from cluster.placement import WorkerRef
from deployments.experts.auth import ENV

SECRET = "test-data-plane-secret"
HERE = "node-here"


def start_worker(model: str, experts, *extra: str) -> subprocess.Popen:
    """A worker holding copies of `experts` ([(layer, expert_id), ...]); the caller kills it."""
    return subprocess.Popen([sys.executable, "-m", "deployments.standalone_worker", model,
                             json.dumps([list(e) for e in experts]), *extra],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, ENV: SECRET})


def worker_ref(proc: subprocess.Popen, node: str = HERE) -> WorkerRef:
    """What the worker printed, as the controller would put it in the table (waits until it serves)."""
    e = json.loads(proc.stdout.readline())
    return WorkerRef(f"127.0.0.1:{e['port']}", node, local_socket=e["local_socket"], device=e["device"])
