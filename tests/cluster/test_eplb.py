"""Static EPLB (cluster/eplb.py) on hand-checked cases, its invariants, and load profiles."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.eplb import rebalance_experts, to_placement
from cluster.profile import load_profile, save_profile


def test_one_hot_expert_gets_a_copy_on_every_worker():
    maps = rebalance_experts(loads=np.array([[90.0, 10, 10, 10]]), extra_per_layer=2, num_workers=3)
    assert maps.physical_to_logical.tolist() == [[0, 1, 0, 2, 0, 3]]  # 30 + 10 tokens on every worker
    assert maps.logical_count.tolist() == [[3, 1, 1, 1]]
    assert maps.logical_to_physical.tolist() == [[[0, 2, 4], [1, -1, -1], [3, -1, -1], [5, -1, -1]]]
    assert maps.slot_worker.tolist() == [0, 0, 1, 1, 2, 2] and maps.worker_slots.tolist() == [2, 2, 2]
    assert to_placement(maps, [7]).workers == (((7, 0), (7, 1)), ((7, 0), (7, 2)), ((7, 0), (7, 3)))


def test_hierarchical_matches_the_deepseek_eplb_readme_example():
    """deepseek-ai/EPLB README: 2 layers x 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs. Its printed
    phy2log, read two slots per GPU, gives the same expert pair on every GPU as ours (order within a GPU
    is free)."""
    weight = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                       [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    deepseek = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    maps = rebalance_experts(loads=weight, extra_per_layer=4, num_workers=8, num_nodes=2, num_groups=4)
    ours = maps.physical_to_logical.reshape(2, 8, 2)
    assert [[sorted(gpu) for gpu in layer] for layer in ours.tolist()] == \
        [[sorted(layer[i:i + 2]) for i in range(0, 16, 2)] for layer in deepseek]
    assert maps.logical_count.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]


def test_hierarchical_keeps_each_expert_group_on_one_node():
    rng = np.random.default_rng(3)
    loads = rng.zipf(1.4, (3, 32)).astype(float)
    maps = rebalance_experts(loads=loads, extra_per_layer=8, num_workers=8, num_nodes=4, num_groups=8)
    node = maps.slot_worker // 2  # [P]: 2 workers per node
    for layer in range(3):
        for group in range(8):
            slots = np.isin(maps.physical_to_logical[layer], range(group * 4, group * 4 + 4))
            assert len(set(node[slots])) == 1


@settings(max_examples=60, deadline=None)
@given(layers=st.integers(1, 3), nodes=st.integers(1, 3), per_node=st.integers(1, 4), groups_per_node=st.integers(1, 3),
       group_size=st.integers(1, 4), extra=st.integers(0, 12), seed=st.integers(0, 1000))
def test_every_worker_fills_its_slots_with_distinct_experts(layers, nodes, per_node, groups_per_node, group_size,
                                                            extra, seed):
    workers, experts = nodes * per_node, nodes * groups_per_node * group_size
    extra = min(extra, experts * per_node - experts)  # no node gets more slots than copies it can hold
    loads = np.random.default_rng(seed).zipf(1.5, (layers, experts)).astype(float)
    maps = rebalance_experts(loads=loads, extra_per_layer=extra, num_workers=workers, num_nodes=nodes,
                             num_groups=nodes * groups_per_node)
    assert maps.physical_to_logical.shape == (layers, experts + extra)
    assert sorted(maps.worker_slots.tolist())[-1] - sorted(maps.worker_slots.tolist())[0] <= 1
    placement = to_placement(maps, list(range(layers)))
    assert all(len(set(slots)) == len(slots) for slots in placement.workers)
    assert set(placement.copies()) == {(layer, e) for layer in range(layers) for e in range(experts)}
    assert (maps.logical_count == np.stack([np.bincount(r, minlength=experts) for r in maps.physical_to_logical])).all()
    for layer in range(layers):
        for e in range(experts):
            slots = maps.logical_to_physical[layer, e]
            assert (maps.physical_to_logical[layer, slots[slots >= 0]] == e).all()


def test_uneven_slots_and_bad_arguments():
    maps = rebalance_experts(loads=np.ones((1, 6)), extra_per_layer=1, num_workers=4)
    assert maps.worker_slots.tolist() == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="multiple of num_nodes"):
        rebalance_experts(loads=np.ones((1, 8)), extra_per_layer=0, num_workers=3, num_nodes=2)
    with pytest.raises(ValueError, match="num_groups"):
        rebalance_experts(loads=np.ones((1, 8)), extra_per_layer=0, num_workers=4, num_nodes=2, num_groups=3)
    with pytest.raises(ValueError, match="two copies of one expert on one worker"):
        rebalance_experts(loads=np.ones((1, 2)), extra_per_layer=3, num_workers=2)


def test_profile_round_trip(tmp_path):
    loads = np.array([[3.5, 0.0, 12.0], [1.0, 2.0, 3.0]])
    path = tmp_path / "profile.json"
    save_profile(path, loads, [1, 3], {"model": "demo", "window_steps": 50})
    profile = load_profile(path)
    assert (profile.loads == loads).all() and profile.layers == (1, 3) and profile.meta["model"] == "demo"
    assert json.loads(path.read_text())["format"] == "moe-cluster/load-profile"


HEAD = '{"format": "moe-cluster/load-profile", "version": 1, '


@pytest.mark.parametrize("body,error", [
    ("{not json", "cannot read load profile"),
    ('{"format": "other"}', "not a load profile"),
    ('{"format": "moe-cluster/load-profile", "version": 2}', "version 2 is not supported"),
    (HEAD + '"layers": [0]}', "lacks loads"),
    (HEAD + '"layers": [0, 1], "loads": [[1, 2], [3]]}', "differ"),
    (HEAD + '"layers": [0], "loads": [[1, -2]]}', "≥ 0"),
    (HEAD + '"layers": [0], "loads": [[1, NaN]]}', "finite"),
    (HEAD + '"layers": [0, 1], "loads": [[1, 2]]}', "1 rows"),
    (HEAD + '"layers": [2, 2], "loads": [[1], [2]]}', "repeat"),
    (HEAD + '"layers": [0], "loads": [[1]], "meta": 3}', "meta"),
])
def test_bad_profiles_are_refused_naming_the_file_and_the_problem(tmp_path, body, error):
    path = tmp_path / "bad.json"
    path.write_text(body)
    with pytest.raises(ValueError, match=error) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_saving_a_bad_profile_is_refused(tmp_path):
    with pytest.raises(ValueError, match="finite"):
        save_profile(tmp_path / "p.json", np.array([[np.nan]]), [0])
    with pytest.raises(ValueError, match="meta cannot be written"):
        save_profile(tmp_path / "p.json", np.ones((1, 2)), [0], {"when": object()})
    with pytest.raises(ValueError, match="cannot read"):
        load_profile(tmp_path / "missing.json")
    assert not list(tmp_path.iterdir())  # nothing half-written
