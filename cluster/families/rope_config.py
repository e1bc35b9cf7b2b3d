"""config.json's rope fields → Rope, read the way transformers standardises them.

Both spellings are accepted: `rope_scaling` (published configs: `type` or
`rope_type`, with `rope_theta` and `partial_rotary_factor` beside it) and
`rope_parameters` (transformers 5: everything inside). A kind or key we do not
implement is refused, naming the field.
"""
from __future__ import annotations

from typing import Any

from cluster.errors import UnsupportedModelError
from cluster.model.rope import Rope

_COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_KEYS = {
    # mrope_section / mrope_interleaved (multimodal wrappers' text_config): M-RoPE splits the rotary dims
    # between time, height and width positions; for text all three are the token's own position, so it
    # is plain rope (vision inputs are refused). Read with default rope only, as the releases use it.
    "default": {"mrope_section", "mrope_interleaved"},
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
    "longrope": {"factor", "original_max_position_embeddings", "attention_factor", "short_factor", "long_factor",
                 "short_mscale", "long_mscale"},
    "proportional": {"factor"},  # Gemma 4's full-attention layers: partial_rotary_factor is the turning share
}


def _params(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    for field in ("rope_scaling", "rope_parameters"):  # transformers: rope_scaling wins when both are set
        if cfg.get(field):
            if not isinstance(cfg[field], dict) or any(isinstance(v, dict) for v in cfg[field].values()):
                raise UnsupportedModelError(f"config.json: {field} per layer type is not supported")
            return field, cfg[field]
    return "rope_scaling", {}


def _original_max(cfg: dict[str, Any], p: dict[str, Any]) -> int:
    # transformers prefers a top-level original_max_position_embeddings (Phi-3.5 keeps it there).
    return int(cfg.get("original_max_position_embeddings") or p.get("original_max_position_embeddings")
               or cfg.get("max_position_embeddings", 4096))


def parse_rope(cfg: dict[str, Any], head_dim: int, default_theta: float = 10000.0,
               default_partial: float | None = None) -> Rope:
    """default_partial: the family's partial_rotary_factor when config.json gives none; None: the family
    rotates whole heads (transformers ignores or breaks on the field there), so a factor is refused."""
    field, p = _params(cfg)
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in _KEYS:
        raise UnsupportedModelError(f"config.json: {field}.rope_type {kind!r} is not supported "
                                    f"(supported: {', '.join(_KEYS)})")
    unknown = sorted(set(p) - _COMMON - _KEYS[kind])
    if unknown:
        raise UnsupportedModelError(f"config.json: {field}.{unknown[0]} is not supported for rope_type {kind!r}")
    partial = float(p.get("partial_rotary_factor", cfg.get("partial_rotary_factor", default_partial or 1.0)))
    if kind == "proportional":  # every feature is paired; the factor says how many frequencies turn
        return _proportional(p, head_dim, partial, int(cfg.get("max_position_embeddings", 4096)), default_theta)
    if default_partial is None and partial != 1.0:
        raise UnsupportedModelError(f"config.json: partial_rotary_factor {partial} is not supported for "
                                    f"{cfg.get('model_type')} (it rotates whole heads)")
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    rope = dict(kind=kind, theta=float(p.get("rope_theta", cfg.get("rope_theta", default_theta))),
                dim=int(head_dim * partial), max_position_embeddings=max_pos)
    if kind in ("yarn", "llama3", "longrope"):
        rope["original_max"] = _original_max(cfg, p)
    if kind != "default":
        factor = p.get("factor")
        if factor is None and kind not in ("yarn", "longrope"):
            raise UnsupportedModelError(f"config.json: {field}.factor is required for rope_type {kind!r}")
        rope["factor"] = float(factor if factor is not None else max_pos / rope["original_max"])
    floats = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "low_freq_factor",
              "high_freq_factor", "short_mscale", "long_mscale")
    rope.update({k: float(p[k]) for k in floats if p.get(k) is not None})
    for k in ("beta_fast", "beta_slow"):  # transformers: `or 32` / `or 1`, so 0 means the default
        if not p.get(k, 1):
            rope.pop(k)
    if "truncate" in p:
        rope["truncate"] = bool(p["truncate"])
    rope.update({k: tuple(float(x) for x in p[k]) for k in ("short_factor", "long_factor") if k in p})
    if kind == "longrope" and not (len(rope.get("short_factor", ())) == len(rope.get("long_factor", ()))
                                   == rope["dim"] // 2):
        raise UnsupportedModelError(f"config.json: {field}.short_factor and long_factor need {rope['dim'] // 2} "
                                    "values each (rotary dim / 2)")
    return Rope(**rope)


def _proportional(p: dict[str, Any], head_dim: int, partial: float, max_pos: int, default_theta: float) -> Rope:
    return Rope(kind="proportional", theta=float(p.get("rope_theta", default_theta)), dim=head_dim,
                max_position_embeddings=max_pos, factor=float(p.get("factor", 1.0)), proportion=partial)
