"""Expert-load profiles: tokens per (layer, expert) recorded once, saved as JSON, planned from later
(static EPLB, `cluster.eplb`). Pure, no Ray. Shapes: L MoE layers, E experts.

File layout (version 1):

    {"format": "moe-cluster/load-profile", "version": 1,
     "layers": [1, 2, ...],            # MoE layer index of each row, L distinct ints ≥ 0
     "loads": [[12.0, 0.5, ...], ...], # [L, E] expert load, finite, ≥ 0
     "meta": {...}}                    # free-form: model, window, date, ...
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT, VERSION = "moe-cluster/load-profile", 1


@dataclass(frozen=True)
class LoadProfile:
    loads: np.ndarray  # [L, E] expert load (tokens)
    layers: tuple[int, ...]  # [L] MoE layer index of each row
    meta: dict = field(default_factory=dict)


def loads_for(profile: LoadProfile, moe_layers, num_experts: int) -> np.ndarray:
    """The profile's loads [L, E] if it was recorded on a model with these MoE layers and experts,
    else ValueError saying how the two differ."""
    if tuple(profile.layers) == tuple(moe_layers) and profile.loads.shape[1] == num_experts:
        return profile.loads
    raise ValueError(f"the profile covers {_shape(profile.layers, profile.loads.shape[1])}; this model has "
                     f"{_shape(moe_layers, num_experts)}")


def _shape(layers, experts: int) -> str:
    layers = list(layers)
    names = str(layers) if len(layers) <= 6 else f"[{layers[0]}, {layers[1]}, …, {layers[-1]}]"
    return f"{len(layers)} MoE layers {names} × {experts} experts"


def _validate(loads, layers, meta) -> LoadProfile:
    """The checked profile, or ValueError saying what is wrong."""
    if not isinstance(layers, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                        and x >= 0 for x in layers):
        raise ValueError("layers must be a list of MoE layer indices (ints ≥ 0)")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers repeat an index: {list(layers)}")
    if not isinstance(meta, dict):
        raise ValueError("meta must be an object (a dict)")
    rows = loads.tolist() if isinstance(loads, np.ndarray) else loads
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise ValueError("loads must be a non-empty list of non-empty rows, one per MoE layer")
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"loads rows differ in length: {sorted({len(r) for r in rows})} experts")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
               for r in rows for x in r):
        raise ValueError("loads must be finite numbers ≥ 0")
    if len(rows) != len(layers):
        raise ValueError(f"loads has {len(rows)} rows but layers names {len(layers)} MoE layers")
    return LoadProfile(np.array(rows, dtype=float), tuple(layers), dict(meta))


def save_profile(path: str | Path, loads: np.ndarray, layers: list[int], meta: dict | None = None) -> None:
    """Write a profile. loads [L, E]; layers [L]: MoE layer index of each row; meta: JSON-able
    facts (model, window, date). Raises ValueError on a bad profile; the file is replaced whole."""
    profile = _validate(np.asarray(loads, dtype=float), list(layers), meta or {})
    body = {"format": FORMAT, "version": VERSION, "layers": list(profile.layers),
            "loads": profile.loads.tolist(), "meta": profile.meta}
    try:
        text = json.dumps(body, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta cannot be written as JSON ({e})") from None
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_profile(path: str | Path) -> LoadProfile:
    """Read a profile written by `save_profile`. Raises ValueError naming the file and the problem."""
    try:
        body = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read load profile ({e})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ValueError(f"{path}: not a load profile (no \"format\": \"{FORMAT}\")")
    if body.get("version") != VERSION:
        raise ValueError(f"{path}: load profile version {body.get('version')!r} is not supported "
                         f"(this build reads version {VERSION})")
    missing = sorted({"layers", "loads"} - set(body))
    if missing:
        raise ValueError(f"{path}: load profile lacks {', '.join(missing)}")
    try:
        return _validate(body["loads"], body["layers"], body.get("meta", {}))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
