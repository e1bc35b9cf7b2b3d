"""Prefix-aware choice of a router: affinity to where a prefix went, load as the tie-breaker, a cap
so a hot prefix cannot overload one router, least-loaded for anything else."""
import pytest

from cluster.prefix_routing import PrefixAffinity, choose_router, prefix_key

K, OTHER = b"k" * 16, b"o" * 16


@pytest.mark.parametrize("key,loads,affinity,expected", [
    (None, {"a": 3, "b": 1}, {}, ("b", "least_loaded")),  # a prompt shorter than a block
    (K, {"a": 3, "b": 1}, {}, ("b", "least_loaded")),  # a prefix never seen
    (K, {"a": 2, "b": 2}, {}, ("a", "least_loaded")),  # equal load: the lower id, deterministic
    (K, {"a": 3, "b": 1}, {K: "a"}, ("a", "affinity")),  # 2 above the least loaded: within the cap
    (K, {"a": 6, "b": 1}, {K: "a"}, ("b", "overloaded")),  # 5 above: the cap (4) sends it elsewhere
    (K, {"b": 1, "c": 0}, {K: "a"}, ("c", "least_loaded")),  # its router is gone
    (OTHER, {"a": 0, "b": 0}, {K: "b"}, ("a", "least_loaded")),
])
def test_choose_router(key, loads, affinity, expected):
    choice = choose_router(key, loads, affinity, max_imbalance=4)
    assert (choice.router, choice.reason) == expected


def test_prefix_key_names_the_leading_blocks_only():
    system = list(range(32))
    assert prefix_key(system + [1, 2], 16) == prefix_key(system + [7], 16) == prefix_key(system[:16], 16)
    assert prefix_key(system, 16, num_blocks=2) != prefix_key(system, 16)
    assert prefix_key(system[:15], 16) is None


def test_conversations_stick_to_their_router_until_it_is_too_busy():
    affinity = PrefixAffinity(max_imbalance=2, capacity=2)
    loads = {"a": 0, "b": 0}
    first = affinity.choose(K, loads)
    loads[first.router] += 1
    second = affinity.choose(OTHER, loads)  # another conversation goes to the idle router
    assert first.router != second.router
    assert affinity.choose(K, {"a": 5, "b": 4}).router == first.router  # later turns follow the cache
    busy = {first.router: 9, second.router: 0}
    assert affinity.choose(K, busy).reason == "overloaded"
    assert affinity.choose(K, {"a": 0, "b": 0}).router == second.router  # the prefix now lives there too
    affinity.choose(b"x" * 16, loads)
    assert len(affinity.table) == 2 and OTHER not in affinity.table  # bounded: least recent forgotten
