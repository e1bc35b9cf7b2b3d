import os

import pytest
import torch

from tools.checkpoints import FAMILIES, make_checkpoint

# Tests share 2 cores with whatever else runs; more threads only add contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
