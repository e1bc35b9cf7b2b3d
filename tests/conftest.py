import os

import pytest
import torch

from tools.checkpoints import FAMILIES, make_checkpoint

# Tests share 2 cores with whatever else runs; more threads only add contention. (Kept at 2 under
# xdist too: some bit-exact comparisons were written, and hold, with that thread count.)
torch.set_num_threads(min(2, os.cpu_count() or 1))

# The test files that start Ray (the session `cluster` fixture, a server, a Ray cluster of their own).
# Under `make test` (pytest-xdist, `-n 2`) they run as one unit on one worker, in file order, started
# first (the largest unit): two Ray clusters never share the machine (their HAProxies did not start
# side by side) and the session cluster starts once. Every other test, standalone expert-worker
# processes included, is its own unit and spreads over both workers. (xdist's own `loadgroup` marks
# do not reach its scheduler under pytest 9, whose node ids no longer read `_nodeid`: hence a
# scheduler of our own.) A new test file that starts Ray belongs here.
# In this order: a deployment costs ~30 s, and lm_eval, serving_api and serving_parity's first case
# deploy the same application (the demo model on 2 workers), so they run one after another.
SERIAL = tuple(f"tests/deployments/test_{name}.py" for name in (
    "autoscaler", "faults", "fuzz", "limits", "multinode", "pool", "prefix_routing_served", "reliability",
    "scale_out", "serve_cli", "serve_config", "tiers_served", "lm_eval", "serving_api", "serving_parity"))


def _serial_rank(item) -> int:
    return next(i for i, path in enumerate(SERIAL) if item.nodeid.startswith(path))


def pytest_collection_modifyitems(items):
    """The serial files run in SERIAL's order (the other tests keep theirs)."""
    slots = [i for i, item in enumerate(items) if item.nodeid.startswith(SERIAL)]
    for i, item in zip(slots, sorted((items[i] for i in slots), key=_serial_rank)):
        items[i] = item


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
