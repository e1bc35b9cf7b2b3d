"""Prefix-aware choice of a router: affinity to where a prompt's longest remembered prefix went, load as
the tie-breaker, a cap so a hot prefix cannot overload one router, least-loaded for anything else."""
import pytest

from cluster.prefix_routing import PrefixAffinity, choose_router, least_loaded, prefix_keys

K, OTHER, LONG = b"k" * 16, b"o" * 16, b"l" * 16


@pytest.mark.parametrize("keys,loads,affinity,expected", [
    ([], {"a": 3, "b": 1}, {}, ("b", "least_loaded")),  # a prompt shorter than a block
    ([K], {"a": 3, "b": 1}, {}, ("b", "least_loaded")),  # a prefix never seen
    ([], {"a": 2, "b": 2}, {}, ("a", "least_loaded")),  # equal load, nothing to spread by: the lower id
    ([K], {"a": 3, "b": 1}, {K: "a"}, ("a", "affinity")),  # 2 above the least loaded: within the cap
    ([K], {"a": 6, "b": 1}, {K: "a"}, ("b", "overloaded")),  # 5 above: the cap (4) sends it elsewhere
    ([K], {"b": 1, "c": 0}, {K: "a"}, ("c", "least_loaded")),  # its router is gone
    ([K, LONG], {"a": 0, "b": 0}, {K: "a", LONG: "b"}, ("b", "affinity")),  # the longest remembered prefix wins
    ([K, OTHER], {"a": 0, "b": 1}, {K: "b"}, ("b", "affinity")),  # a later turn: its earlier prompt's name
])
def test_choose_router(keys, loads, affinity, expected):
    choice = choose_router(keys, loads, affinity, max_imbalance=4)
    assert (choice.router, choice.reason) == expected


def test_idle_routers_share_unrelated_prompts_deterministically():
    loads = {"a": 0, "b": 0, "c": 0}
    picks = [least_loaded(loads, bytes([i]) * 16) for i in range(30)]
    assert set(picks) == {"a", "b", "c"}
    assert picks == [least_loaded(loads, bytes([i]) * 16) for i in range(30)]


def test_prefix_keys_name_every_full_block_by_what_precedes_it():
    system = list(range(32))
    assert prefix_keys(system + [1, 2], 16) == prefix_keys(system + [7], 16) == prefix_keys(system, 16)
    assert prefix_keys(system, 16)[0] == prefix_keys(system[:16], 16)[0]
    assert prefix_keys(system[:15], 16) == []
    assert prefix_keys([9] + system[1:], 16)[1] != prefix_keys(system, 16)[1]  # chained: the head counts


def test_a_conversation_follows_its_router_until_it_is_too_busy():
    affinity = PrefixAffinity(max_imbalance=2, capacity=2)
    turn1 = list(range(40))
    turn2 = turn1 + list(range(100, 130))  # the reply and the next message
    keys1, keys2 = prefix_keys(turn1, 16), prefix_keys(turn2, 16)
    first = affinity.choose(keys1, {"a": 0, "b": 0})
    affinity.remember(keys1, first.router)
    assert affinity.choose(keys2, {"a": 1, "b": 1}) == type(first)(first.router, "affinity")
    other = "b" if first.router == "a" else "a"
    busy = {first.router: 9, other: 0}
    assert affinity.choose(keys2, busy).reason == "overloaded"
    affinity.remember(keys2, other)
    assert affinity.choose(keys2 + [b"x" * 16], {"a": 0, "b": 0}).router == other  # it lives there now
    affinity.remember([b"y" * 16], "a")
    affinity.remember([b"z" * 16], "a")
    assert len(affinity.table) == 2 and keys2[-1] not in affinity.table  # bounded: least recent forgotten
    affinity.forget("a")
    assert not affinity.table
