"""Grouped expert compute (one grouped matmul per projection, counts left on the device) against
the loop-over-experts reference: experts without rows, all rows to one expert, subsets held by a
worker in any order, biases and clamped SwiGLU, another dtype, and copies added and removed."""
import pytest
import torch

from cluster.model.dispatch import dispatch
from cluster.model.experts import LocalExperts, reference_moe, swiglu
from cluster.model.gating import Gating
from cluster.model.grouped import sync_free_reason
from cluster.model.moe import moe_block
from cluster.model.weights import AttentionWeights, ExpertActivation, LayerWeights, MLPWeights

D, I, E = 16, 24, 8


def _experts(seed: int, bias: bool = False, activation: ExpertActivation = ExpertActivation(), d: int = D):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    return {(0, e): MLPWeights(rnd(2 * I, d), rnd(d, I), rnd(2 * I) if bias else None, rnd(d) if bias else None,
                               activation) for e in range(E)}


def _layer(gate: torch.Tensor) -> LayerWeights:
    attn = AttentionWeights(*(torch.empty(0) for _ in range(4)))
    return LayerWeights(torch.ones(gate.shape[1]), attn, torch.ones(gate.shape[1]), gate=gate)


def _loop(experts, layer, rows, expert_ids, counts):
    out, start = torch.empty_like(rows), 0
    for e, n in zip(expert_ids, counts):
        out[start:start + n] = swiglu(rows[start:start + n], experts[(layer, e)])
        start += n
    return out


def test_grouped_path_is_the_one_used_on_cpu():
    assert LocalExperts(_experts(0)).grouped


@pytest.mark.parametrize("choice", ["random", "all_to_one", "two_of_eight"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_moe_equals_the_reference(choice, top_k):
    experts = _experts(1)
    gate = torch.randn(E, D, generator=torch.Generator().manual_seed(2))
    if choice != "random":  # every token's logits favour expert 3 (and 6): the others get 0 rows
        gate = torch.full((E, D), -3.0)
        gate[3] = 3.0
        gate[6] = 2.0 if choice == "two_of_eight" else -1.0
    x = torch.rand(33, D) + 0.1
    local = LocalExperts(experts)
    out, routing = moe_block(x, _layer(gate), 0, Gating(top_k, True), local)
    counts = dispatch(routing.ids, E).counts
    if choice != "random":
        assert sum(n == 0 for n in counts) >= E - 2 and counts[3] == 33
    torch.testing.assert_close(out, reference_moe(x, gate, experts, 0, top_k, True), atol=1e-5, rtol=1e-5)


def test_subset_in_any_order_with_empty_groups():
    """A worker holding some experts gets them in the caller's order, some with 0 rows."""
    experts = _experts(3)
    held = {k: v for k, v in experts.items() if k[1] in (1, 4, 5, 7)}
    worker = LocalExperts(held)
    rows = torch.randn(11, D)
    for ids, counts in (([1, 4, 5, 7], [3, 0, 6, 2]), ([7, 1, 5], [4, 4, 3]), ([5], [11]), ([4, 1], [0, 0])):
        n = sum(counts)
        got = worker.run_subset(0, rows[:n], ids, counts)
        torch.testing.assert_close(got, _loop(experts, 0, rows[:n], ids, counts), atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError):
        worker.run_subset(0, rows[:2], [2], [2])


def test_biases_and_clamped_swiglu():
    experts = _experts(4, bias=True, activation=ExpertActivation("clamped_swiglu", 1.702, 7.0))
    rows, counts = torch.randn(20, D) * 3, [5, 0, 0, 9, 1, 0, 5, 0]
    got = LocalExperts(experts).run(0, rows, counts)
    torch.testing.assert_close(got, _loop(experts, 0, rows, range(E), counts), atol=1e-5, rtol=1e-5)


def test_experts_in_another_dtype_take_rows_in_the_callers():
    experts = {k: MLPWeights(w.gate_up.bfloat16(), w.down.bfloat16()) for k, w in _experts(5).items()}
    rows, counts = torch.randn(9, D), [2, 2, 0, 0, 5, 0, 0, 0]
    got = LocalExperts(experts).run(0, rows, counts)
    want = _loop(experts, 0, rows.bfloat16(), range(E), counts).float()
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.02 * want.abs().max()


def test_shapes_grouped_mm_refuses_fall_back_to_the_loop():
    """grouped_mm wants rows of a multiple of 16 bytes; a hidden size of 6 floats runs the loop."""
    experts = _experts(6, d=6)
    local = LocalExperts(experts)
    assert not local.grouped and "grouped_mm refused these shapes" in local.loop_reason
    rows, counts = torch.randn(7, 6), [0, 7, 0, 0, 0, 0, 0, 0]
    torch.testing.assert_close(local.run(0, rows, counts), _loop(experts, 0, rows, range(E), counts))


def test_copies_added_and_removed_restack_the_layer():
    experts = _experts(7)
    local = LocalExperts({k: v for k, v in experts.items() if k[1] < 4})
    local.add({k: v for k, v in experts.items() if k[1] >= 4})
    assert local.held() == sorted(experts)
    rows, counts = torch.randn(8, D), [1] * E
    torch.testing.assert_close(local.run(0, rows, counts), _loop(experts, 0, rows, range(E), counts),
                               atol=1e-5, rtol=1e-5)
    local.remove([(0, 2)])
    assert not local.holds(0, 2)
    with pytest.raises(KeyError):
        local.run(0, rows, counts)
    keep = [e for e in range(E) if e != 2]
    torch.testing.assert_close(local.run_subset(0, rows[:7], keep, [1] * 7),
                               _loop(experts, 0, rows[:7], keep, [1] * 7), atol=1e-5, rtol=1e-5)


CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("device,dtype,capability,grouped", [
    (CPU, torch.float32, None, True),
    (CPU, torch.bfloat16, None, True),
    (CUDA, torch.bfloat16, (9, 0), True),  # H100/H200: CUTLASS grouped GEMM, offsets stay on the device
    (CUDA, torch.bfloat16, (10, 0), True),  # B200
    (CUDA, torch.float32, (9, 0), False),  # fp32 on an H100: torch's fallback, offs.cpu() + a loop
    (CUDA, torch.float16, (9, 0), False),
    (CUDA, torch.bfloat16, (8, 0), False),  # A100
    (CUDA, torch.bfloat16, (8, 9), False),  # L40S
    (CUDA, torch.bfloat16, (12, 0), False),  # consumer Blackwell: no SM100 kernel either
    (CUDA, torch.bfloat16, None, False),
])
def test_grouped_mm_is_used_only_where_it_is_sync_free(device, dtype, capability, grouped):
    reason = sync_free_reason(device, dtype, capability)
    assert (reason is None) == grouped
    if not grouped:
        assert "sync-free only in bfloat16 on 9.x/10.x" in reason and str(capability) in reason


def test_experts_are_loaded_and_stacked_one_layer_at_a_time():
    """Each layer is stacked before the next is read: loading never holds every expert twice."""
    experts = {(layer, e): w for layer in (1, 3, 4) for (_, e), w in _experts(layer).items()}
    live = []

    def load(pairs):
        live.append(sorted({layer for layer, _ in pairs}))
        return {p: experts[p] for p in pairs}

    local = LocalExperts.stacked_by_layer(list(experts), load)
    assert live == [[1], [3], [4]]  # one layer per read
    assert local.held() == sorted(experts) and local.grouped
    whole = LocalExperts(experts)
    rows, counts = torch.randn(10, D), [1, 0, 3, 0, 2, 4, 0, 0]
    for layer in (1, 3, 4):
        torch.testing.assert_close(local.run(layer, rows, counts), whole.run(layer, rows, counts))
