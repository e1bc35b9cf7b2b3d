"""Two Ray nodes on this machine: expert workers land where their label selectors say, the
router uses copies on its own node first and reaches the other node over the gRPC data plane."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.engine import LLMEngine, SamplingParams
from tests.deployments.conftest import free_port

pytestmark = pytest.mark.slow


def test_workers_follow_label_selectors_across_nodes(checkpoint_factory):
    model = str(checkpoint_factory("mixtral"))
    root = Path(__file__).resolve().parent.parent.parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "multinode_check.py"), model, str(free_port())],
                       capture_output=True, text=True, timeout=240, env=env, cwd=root)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    out = json.loads(lines[-1])
    roles = out["node_roles"]
    assert sorted(roles.values()) == ["experts", "router"]
    dp = out["data_plane"]
    assert [roles[n] for n in dp["worker_nodes"]] == ["router", "experts", "experts"]  # the selectors held
    assert out["same_node_workers"] == [0]  # the router's own node: its copies are used first
    # experts with a copy on worker 0 are served there; the others cross to the experts node over gRPC
    assert set(dp["calls_per_worker"]) == {"0", "1", "2"} and dp["failovers"] == 0
    local = LLMEngine.from_pretrained(model)
    expected = [o.token_ids for o in local.generate([[5, 17, 33], [100, 3]],
                                                    SamplingParams(max_tokens=8, temperature=0))]
    assert out["tokens"] == expected
