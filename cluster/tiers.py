"""Expert tiers: a fast tier (accelerator workers, a small byte budget) holds the hottest experts,
a host tier (host-memory workers, a large budget) holds the rest. Pure, no Ray.

Shapes: L MoE layers, E experts per layer; `fast[i]` = expert ids of MoE layer row i with a fast copy.

- `fast_sets`: which experts the fast tier's room goes to, from live load or a recorded profile;
- `tier_placement`: those choices -> copies on the workers of each tier (every expert keeps ≥ 1
  copy; no worker goes over its byte budget; copies stay where they are when they may);
- `decide`: the online step: promote experts that turned hot, demote cold ones, with hysteresis
  (a margin and a dwell) so alternating load does not make copies thrash.

Moving between two tier placements goes through `cluster.staging` like any placement change
(new copies load before old ones retire), so a promotion or a demotion never drops the last copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.placement import Expert, Placement

FAST, HOST = "fast", "host"
TIERS = (FAST, HOST)

FastSets = tuple[frozenset[int], ...]  # [L] expert ids of each MoE layer row with a fast copy


@dataclass(frozen=True)
class TierWorker:
    tier: str  # FAST or HOST
    budget_bytes: int  # bytes of expert copies it may hold

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ValueError(f"tier: {self.tier!r} is not one of {list(TIERS)}")
        if self.budget_bytes < 0:
            raise ValueError(f"budget_bytes: must be ≥ 0, got {self.budget_bytes}")

    def slots(self, expert_bytes: int) -> int:
        return self.budget_bytes // expert_bytes


HOST_COST = 10.0  # a host-tier row's time over a fast-tier row's, as copy choice weighs them


def row_costs(tiers: list[str]) -> list[float] | None:
    """Per worker, the relative time per row copy choice weighs its copies by; None when no
    worker has a tier (copies weigh alike). A worker without a tier counts as host."""
    if not any(tiers):
        return None
    return [1.0 if t == FAST else HOST_COST for t in tiers]


def tier_slots(workers: list[TierWorker], tier: str, expert_bytes: int) -> int:
    """Copies a tier holds, all its workers together."""
    return sum(w.slots(expert_bytes) for w in workers if w.tier == tier)


def fast_sets(loads: np.ndarray, fast_slots: int) -> FastSets:
    """[L, E] loads -> per layer, the experts that get the fast tier's `fast_slots` copies.

    Every layer waits for its slowest worker, so a step's host time is the sum over layers of
    their host rows: the copies go to the heaviest experts of all layers together, which are each
    layer's heaviest. Equal loads (no traffic yet, or no profile) spread the copies over the
    layers round-robin, lowest expert ids first: the uniform split."""
    loads = np.asarray(loads, dtype=float)
    n_layers, n_exp = loads.shape
    rank = np.argsort(np.argsort(-loads, axis=1, kind="stable"), axis=1, kind="stable")  # [L, E] 0 = hottest
    order = sorted(((-loads[i, e], rank[i, e], i, e) for i in range(n_layers) for e in range(n_exp)))
    chosen: list[set[int]] = [set() for _ in range(n_layers)]
    for _, _, i, e in order[:max(0, min(fast_slots, n_layers * n_exp))]:
        chosen[i].add(e)
    return tuple(frozenset(c) for c in chosen)


def uniform_sets(num_layers: int, num_experts: int, fast_slots: int) -> FastSets:
    """The same number of fast experts in every layer, chosen without load (KTransformers' uniform choice)."""
    return fast_sets(np.zeros((num_layers, num_experts)), fast_slots)


def layer_sets(num_layers: int, num_experts: int, fast_slots: int) -> FastSets:
    """Whole layers on the fast tier, the last layers first; the first layers' experts stay on the
    host (llama.cpp's `--n-cpu-moe N`): only layers that fit whole."""
    whole = min(num_layers, fast_slots // num_experts)
    return tuple(frozenset(range(num_experts)) if i >= num_layers - whole else frozenset()
                 for i in range(num_layers))


def tier_placement(fast: FastSets, moe_layers: list[int], num_experts: int, workers: list[TierWorker],
                   expert_bytes: int, loads: np.ndarray | None = None,
                   current: Placement | None = None, host_copies: int = 1) -> Placement:
    """Copies on the workers: each chosen fast expert on one fast worker, every other expert on a
    host worker. When the host tier has room for every expert it keeps them all (as KTransformers
    does), so a demotion loads nothing and losing a fast worker loses no expert; with less room,
    the experts with a fast copy get host copies while room lasts. A copy stays on the worker
    holding it now while that worker has room; new copies go to the tier's worker with the least
    load so far. `host_copies` > 1: the experts without a fast copy get that many host copies on
    different host workers, and the others as many backups while room lasts (a host worker may
    die, even with a fast worker down, without failing a request).
    Raises ValueError naming the tier when its budget cannot hold what it must."""
    n_layers = len(moe_layers)
    loads = np.ones((n_layers, num_experts)) if loads is None else np.asarray(loads, dtype=float)
    if len(fast) != n_layers:
        raise ValueError(f"fast sets for {len(fast)} layers, the model has {n_layers} MoE layers")
    room = [w.slots(expert_bytes) for w in workers]
    held = _held(current, len(workers))
    want_fast = [(loads[i, e], (moe_layers[i], e)) for i in range(n_layers) for e in sorted(fast[i])]
    host_only = [(loads[i, e], (moe_layers[i], e)) for i in range(n_layers) for e in range(num_experts)
                 if e not in fast[i]]
    slots: list[set[Expert]] = [set() for _ in workers]
    busy = [0.0] * len(workers)
    _fill(FAST, want_fast, workers, room, held, slots, busy, required=True)
    for _ in range(host_copies):
        _fill(HOST, host_only, workers, room, held, slots, busy, required=True)
    for _ in range(host_copies):  # backups of the fast experts, while room lasts
        _fill(HOST, [(0.0, x) for _, x in want_fast], workers, room, held, slots, busy, required=False)
    return Placement(tuple(tuple(sorted(s)) for s in slots))


def _held(current: Placement | None, num_workers: int) -> dict[Expert, list[int]]:
    held: dict[Expert, list[int]] = {}
    for expert, ws in (current.copies() if current else {}).items():
        held[expert] = [w for w in ws if w < num_workers]
    return held


def _fill(tier: str, todo: list[tuple[float, Expert]], workers: list[TierWorker], room: list[int],
          held: dict[Expert, list[int]], slots: list[set[Expert]], busy: list[float], *, required: bool) -> None:
    """One more copy of each expert in `todo` (heaviest first) on a worker of `tier` not holding it."""
    mine = [w for w, tw in enumerate(workers) if tw.tier == tier]
    for load, expert in sorted(todo, key=lambda x: (-x[0], x[1])):
        free = [w for w in mine if room[w] > 0 and expert not in slots[w]]
        if not free:
            if not required:
                return
            raise ValueError(f"the {tier} tier has no room for expert {expert}: its {len(mine)} worker(s) are "
                             f"full at {sum(len(slots[w]) for w in mine)} copies (or already hold it); raise "
                             f"the {tier} tier's budget_bytes or its count")
        stay = [w for w in held.get(expert, ()) if w in free]
        w = stay[0] if stay else min(free, key=lambda x: (busy[x], len(slots[x]), x))
        slots[w].add(expert)
        room[w] -= 1
        busy[w] += load


def fast_of(placement: Placement, workers: list[TierWorker], moe_layers: list[int]) -> FastSets:
    """The fast sets a placement holds."""
    row = {layer: i for i, layer in enumerate(moe_layers)}
    out: list[set[int]] = [set() for _ in moe_layers]
    for w, experts in enumerate(placement.workers):
        if workers[w].tier == FAST:
            for layer, e in experts:
                out[row[layer]].add(e)
    return tuple(frozenset(s) for s in out)


@dataclass(frozen=True)
class Hysteresis:
    margin: float = 1.25  # a promotion displaces a fast expert only when it carries margin × its load
    dwell: int = 3  # decisions an expert stays in its tier after it moved
    max_moves: int = 8  # promotions per decision (each also loads bytes)
    noise_z: float = 5.0  # ... and when the gap is this many standard deviations of the load estimate's noise


def beyond_noise(hot: float, cold: float, window_steps: float | None, z: float) -> bool:
    """Is `hot` > `cold` more than sampling noise, for loads that average per-step row counts over
    `window_steps` steps (an EMA with alpha = 2 / (window_steps + 1) has the variance of a plain
    mean of window_steps steps)? Row counts are close to Poisson, so a load λ has variance
    λ / window_steps and the gap of two has (hot + cold) / window_steps. One decision compares the
    hottest of many host experts with the coldest of many fast ones: under uniform routing their gap
    reaches ~4 standard deviations by chance alone, hence a z of 5. None: loads without noise."""
    if window_steps is None:
        return hot > cold
    return hot - cold > z * ((hot + cold) / window_steps) ** 0.5


@dataclass(frozen=True)
class Decision:
    fast: FastSets
    promoted: tuple[Expert, ...]  # (MoE layer row, expert id)
    demoted: tuple[Expert, ...]


def decide(loads: np.ndarray, fast: FastSets, fast_slots: int, *, moved: dict[Expert, int] | None = None,
           now: int = 0, rule: Hysteresis = Hysteresis(), window_steps: float | None = None) -> Decision:
    """The online tier step on smoothed loads [L, E]: which experts to promote and demote.

    Promotion candidates are experts the target (`fast_sets` of these loads) puts on the fast tier
    and the current sets do not; each takes a free fast slot, or displaces the coldest fast expert
    the target leaves out when it carries `margin` × that expert's load and the gap is beyond the
    load estimate's noise (`beyond_noise`: loads that average `window_steps` steps; swapping two
    experts whose loads differ by chance costs a copy load and gains nothing). Experts that moved
    within the last `dwell` decisions (`moved[(row, e)]` = decision number) stay put. The host tier
    is not decided here: `tier_placement` keeps every expert covered."""
    loads = np.asarray(loads, dtype=float)
    moved = moved or {}
    settled = lambda x: now - moved.get(x, -(1 << 30)) >= rule.dwell  # noqa: E731
    target = fast_sets(loads, fast_slots)
    ins = sorted(((i, e) for i, s in enumerate(target) for e in s - fast[i] if settled((i, e))),
                 key=lambda x: (-loads[x], x))
    outs = sorted(((i, e) for i, s in enumerate(fast) for e in s - target[i] if settled((i, e))),
                  key=lambda x: (loads[x], x))
    new = [set(s) for s in fast]
    free = fast_slots - sum(len(s) for s in fast)
    promoted, demoted = [], []
    for x in ins[:rule.max_moves]:
        if free > 0 and loads[x] > 0:
            free -= 1
        elif (outs and loads[x] > rule.margin * loads[outs[0]]
              and beyond_noise(loads[x], loads[outs[0]], window_steps, rule.noise_z)):
            out = outs.pop(0)
            new[out[0]].discard(out[1])
            demoted.append(out)
        else:
            continue
        new[x[0]].add(x[1])
        promoted.append(x)
    return Decision(tuple(frozenset(s) for s in new), tuple(promoted), tuple(demoted))


@dataclass(frozen=True)
class TierLayout:
    """What the online tier step needs to know of the deployment (fixed while it runs)."""
    workers: tuple[TierWorker, ...]  # per expert worker of the table, in table order
    expert_bytes: int  # the unit the workers' budgets are counted in
    host_copies: int = 1


def tier_step(loads: np.ndarray, placement: Placement, layout: TierLayout, moe_layers: list[int], *,
              moved: dict[Expert, int], now: int, rule: Hysteresis = Hysteresis(),
              window_steps: float | None = None) -> tuple[Decision, Placement | None]:
    """The online step on smoothed loads [L, E] (averaging `window_steps` steps): the decision and the
    placement it leads to (None when nothing moves). `moved` is updated with the experts that moved
    (decision number `now`)."""
    workers = list(layout.workers)
    fast = fast_of(placement, workers, moe_layers)
    d = decide(loads, fast, tier_slots(workers, FAST, layout.expert_bytes), moved=moved, now=now, rule=rule,
               window_steps=window_steps)
    if not d.promoted:
        return d, None
    moved.update({x: now for x in d.promoted + d.demoted})
    new = tier_placement(d.fast, moe_layers, np.asarray(loads).shape[1], workers, layout.expert_bytes, loads,
                         current=placement, host_copies=layout.host_copies)
    return d, new


def profile_placement(loads: np.ndarray, placement: Placement, layout: TierLayout,
                      moe_layers: list[int]) -> Placement | None:
    """Static tiers (the "frequency" baseline): the fast tier's room to the experts hottest in a
    recorded profile's loads [L, E], every other expert on the host tier; copies stay where they
    are. None when `placement` already is that."""
    workers = list(layout.workers)
    fast = fast_sets(loads, tier_slots(workers, FAST, layout.expert_bytes))
    new = tier_placement(fast, moe_layers, np.asarray(loads).shape[1], workers, layout.expert_bytes, loads,
                         current=placement, host_copies=layout.host_copies)
    same = [set(w) for w in new.workers] == [set(w) for w in placement.workers]
    return None if same else new
