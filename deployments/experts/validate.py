"""What every transport checks before a worker computes anything: the same rules on plain fields.

Shapes: N rows, D hidden. A Forward request is refused (BadRequest → INVALID_ARGUMENT)
unless its tensor is [N, D] in a supported dtype with exactly N·D elements of bytes,
its expert ids and counts are lists of equal length, every count ≥ 0 and the counts
sum to N, and every expert is a routed expert of the model; NotHeld
(→ FAILED_PRECONDITION) when the worker holds no copy of one of them. Nothing is
computed on memory the request does not fully describe.

`REFUSALS` is the one table of refusal → status, and `refusal` the one answer (status and
message) that the gRPC servicer and the same-node server both give.
"""
from __future__ import annotations

from typing import Sequence

from cluster.config import ModelConfig
from cluster.precision import DTYPES

NAMES = {v: k for k, v in DTYPES.items()}  # the dtypes tensors cross the data plane in


class BadRequest(ValueError):
    """A malformed request (INVALID_ARGUMENT on every transport)."""


class NotHeld(ValueError):
    """A well-formed request for experts this worker holds no copy of (FAILED_PRECONDITION)."""


class NoRoom(RuntimeError):
    """A well-formed request whose stated size cannot be allocated here (RESOURCE_EXHAUSTED)."""


# What each refusal is called on the wire, on every transport (named as gRPC names its codes).
REFUSALS: dict[type[Exception], str] = {BadRequest: "INVALID_ARGUMENT", NotHeld: "FAILED_PRECONDITION",
                                        NoRoom: "RESOURCE_EXHAUSTED"}


def refusal(worker: str, error: Exception) -> tuple[str, str]:
    """The status and message a worker answers `error` with: a refusal's own status, INTERNAL for
    anything else (the caller fails over; only the type is told). Messages read "{worker}: {reason}"."""
    for kind, status in REFUSALS.items():
        if isinstance(error, kind):
            return status, f"{worker}: {error}"
    return "INTERNAL", f"{worker}: {type(error).__name__}"


def nbytes_of(shape: Sequence[int], dtype: str) -> int:
    """The bytes a [rows, row width] tensor of `dtype` takes (0 for an unknown dtype or another rank: refused anyway)."""
    if dtype not in DTYPES or len(shape) != 2:
        return 0
    return shape[0] * shape[1] * DTYPES[dtype].itemsize


def check_forward(cfg: ModelConfig, *, layer: int, shape: Sequence[int], dtype: str, nbytes: int,
                  expert_ids: Sequence[int], counts: Sequence[int]) -> None:
    """Raise BadRequest naming what is wrong with a Forward request."""
    if dtype not in DTYPES:
        raise BadRequest(f"hidden.dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if len(shape) != 2 or shape[1] != cfg.expert_row_size or shape[0] < 0:  # latent-wide for Nemotron 3 Super
        raise BadRequest(f"hidden.shape {list(shape)} is not [rows, {cfg.expert_row_size}]")
    rows = shape[0]
    needed = nbytes_of(shape, dtype)
    if nbytes != needed:
        raise BadRequest(f"hidden.data has {nbytes} bytes, shape {list(shape)} needs {needed}")
    if len(expert_ids) != len(counts):
        raise BadRequest(f"{len(expert_ids)} expert ids but {len(counts)} counts")
    if any(c < 0 for c in counts) or sum(counts) != rows:
        raise BadRequest(f"counts {list(counts)[:16]} must be ≥ 0 and sum to the {rows} rows")
    if not (0 <= layer < cfg.num_layers and cfg.moe_layers[layer]):
        raise BadRequest(f"layer {layer} is not a MoE layer of this model")
    if any(not 0 <= e < cfg.num_experts for e in expert_ids):
        raise BadRequest(f"expert ids must be in [0, {cfg.num_experts})")


def check_experts(cfg: ModelConfig, layers: Sequence[int], expert_ids: Sequence[int]) -> list[tuple[int, int]]:
    """The (layer, expert_id) pairs of a LoadCopies or Retire request, or BadRequest."""
    if len(layers) != len(expert_ids):
        raise BadRequest(f"{len(layers)} layers but {len(expert_ids)} expert ids")
    experts = list(zip(layers, expert_ids))
    bad = [e for e in experts if not (0 <= e[0] < cfg.num_layers and cfg.moe_layers[e[0]]
                                      and 0 <= e[1] < cfg.num_experts)]
    if bad:
        raise BadRequest(f"not routed experts of this model: {bad[:4]}")
    return experts
