import os

import pytest
import torch

from tools.checkpoints import FAMILIES, make_checkpoint

# Tests share 2 cores with whatever else runs; more threads only add contention. Under `make test`
# (pytest-xdist, 2 workers) each worker computes on one core.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

# Tests that start Ray, Serve or a server process. `make test` runs them all on one xdist worker, in
# file order (`--dist loadgroup`): two Ray clusters never share the machine, and the session-scoped
# cluster is started once. Everything else is in process and spreads over both workers.
SERIAL = ("tests/deployments/", "tests/test_cli.py", "tests/test_k8s.py", "tests/test_serve_bench.py",
          "tests/test_gpu_check.py")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.nodeid.startswith(SERIAL):
            item.add_marker(pytest.mark.xdist_group("serial"))


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    made = {}

    def make(family: str, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = make_checkpoint(family, tmp_path_factory.mktemp(family), **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def family_checkpoint(request, checkpoint_factory):
    return request.param, checkpoint_factory(request.param)
