import pytest

from deployments.policy import AutoscalePolicy, load_policy
from tests.helpers import DEMO


def test_bundled_policy_loads():
    policy = load_policy(DEMO.parent.parent / "deployments" / "policies" / "default.yaml")
    assert policy == AutoscalePolicy()  # the file spells out the defaults


@pytest.mark.parametrize("text,message", [
    ("interval_s: 0\n", "interval_s: Input should be greater than 0"),
    ("hot_threshold: 0.5\n", "hot_threshold: Input should be greater than or equal to 1"),
    ("extra_slots: 2\n", "extra_slots: Extra inputs are not permitted"),
    ("window_steps: many\n", "window_steps: must be a number, not text"),
    ("enabled: yes please\n", "enabled: must be true or false"),
    ("- a list\n", "policy.yaml"),
])
def test_bad_policy_names_the_field(tmp_path, text, message):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_policy(path)


def test_worker_byte_budget_from_the_policy():
    assert AutoscalePolicy().worker_budget_bytes(32, 4, 1000) is None
    assert AutoscalePolicy(memory_budget_bytes=12_000).worker_budget_bytes(32, 4, 1000) == 12_000
    # even share of 32 copies over 4 workers (8 000 bytes) + 3 000 bytes of extra copies
    assert AutoscalePolicy(extra_copy_bytes_per_worker=3_000).worker_budget_bytes(32, 4, 1000) == 11_000
    assert AutoscalePolicy(memory_budget_bytes=10_000, extra_copy_bytes_per_worker=3_000)\
        .worker_budget_bytes(32, 4, 1000) == 10_000


def test_deployment_options_are_not_runtime_policy():
    """Pool bounds are read when the app is built (config `pool:`), so the policy refuses them."""
    with pytest.raises(ValueError, match="max_pool_workers"):
        AutoscalePolicy(max_pool_workers=2)


def test_the_old_key_token_split_is_accepted_with_a_deprecation_line(tmp_path, caplog):
    path = tmp_path / "policy.yaml"
    path.write_text("token_split: least_loaded\n")
    with caplog.at_level("WARNING", logger="ray.serve"):
        assert load_policy(path).copy_choice == "least_loaded"
    assert "'token_split' is deprecated: it is now 'copy_choice'" in caplog.text
    # PUT /admin/policy merges into the running policy, whose dump holds the new key
    assert AutoscalePolicy().merge({"token_split": "least_loaded"}).copy_choice == "least_loaded"
    with pytest.raises(ValueError, match="token_split is the old name of copy_choice: give only copy_choice"):
        AutoscalePolicy(token_split="even", copy_choice="even")


def test_merge_names_the_field_it_refuses():
    with pytest.raises(ValueError, match="copy_choice: Input should be 'even' or 'least_loaded'"):
        AutoscalePolicy().merge({"copy_choice": "random"})
    assert AutoscalePolicy().merge({"min_gain": 0.5}).min_gain == 0.5


def test_an_inline_policy_beside_a_policy_file_is_refused_not_ignored():
    """serve_local.yaml names a policy_file: an `autoscaler:` added beside it must not be dropped silently."""
    from deployments.config import app_config

    with pytest.raises(ValueError, match=r"inline \(autoscaler\) or by file \(policy_file: p.yaml\), not both"):
        app_config({"autoscaler": {"interval_s": 5}, "policy_file": "p.yaml"})
    assert app_config({"autoscaler": {"interval_s": 5}}).policy().interval_s == 5


def test_mode_static_is_refused_beside_expert_copies_it_would_retire():
    from deployments.policy import check_copies

    static = AutoscalePolicy(mode="static", profile_file="p.json")
    check_copies(static, 1)
    check_copies(AutoscalePolicy(), 2)  # online keeps the copies as a floor
    check_copies(None, 2)
    with pytest.raises(ValueError, match=r"would retire the copies expert_copies \(2\) keeps for failures"):
        check_copies(static, 2)
