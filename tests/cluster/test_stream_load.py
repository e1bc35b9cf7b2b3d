"""Stream-loading prefill (issue 23): which experts without a fast copy stream their weights to
the fast tier for one step, and where that starts to pay (the crossover)."""
import pytest

from cluster.stream_load import StreamCosts, crossover_rows, stream_set

# 25 GB/s link; fast row 0.1 ms, host row 1 ms: a 9 MB expert crosses the link in 0.36 ms
PCIE = StreamCosts(link_bytes_per_s=25e9, fast_row_s=1e-4, host_row_s=1e-3)


@pytest.mark.parametrize("expert_bytes,costs,expected", [
    (9_000_000, PCIE, 1),  # 0.36 ms of link < one host row's 0.9 ms saving
    (90_000_000, PCIE, 5),  # 3.6 ms / 0.9 ms = 4 rows break even: 5 rows strictly cheaper
    (352_321_536, PCIE, 16),  # a Mixtral-8x7B expert (bf16): 14.1 ms of link
    (90_000_000, StreamCosts(25e9, 1e-3, 1e-3), None),  # a host row as fast as a fast row: never
    (90_000_000, StreamCosts(25e9, 2e-3, 1e-3), None),
    (0, PCIE, 1),
])
def test_crossover_rows(expert_bytes, costs, expected):
    assert crossover_rows(expert_bytes, costs) == expected


def test_crossover_is_where_streaming_becomes_cheaper():
    eb = 90_000_000
    least = crossover_rows(eb, PCIE)
    stream = lambda n: PCIE.link_s(eb) + n * PCIE.fast_row_s  # noqa: E731
    assert stream(least) < least * PCIE.host_row_s
    assert stream(least - 1) >= (least - 1) * PCIE.host_row_s


@pytest.mark.parametrize("counts,fast,max_streams,expected", [
    # 90 MB expert (3.6 ms of link, crossover 5 rows); one worker per tier
    ([0, 4, 5, 40, 6], frozenset(), 8, {3, 4}),  # 5 rows would put 15.9 ms on the fast side: more than 11.8
    ([0, 4, 5, 40, 6], frozenset({3}), 8, {4}),  # a fast copy already: not streamed
    ([0, 4, 5, 40, 6], frozenset(), 1, {3}),  # room for 1: the most rows first
    ([9, 9, 9], frozenset(), 2, {0, 1}),  # ties: lower id first
    ([1, 2, 3, 4], frozenset(), 8, set()),  # decode-sized steps stay on the host
    ([50, 50], frozenset(), 0, set()),  # no scratch room
])
def test_stream_set(counts, fast, max_streams, expected):
    assert stream_set(counts, fast, 90_000_000, PCIE, max_streams=max_streams) == expected


def test_never_streams_when_it_cannot_pay():
    assert stream_set([500, 500], frozenset(), 1, StreamCosts(25e9, 1e-3, 1e-3), max_streams=4) == frozenset()


@pytest.mark.parametrize("field", ["link_bytes_per_s", "fast_row_s", "host_row_s"])
def test_costs_refuse_non_positive(field):
    args = {"link_bytes_per_s": 25e9, "fast_row_s": 1e-4, "host_row_s": 1e-3, field: 0}
    with pytest.raises(ValueError, match=field):
        StreamCosts(**args)


# 9 MB expert, crossover 1 row; fast row 0.1 ms, host row 1 ms, link 0.36 ms
@pytest.mark.parametrize("counts,fast,workers,expected", [
    ([30, 0, 0, 0], frozenset(), (1, 1), {0}),  # host 30 ms → fast 0.36 + 3 ms
    ([30, 20, 0, 0], frozenset({0}), (1, 1), {1}),  # fast 3 ms, host 20 ms → fast 5.4, host 0
    ([400, 2, 0, 0], frozenset({0}), (1, 1), set()),  # the fast tier is the slower: streaming only adds to it
    ([2, 2, 2, 2], frozenset(), (1, 16), set()),  # 16 host workers: 0.5 ms, less than one stream's 0.56
    ([60, 60, 60, 60], frozenset(), (2, 16), {0, 1}),  # host 15 ms → 7.5; a third would put 9.5 ms on the fast side
])
def test_stream_set_only_when_the_layer_ends_sooner(counts, fast, workers, expected):
    nf, nh = workers
    assert stream_set(counts, fast, 9_000_000, PCIE, max_streams=8, fast_workers=nf, host_workers=nh) == expected


def test_stream_set_refuses_an_empty_tier():
    with pytest.raises(ValueError, match="host_workers"):
        stream_set([5], frozenset(), 1, PCIE, max_streams=1, host_workers=0)
