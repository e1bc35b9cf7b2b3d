import math

import pytest
import torch

from cluster.model.gating import route


def test_softmax_topk_renormalised():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    weights, ids = route(logits, top_k=2, normalize=True)
    assert ids.tolist() == [[1, 2]]
    e = [math.exp(3.0), math.exp(2.0)]
    assert weights[0].tolist() == pytest.approx([e[0] / sum(e), e[1] / sum(e)], abs=1e-6)


def test_without_renormalisation_weights_are_softmax_probabilities():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    weights, ids = route(logits, top_k=2, normalize=False)
    assert weights[0].tolist() == pytest.approx([0.25, 0.25])
    assert len(set(ids[0].tolist())) == 2


def test_fp32_even_for_half_inputs():
    weights, _ = route(torch.randn(5, 8, dtype=torch.bfloat16), 2, True)
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
    weights, ids = route(logits, top_k=3, normalize=True)
    assert ((ids >= 0) & (ids < 8)).all()
    assert all(len(set(row)) == 3 for row in ids.tolist())
    assert torch.isfinite(weights).all()
    if pattern == "one":
        assert not (ids == 3).any(), "a NaN score must never win over a real one"
