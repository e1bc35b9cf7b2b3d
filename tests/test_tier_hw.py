"""bench/tier_hw.py on the CPU with tiny shapes (the fast tier is the CPU too): the JSON's shape, the
tiered layer's output against all-fast's and against a per-(token, k) loop, and the budget."""
import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--fast-dtype", "float32", "--shapes", "64x32x16x4", "--layer-shape", "64x32x16x4",
        "--rows", "1,4,16", "--zipf", "0,1.5", "--batches", "4,8", "--fast-share", "0.25", "--max-s", "0.002"]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.setdefault(name, module)
    return module


def test_tiny_cpu_run_writes_every_part_and_tiered_equals_all_fast(tmp_path, capsys):
    assert _bench("tier_hw").main(TINY + ["--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "tier_hw.json").read_text())
    assert result["environment"]["cpu_threads"] >= 1 and result["environment"]["torch"] == torch.__version__
    layer = result["parts"]["layer"]
    assert [(r["zipf"], r["tokens"]) for r in layer["runs"]] == [(0, 4), (0, 8), (1.5, 4), (1.5, 8)]
    for run in layer["runs"]:
        modes = run["modes"]
        assert list(modes) == ["all-fast", "tiered-profile", "tiered-uniform", "all-host"]
        assert modes["all-fast"]["fast_row_share"] == 1 and modes["all-host"]["fast_row_share"] == 0
        for m in modes.values():
            assert m["ms"] > 0 and m["all_fast_ms_over_mode_ms"] > 0
            assert m["max_rel_diff_vs_all_fast"] < 1e-5  # float32 on both tiers: the split and combine are exact
        profiled = modes["tiered-profile"]  # each tier alone and the step with neither, to see the overlap
        assert profiled["fast_alone_ms"] > 0 and profiled["host_alone_ms"] > 0 and profiled["neither_ms"] > 0
        assert "overlap" in profiled
    expert = result["parts"]["expert"]["shapes"]["64x32x16x4"]
    assert set(expert["tiers"]) == {"fast", "host-float32", "host-bfloat16"}
    fast = expert["tiers"]["fast"]
    assert list(fast["ms_per_call"]) == ["1", "4", "16"] and fast["max_rel_diff_vs_cpu_fp32"] < 1e-5
    assert expert["tiers"]["host-bfloat16"].get("max_rel_diff_vs_cpu_fp32", 0) < 0.05
    link = result["parts"]["link"]["shapes"]["64x32x16x4"]
    assert link["expert_bytes"] == 3 * 64 * 32 * 2 and link["pageable"]["MB_per_s"] > 0
    assert "error" in link["pinned"]  # no CUDA here: said, not crashed
    assert set(link["crossover"]) == {"link", "host-float32", "host-bfloat16"}
    check = result["model_check"]  # tier_bench's model with part 1's costs, next to part 3's layers
    assert check["host_tier"] == "host-float32" and len(check["runs"]) == 4
    assert set(check["runs"][0]["all_fast_over_mode"]["all-host"]) == {"measured", "rows_model", "calls_model"}
    assert check["runs"][0]["all_fast_over_mode"]["all-fast"]["rows_model"] == 1
    assert "3. layer 64x32x16x4" in capsys.readouterr().out


def test_tiered_layer_matches_a_per_token_loop():
    from cluster.model.layers import swiglu

    tl = _bench("tier_layer")
    shape = tl.Shape("tiny", 64, 32, 16, 4)
    weights = tl.random_experts(shape, range(16), seed=1, device=torch.device("cpu"))
    profile, ids = tl.routed_batch(shape, 1.5, 12, profile_tokens=256, seed=1)
    cpu, f32 = torch.device("cpu"), torch.float32
    every = tl.holders(shape, weights, device=cpu, fast_dtype=f32, host_dtype=f32)
    modes = tl.tierings(shape, weights, profile, every, fast_share=0.25, device=cpu, fast_dtype=f32)
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(2))
    w = torch.softmax(torch.randn(12, 4, generator=torch.Generator().manual_seed(3)), -1)
    want = torch.stack([sum(w[t, k] * swiglu(x[t:t + 1], weights[int(ids[t, k])])[0] for k in range(4))
                        for t in range(12)])
    for m in modes:
        torch.testing.assert_close(tl.layer_step(m, x, ids, w, 16), want, rtol=1e-5, atol=1e-5)


def test_the_matching_profile_puts_more_rows_on_the_fast_tier_than_uniform():
    tl = _bench("tier_layer")
    shape = tl.Shape("tiny", 64, 32, 32, 4)
    weights = tl.random_experts(shape, range(32), seed=0, device=torch.device("cpu"))
    profile, ids = tl.routed_batch(shape, 1.5, 256, profile_tokens=2048, seed=0)
    every = tl.holders(shape, weights, device=torch.device("cpu"), fast_dtype=torch.float32, host_dtype=torch.float32)
    modes = {m.name: m for m in tl.tierings(shape, weights, profile, every, fast_share=0.125,
                                            device=torch.device("cpu"), fast_dtype=torch.float32)}
    share = {n: tl.tier_load(m, ids, 32)["fast_row_share"] for n, m in modes.items()}
    assert share["tiered-profile"] > 0.4 > share["tiered-uniform"]  # 4 of 32 experts: 12.5% if uniform
    assert share["all-host"] == 0 and share["all-fast"] == 1


def test_a_spent_budget_skips_every_part_and_still_writes_the_json(tmp_path):
    assert _bench("tier_hw").main(TINY + ["--out", str(tmp_path), "--budget-s", "0"]) == 0
    parts = json.loads((tmp_path / "tier_hw.json").read_text())["parts"]
    assert parts == {p: {"skipped": ["budget"]} for p in ("layer", "expert", "link")}


def test_an_expert_parallel_host_gives_the_same_layer(tmp_path):
    """--host-workers 3: the host rows cut into per-thread shares of experts; the combine must not move a row."""
    args = TINY + ["--parts", "layer", "--host-workers", "3", "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    assert _bench("tier_hw").main(args) == 0
    assert torch.get_num_threads() == threads  # the part gives torch its threads back
    layer = json.loads((tmp_path / "tier_hw.json").read_text())["parts"]["layer"]
    assert layer["host_workers"] == 3
    for run in layer["runs"]:
        for m in run["modes"].values():
            assert m["max_rel_diff_vs_all_fast"] < 1e-5


def test_shares_cut_groups_by_rows_and_keep_their_order():
    shares = _bench("tier_layer")._shares([(0, 0, 5), (3, 5, 1), (4, 6, 1), (7, 7, 5), (9, 12, 1)], 3)
    assert [g for s in shares for g in s] == [(0, 0, 5), (3, 5, 1), (4, 6, 1), (7, 7, 5), (9, 12, 1)]
    assert len(shares) == 3 and all(shares)


def test_tier_plot_buckets_count_tokens_and_leave_empty_windows_unset():
    per_bucket = _bench("tier_plot")._per_bucket
    gaps = [(0.1, 0.01), (0.5, 0.02), (2.2, 0.03)]  # (time s, gap s)
    centres, counts = per_bucket(gaps, 3.0, 1.0, lambda v: float(len(v)))
    assert centres.tolist() == [0.5, 1.5, 2.5] and counts.tolist() == [2.0, 0.0, 1.0]
    _, worst = per_bucket(gaps, 3.0, 1.0, lambda v: float(v.max()) if len(v) else float("nan"))
    assert worst[0] == 0.02 and worst[1] != worst[1] and worst[2] == 0.03  # NaN where no token came


def test_model_check_prices_a_tier_whose_calls_did_not_grow_with_rows():
    """Tiny shapes on a CPU can time 16 rows no slower than 1 (a slope ≤ 0): the rows model then
    takes the largest call's time per row, so all-fast still prices itself at 1, not 0."""
    flat = {"ms_per_call": {1: 0.02, 16: 0.02}, "ms_per_row_at": {1: 0.02, 16: 0.00125}, "ms_per_row_slope": -0.0001}
    host = {"ms_per_call": {1: 0.1, 16: 1.6}, "ms_per_row_at": {1: 0.1, 16: 0.1}, "ms_per_row_slope": 0.1}
    def mode(fast_rows, host_rows, measured):
        return {"fast": {"rows": fast_rows, "experts": 1}, "host": {"rows": host_rows, "experts": 1},
                "all_fast_ms_over_mode_ms": measured}

    layer = {"shape": {"name": "s"}, "runs": [{"zipf": 1, "tokens": 8, "modes": {
        "all-fast": mode(8, 0, 1), "all-host": mode(0, 8, 0.1)}}]}
    check = _bench("tier_hw").model_check(layer, {"s": {"tiers": {"fast": flat, "host-float32": host}}}, "host-float32")
    assert check["costs_ms"]["fast"]["row_ms"] == 0.00125
    modes = check["runs"][0]["all_fast_over_mode"]
    assert modes["all-fast"]["rows_model"] == 1 and modes["all-host"]["rows_model"] == round(8 * 0.00125 / 0.8, 4)
