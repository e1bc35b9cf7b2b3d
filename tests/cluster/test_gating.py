import math

import pytest
import torch

from cluster.model.gating import Gating, route


def test_softmax_topk_renormalised():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    weights, ids = route(logits, Gating(2, True))
    assert ids.tolist() == [[1, 2]]
    e = [math.exp(3.0), math.exp(2.0)]
    assert weights[0].tolist() == pytest.approx([e[0] / sum(e), e[1] / sum(e)], abs=1e-6)


def test_without_renormalisation_weights_are_softmax_probabilities():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    weights, ids = route(logits, Gating(2, False))
    assert weights[0].tolist() == pytest.approx([0.25, 0.25])
    assert len(set(ids[0].tolist())) == 2


def test_fp32_even_for_half_inputs():
    weights, _ = route(torch.randn(5, 8, dtype=torch.bfloat16), Gating(2, True))
    assert weights.dtype == torch.float32


@pytest.mark.parametrize("pattern", ["one", "row", "all"])
def test_nan_logits_keep_ids_in_range_and_distinct(pattern):
    torch.manual_seed(0)
    logits = torch.randn(16, 8)
    if pattern == "one":
        logits[:, 3] = float("nan")
    elif pattern == "row":
        logits[5] = float("nan")
    else:
        logits[:] = float("nan")
    weights, ids = route(logits, Gating(3, True))
    assert ((ids >= 0) & (ids < 8)).all()
    assert all(len(set(row)) == 3 for row in ids.tolist())
    assert torch.isfinite(weights).all()
    if pattern == "one":
        assert not (ids == 3).any(), "a NaN score must never win over a real one"


def test_sigmoid_scores_with_scale_and_renormalisation():
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    weights, ids = route(logits, Gating(2, True, scoring="sigmoid", scale=2.5))
    assert ids.tolist() == [[1, 3]]
    s = torch.sigmoid(torch.tensor([2.0, 1.0]))
    assert weights[0].tolist() == pytest.approx((s / s.sum() * 2.5).tolist(), abs=1e-6)


def test_bias_changes_the_choice_but_not_the_weights():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    g = Gating(1, False, scoring="sigmoid")
    w0, ids0 = route(logits, g)
    w1, ids1 = route(logits, g, bias=torch.tensor([0.0, 0.0, 0.0, 5.0]))
    assert ids0.tolist() == [[0]] and ids1.tolist() == [[3]]
    assert w1[0, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(0.0)).item())  # unbiased score


def test_group_limit_by_best_expert_v2_style():
    # groups {0,1} {2,3} {4,5} {6,7}; expert 7 is the single best, but group {0,1} holds the 2nd and 3rd
    probs = torch.tensor([[0.20, 0.19, 0.01, 0.01, 0.02, 0.02, 0.05, 0.50]])
    g = Gating(2, False, n_group=4, topk_group=1, group_score="max")
    _, ids = route(probs.log(), g)
    assert sorted(ids[0].tolist()) == [6, 7]  # only the best group (by its max) may be chosen from
    _, ids = route(probs.log(), Gating(2, False))
    assert sorted(ids[0].tolist()) == [0, 7]  # without the limit


def test_group_limit_by_top2_sum_v3_style():
    # group {0,1} sums to 1.6, group {2,3} has the single best (0.95) but sums to 0.96
    logits = torch.logit(torch.tensor([[0.8, 0.8, 0.95, 0.01, 0.1, 0.1, 0.1, 0.1]]))
    g = Gating(2, True, scoring="sigmoid", n_group=4, topk_group=1, group_score="top2_sum")
    _, ids = route(logits, g)
    assert sorted(ids[0].tolist()) == [0, 1]


def test_nan_with_sigmoid_and_groups_stays_in_range():
    logits = torch.randn(32, 8)
    logits[::3, 2] = float("nan")
    logits[5] = float("nan")
    weights, ids = route(logits, Gating(2, True, scoring="sigmoid", n_group=4, topk_group=2,
                                        group_score="top2_sum", scale=2.5), bias=torch.randn(8))
    assert ((ids >= 0) & (ids < 8)).all() and all(len(set(r)) == 2 for r in ids.tolist())
    assert torch.isfinite(weights).all()


def test_topk_sigmoid_weighs_the_best_logits_by_their_sigmoid():
    """Llama 4: top-k on the logits, each weight the sigmoid of its own logit (no renormalisation)."""
    weights, ids = route(torch.tensor([[0.5, -1.0, 2.0, 1.0]]), Gating(2, False, "topk_sigmoid"))
    assert ids.tolist() == [[2, 3]]
    assert weights[0].tolist() == pytest.approx([1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-1.0))], abs=1e-6)
