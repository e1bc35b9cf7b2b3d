import pytest

from deployments.policy import AutoscalePolicy, load_policy
from tests.test_demo_model import DEMO


def test_bundled_policy_loads():
    policy = load_policy(DEMO.parent.parent / "deployments" / "policies" / "default.yaml")
    assert policy == AutoscalePolicy()  # the file spells out the defaults


@pytest.mark.parametrize("text,message", [
    ("interval_s: 0\n", "interval_s: Input should be greater than 0"),
    ("hot_threshold: 0.5\n", "hot_threshold: Input should be greater than or equal to 1"),
    ("extra_slots: 2\n", "extra_slots: Extra inputs are not permitted"),
    ("window_steps: many\n", "window_steps: Input should be a valid integer"),
    ("- a list\n", "policy.yaml"),
])
def test_bad_policy_names_the_field(tmp_path, text, message):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_policy(path)


def test_slot_and_memory_limits_become_copies_per_layer():
    assert AutoscalePolicy().layer_slots(4, 1000) is None
    assert AutoscalePolicy(slots_per_worker=20).layer_slots(4, 1000) == 5
    assert AutoscalePolicy(memory_budget_bytes=12_000).layer_slots(4, 1000) == 3  # 12 copies fit, 3 per layer
    assert AutoscalePolicy(slots_per_worker=20, memory_budget_bytes=12_000).layer_slots(4, 1000) == 3


def test_deployment_options_are_not_runtime_policy():
    """Pool bounds are read when the app is built (config `pool:`), so the policy refuses them."""
    with pytest.raises(ValueError, match="max_pool_workers"):
        AutoscalePolicy(max_pool_workers=2)
