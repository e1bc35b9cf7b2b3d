import os

import pytest
import torch

from tools.checkpoints import FAMILIES, make_checkpoint

# Tests share 2 cores with whatever else runs; more threads only add contention. (Kept at 2 under
# xdist too: some bit-exact comparisons were written, and hold, with that thread count.)
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Tests that start Ray, Serve or a server process. Under `make test` (pytest-xdist, `-n 2`) they run
# as one unit on one worker, in file order, started first (the largest unit): two Ray clusters never
# share the machine and the session-scoped cluster starts once. Every other test is its own unit, so
# the in-process tests spread over both workers. (xdist's own `loadgroup` marks do not reach its
# scheduler under pytest 9, whose node ids no longer read `_nodeid`: hence a scheduler of our own.)
SERIAL = ("tests/deployments/", "tests/test_cli.py", "tests/test_k8s.py", "tests/test_serve_bench.py",
          "tests/test_gpu_check.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SerialApart(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "serial" if nodeid.startswith(SERIAL) else nodeid

    return SerialApart(config, log) if config.getvalue("dist") == "load" else None


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
