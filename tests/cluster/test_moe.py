"""The fast MoE path (route → dispatch → experts → combine) against the loop-over-experts reference."""
import itertools

import pytest
import torch

from cluster.model.dispatch import dispatch
from cluster.model.experts import LocalExperts, reference_moe
from cluster.model.gating import Gating
from cluster.model.moe import moe_block
from cluster.model.weights import AttentionWeights, LayerWeights, MLPWeights

D, I = 16, 24


def _layer(num_experts: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    experts = {(0, e): MLPWeights(rnd(2 * I, D), rnd(D, I)) for e in range(num_experts)}
    attn = AttentionWeights(*(torch.empty(0) for _ in range(4)))
    return LayerWeights(torch.ones(D), attn, torch.ones(D), gate=rnd(num_experts, D)), experts


@pytest.mark.parametrize("num_experts,top_k,num_tokens,normalize",
                         [(e, k, t, n) for e, k, t, n in itertools.product([1, 4, 8, 16], [1, 2, 4], [0, 1, 2, 7, 64],
                                                                           [True, False]) if k <= e])
def test_fast_path_matches_reference(num_experts, top_k, num_tokens, normalize):
    layer, experts = _layer(num_experts, seed=num_experts * 100 + top_k)
    x = torch.randn(num_tokens, D, generator=torch.Generator().manual_seed(num_tokens))
    out, routing = moe_block(x, layer, 0, Gating(top_k, normalize), LocalExperts(experts))
    ref = reference_moe(x, layer.gate, experts, 0, top_k, normalize)
    assert out.shape == (num_tokens, D)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert routing.ids.shape == (num_tokens, top_k)


def test_experts_without_tokens_get_no_compute():
    layer, experts = _layer(8, seed=1)
    calls = []

    class Spy(LocalExperts):
        def run(self, layer_id, rows, counts):
            calls.append(list(counts))
            return super().run(layer_id, rows, counts)

    # every token's gate logits point at experts 2 and 5
    gate = torch.full((8, D), -5.0)
    gate[2] = gate[5] = 5.0
    layer = LayerWeights(layer.attn_norm, layer.attn, layer.mlp_norm, gate=gate)
    x = torch.ones(6, D)
    out, _ = moe_block(x, layer, 0, Gating(2, True), Spy(experts))
    assert calls == [[0, 0, 6, 0, 0, 6, 0, 0]]
    torch.testing.assert_close(out, reference_moe(x, gate, experts, 0, 2, True))


def test_dispatch_groups_rows_by_expert():
    ids = torch.tensor([[3, 0], [0, 2], [3, 1]])
    plan = dispatch(ids, 4)
    assert plan.counts == (2, 1, 1, 2)
    assert ids.reshape(-1)[plan.order].tolist() == [0, 0, 1, 2, 3, 3]
    assert plan.token_index.tolist() == [0, 1, 2, 1, 0, 2]


def test_nan_gate_logits_are_served():
    layer, experts = _layer(8, seed=3)
    gate = layer.gate.clone()
    gate[4] = float("nan")
    layer = LayerWeights(layer.attn_norm, layer.attn, layer.mlp_norm, gate=gate)
    out, routing = moe_block(torch.randn(10, D), layer, 0, Gating(2, True), LocalExperts(experts))
    assert ((routing.ids >= 0) & (routing.ids < 8)).all()
    assert all(len(set(r)) == 2 for r in routing.ids.tolist())


def test_combine_sums_each_tokens_rows_in_fp32_in_a_fixed_order():
    """bf16 combine: each token's K outputs summed in fp32 in (token, k) order, so the result does not
    depend on how rows were sorted (an index_add_ into bf16 is a CUDA atomicAdd, order varies)."""
    from cluster.model.dispatch import DispatchPlan, combine

    g = torch.Generator().manual_seed(3)
    t, k, d = 64, 8, 32
    ids = torch.stack([torch.randperm(16, generator=g)[:k] for _ in range(t)])  # [T, K]
    weights = torch.rand(t, k, generator=g).softmax(-1)
    per_pair = (torch.randn(t, k, d, generator=g) * 4).bfloat16()  # each (token, k) row's expert output
    want = (per_pair.float() * weights[..., None]).sum(1).bfloat16()
    plan = dispatch(ids, 16)
    results = []
    for order in (plan.order, plan.order.flip(0)):  # two valid sortings of the same rows
        p = DispatchPlan(order, order // k, plan.counts, t)
        results.append(combine(per_pair.reshape(t * k, d).index_select(0, order), p, weights))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], want)
    assert results[0].dtype == torch.bfloat16
    naive = torch.zeros(t, d, dtype=torch.bfloat16)  # what index_add_ in bf16 gives in the flipped order
    flipped = plan.order.flip(0)
    naive.index_add_(0, flipped // k, per_pair.reshape(t * k, d)[flipped]
                     * weights.reshape(-1)[flipped, None].bfloat16())
    assert not torch.equal(naive, want)  # the order-dependent result this replaces
