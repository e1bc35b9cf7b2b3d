"""One real tiered MoE layer for bench/tier_hw.py (part 3): a layer's experts split between a fast
device and the host CPU, timed as KTransformers runs it, with the project's own pieces.

Shapes: T tokens, K top-k, N = T·K routed rows, E experts, D hidden, I expert intermediate.

Modes (one layer, the same routed batch and the same weights in each):
  all-fast        every expert on the fast device: dispatch → LocalExperts.run → combine, no host read;
  tiered-profile  the fast tier holds the hottest `fast_share` of the experts by a profile drawn from the
                  same routing distribution (cluster.tiers.fast_sets, "frequency"); the host holds every
                  expert (cluster.tiers.tier_placement); rows go to copies by cluster.tier_choice;
  tiered-uniform  the same room filled without load (cluster.tiers.uniform_sets: KTransformers' uniform);
  all-host        no fast copies: every row to the host CPU and back.
A tiered step copies the host rows to the CPU first, then launches the fast rows' kernels (they return
at once), computes the host rows on the CPU while the GPU runs, and copies them back to combine: the
copy goes first because on one stream a device → host copy queued after the kernels would wait for them.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from cluster.copy_choice import Group  # noqa: E402
from cluster.model.dispatch import combine, dispatch, gather_rows  # noqa: E402
from cluster.model.experts import LocalExperts  # noqa: E402
from cluster.model.weights import MLPWeights  # noqa: E402
from cluster.tier_choice import choose_tiered  # noqa: E402
from cluster.tiers import FAST, HOST, TierWorker, fast_sets, row_costs, tier_placement, uniform_sets  # noqa: E402
from hw_timing import Budget, measure, sync  # noqa: E402
from tier_bench import synthetic  # noqa: E402

LAYER = 0
FAST_W, HOST_W = 0, 1  # worker indices: one fast worker, one host worker
NEITHER = -1  # layer_step's `only` for no worker: the step's own work
MODES = ("all-fast", "tiered-profile", "tiered-uniform", "all-host")


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int  # D
    intermediate: int  # I
    num_experts: int  # E
    top_k: int  # K

    def expert_bytes(self, dtype: torch.dtype) -> int:
        return 3 * self.hidden * self.intermediate * dtype.itemsize


def random_experts(shape: Shape, ids, *, seed: int, device: torch.device) -> dict[int, MLPWeights]:
    """expert_id → float32 SwiGLU weights, drawn on `device` (fast where it is a GPU), scaled so a row's
    output stays O(1) and bf16 comparisons mean something."""
    g = torch.Generator(device=device).manual_seed(seed)
    d, i = shape.hidden, shape.intermediate
    return {e: MLPWeights(torch.randn(2 * i, d, generator=g, device=device) * d ** -0.5,
                          torch.randn(d, i, generator=g, device=device) * i ** -0.5) for e in ids}


def held(weights: Mapping[int, MLPWeights], ids, device: torch.device, dtype: torch.dtype) -> LocalExperts:
    """The experts `ids` of one layer as a worker holds them: stacked on `device` at `dtype`."""
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return LocalExperts({(LAYER, e): MLPWeights(cast(weights[e].gate_up), cast(weights[e].down)) for e in ids})


@dataclass(frozen=True)
class HostPool:
    """An expert-parallel host tier: `workers` pool threads, one torch thread each."""

    executor: ThreadPoolExecutor
    workers: int


@dataclass(frozen=True)
class Tiering:
    """One mode's experts: fast and host holders and which worker holds which copy."""

    name: str
    fast: LocalExperts | None
    host: LocalExperts | None
    copies: Mapping[tuple[int, int], tuple[int, ...]] | None  # None: all-fast, no copy choice
    host_pool: HostPool | None = None  # None: the host rows in one call on torch's intra-op threads


def holders(shape: Shape, weights, *, device: torch.device, fast_dtype: torch.dtype,
            host_dtype: torch.dtype) -> tuple[LocalExperts, LocalExperts]:
    """Every expert on the fast device and every expert on the host: built once, shared by the modes."""
    e_all = range(shape.num_experts)
    return held(weights, e_all, device, fast_dtype), held(weights, e_all, torch.device("cpu"), host_dtype)


def tierings(shape: Shape, weights, profile: np.ndarray, every: tuple[LocalExperts, LocalExperts], *,
             fast_share: float, device: torch.device, fast_dtype: torch.dtype,
             host_pool: HostPool | None = None) -> list[Tiering]:
    """The four modes. The host holds every expert in every tiered mode (as KTransformers does)."""
    slots = max(1, round(fast_share * shape.num_experts))
    out = [Tiering("all-fast", every[0], None, None)]
    for name, fast in (("tiered-profile", fast_sets(profile[None, :], slots)[0]),
                       ("tiered-uniform", uniform_sets(1, shape.num_experts, slots)[0]),
                       ("all-host", frozenset())):
        out.append(Tiering(name, held(weights, sorted(fast), device, fast_dtype) if fast else None, every[1],
                           _copies(shape, fast), host_pool))
    return out


def _copies(shape: Shape, fast: frozenset[int]) -> dict:
    eb = 1  # tier_placement counts copies by bytes: one unit per expert is the same count
    workers = [TierWorker(FAST, len(fast) * eb), TierWorker(HOST, shape.num_experts * eb)]
    return tier_placement((fast,), [LAYER], shape.num_experts, workers, eb).copies()


def layer_step(t: Tiering, x: Tensor, ids: Tensor, weights: Tensor, num_experts: int,
               only: int | None = None) -> Tensor:
    """One MoE layer's expert part, routing given: dispatch → expert compute (where `t` puts it) → combine.
    `only`: compute one worker's rows alone (FAST_W, HOST_W or NEITHER; other outputs are left unset), to
    time how much of the two tiers' work the concurrent step hides."""
    plan = dispatch(ids, num_experts)
    rows = gather_rows(x, plan)  # [N, D]
    if t.copies is None:
        out = t.fast.run(LAYER, rows, plan.counts)
    else:
        groups = choose_tiered(LAYER, list(plan.counts), t.copies, cost=row_costs([FAST, HOST]), down=set())
        out = run_tiers(t, rows, {w: g for w, g in groups.items() if only in (None, w)})
    return combine(out, plan, weights)  # [T, D]


def run_tiers(t: Tiering, rows: Tensor, groups: Mapping[int, list[Group]]) -> Tensor:
    """Rows sorted by expert → outputs, each worker's groups computed where it lives, both at once."""
    index = {w: _index(g, rows.device) for w, g in groups.items()}
    host_in = rows.index_select(0, index[HOST_W]).to("cpu") if HOST_W in groups else None  # before the kernels
    fast_out = _run(t.fast, rows.index_select(0, index[FAST_W]), groups[FAST_W]) if FAST_W in groups else None
    host_out = _run_host(t, host_in, groups[HOST_W]).to(rows.device) if host_in is not None else None
    out = torch.empty_like(rows)
    for w, y in ((FAST_W, fast_out), (HOST_W, host_out)):
        if y is not None:
            out[index[w]] = y
    return out


def _index(groups: list[Group], device: torch.device) -> Tensor:
    return torch.cat([torch.arange(s, s + n) for _, s, n in groups]).to(device)  # [rows of this worker]


def _run(experts: LocalExperts, rows: Tensor, groups: list[Group]) -> Tensor:
    return experts.run_subset(LAYER, rows, [e for e, _, _ in groups], [n for _, _, n in groups])


def _run_host(t: Tiering, rows: Tensor, groups: list[Group]) -> Tensor:
    """The host rows: in one call (torch's intra-op threads split each expert's matmuls), or, with a pool,
    expert-parallel: the groups cut into one share of rows per pool thread, each share's experts run
    one after another on one core, as a host tier of single-core workers would (KTransformers' CPU
    experts are parallel over experts too)."""
    if t.host_pool is None or len(groups) < 2:
        return _run(t.host, rows, groups)
    shares, starts = _shares(groups, t.host_pool.workers), [0]
    for sh in shares:  # `rows` holds only the host groups' rows, one group after another
        starts.append(starts[-1] + sum(n for _, _, n in sh))
    run = lambda i: _run(t.host, rows[starts[i]:starts[i + 1]], shares[i])  # noqa: E731
    outs = t.host_pool.executor.map(run, range(len(shares)))
    return torch.cat(list(outs))


def _shares(groups: list[Group], n: int) -> list[list[Group]]:
    """Consecutive groups cut into at most n shares of about equal rows (each at least one group)."""
    total, out, acc = sum(g[2] for g in groups), [[]], 0
    for g in groups:
        if out[-1] and acc >= total * len(out) / n and len(out) < n:
            out.append([])
        out[-1].append(g)
        acc += g[2]
    return out


def routed_batch(shape: Shape, zipf: float, tokens: int, *, profile_tokens: int, seed: int):
    """(profile loads [E], ids [T, K]) from one Zipf draw as tier_bench's --zipf makes it: the profile is the
    first `profile_tokens` tokens' loads, the batch the `tokens` after them (same distribution: a
    profile that matches)."""
    drawn = synthetic(1, shape.num_experts, shape.top_k, {"d"}, profile_tokens + tokens, zipf, seed)["d"][:, 0]
    profile = np.bincount(drawn[:profile_tokens].reshape(-1), minlength=shape.num_experts).astype(float)
    return profile, torch.from_numpy(drawn[profile_tokens:].copy())  # [E], [T, K]


def tier_load(t: Tiering, ids: Tensor, num_experts: int) -> dict:
    """Rows and experts called per tier for routed ids [T, K] under `t`'s copy choice, and the fast
    tier's share of the rows: what tier_bench's model (a time per row per tier) prices."""
    counts = np.bincount(ids.reshape(-1).numpy(), minlength=num_experts).tolist()
    if t.copies is None:
        groups = {FAST_W: [(e, 0, n) for e, n in enumerate(counts) if n]}
    else:
        groups = choose_tiered(LAYER, counts, t.copies, cost=row_costs([FAST, HOST]), down=set())
    load = {tier: {"rows": sum(n for _, _, n in groups.get(w, ())), "experts": len(groups.get(w, ()))}
            for tier, w in ((FAST, FAST_W), (HOST, HOST_W))}
    return {**load, "fast_row_share": round(load[FAST]["rows"] / max(sum(counts), 1), 4)}


def layer_part(shape: Shape, *, zipfs, batches, fast_share: float, device: torch.device, fast_dtype: torch.dtype,
               host_dtype: torch.dtype, seed: int, max_s: float, budget: Budget, profile_tokens: int = 4096,
               host_workers: int = 0) -> dict:
    """Part 3: layer ms per (zipf, batch, mode), all-fast ms ÷ mode ms, fast row share, and each mode's
    output against all-fast's (max |diff| over max |all-fast|: the combine is right when it is ~0).
    host_workers 0: the host rows in one call on torch's intra-op threads; N: expert-parallel on N
    single-thread workers (torch set to one thread for the part)."""
    if host_workers:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with ThreadPoolExecutor(host_workers) as pool:
            try:
                return _layer_part(shape, zipfs=zipfs, batches=batches, fast_share=fast_share, device=device,
                                   fast_dtype=fast_dtype, host_dtype=host_dtype, seed=seed, max_s=max_s,
                                   budget=budget, profile_tokens=profile_tokens,
                                   host_pool=HostPool(pool, host_workers))
            finally:
                torch.set_num_threads(threads)
    return _layer_part(shape, zipfs=zipfs, batches=batches, fast_share=fast_share, device=device,
                       fast_dtype=fast_dtype, host_dtype=host_dtype, seed=seed, max_s=max_s, budget=budget,
                       profile_tokens=profile_tokens, host_pool=None)


def _layer_part(shape: Shape, *, zipfs, batches, fast_share: float, device: torch.device, fast_dtype: torch.dtype,
                host_dtype: torch.dtype, seed: int, max_s: float, budget: Budget, profile_tokens: int,
                host_pool: HostPool | None) -> dict:
    weights = random_experts(shape, range(shape.num_experts), seed=seed, device=device)
    out = {"shape": shape.__dict__, "fast_share": fast_share, "fast_dtype": str(fast_dtype).removeprefix("torch."),
           "host_dtype": str(host_dtype).removeprefix("torch."), "runs": [], "skipped": [],
           "host_workers": host_pool.workers if host_pool else 0}
    every = holders(shape, weights, device=device, fast_dtype=fast_dtype, host_dtype=host_dtype)
    g = torch.Generator().manual_seed(seed)
    for zipf in zipfs:
        profile, all_ids = routed_batch(shape, zipf, max(batches), profile_tokens=profile_tokens, seed=seed)
        modes = tierings(shape, weights, profile, every, fast_share=fast_share, device=device, fast_dtype=fast_dtype,
                         host_pool=host_pool)
        out.setdefault("loop_reasons", {m.name: _loop_reasons(m) for m in modes})
        for tokens in batches:
            if budget.over():
                out["skipped"].append(f"zipf {zipf:g}, {tokens} tokens: budget")
                continue
            ids = all_ids[:tokens]
            x = torch.randn(tokens, shape.hidden, generator=g).to(device=device, dtype=fast_dtype)  # [T, D]
            w = torch.softmax(torch.randn(tokens, shape.top_k, generator=g), -1).to(device)  # [T, K]
            out["runs"].append(_modes_run(modes, x, ids.to(device), w, ids, shape, max_s, device, zipf))
    return out


def _modes_run(modes: list[Tiering], x, ids, w, host_ids, shape: Shape, max_s: float, device, zipf: float) -> dict:
    run = {"zipf": zipf, "tokens": x.shape[0], "modes": {}}
    ref = None
    for m in modes:
        step = lambda: layer_step(m, x, ids, w, shape.num_experts)  # noqa: E731
        y = step().float().cpu()
        ref = y if ref is None else ref
        timing = measure(step, device, max_s=max_s)
        diff = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        run["modes"][m.name] = {**timing, **tier_load(m, host_ids, shape.num_experts), "max_rel_diff_vs_all_fast": diff}
    profiled = next(m for m in modes if m.name == "tiered-profile")
    one = lambda only: layer_step(profiled, x, ids, w, shape.num_experts, only)  # noqa: E731
    run["modes"]["tiered-profile"].update(_overlap(run["modes"]["tiered-profile"]["ms"], one, device, max_s))
    fast_ms = run["modes"]["all-fast"]["ms"]
    for r in run["modes"].values():
        r["all_fast_ms_over_mode_ms"] = round(fast_ms / r["ms"], 4)
    p, u = run["modes"]["tiered-profile"]["ms"], run["modes"]["tiered-uniform"]["ms"]
    run["profile_speed_over_uniform"] = round(u / p, 4)
    sync(device)
    return run


def _overlap(ms: float, step, device, max_s: float) -> dict:
    """Each tier's rows timed alone, the step with neither (dispatch, copy choice, combine), and how
    much of the shorter tier's own time the concurrent step hid: 1 = all (the layer took as long as
    its slower tier), 0 = none (the tiers ran one after the other)."""
    alone = {w: measure(lambda: step(w), device, max_s=max_s)["ms"] for w in (FAST_W, HOST_W, NEITHER)}
    base = alone[NEITHER]
    shorter = min(alone[FAST_W], alone[HOST_W]) - base
    hidden = (alone[FAST_W] + alone[HOST_W] - base - ms) / shorter if shorter > 0 else None
    return {"fast_alone_ms": alone[FAST_W], "host_alone_ms": alone[HOST_W], "neither_ms": base,
            "overlap": round(hidden, 3) if hidden is not None else None}


def _loop_reasons(m: Tiering) -> dict:
    """Why a holder runs the per-expert loop instead of grouped_mm (None: grouped), per tier."""
    return {tier: (h.loop_reason if h is not None else "not held") for tier, h in (("fast", m.fast), ("host", m.host))}
