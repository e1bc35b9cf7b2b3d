"""An expert worker's data-plane server: validates every request, then computes or moves copies.

Shapes: N rows, D hidden. A Forward request is refused (INVALID_ARGUMENT) unless its
tensor is [N, D] in a supported dtype with exactly N·D elements of bytes, its
expert ids and counts are lists of equal length, every count ≥ 0 and the counts
sum to N, and every expert is a routed expert of the model; FAILED_PRECONDITION
when the worker holds no copy of one of them. Nothing is computed on memory the
request does not fully describe.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import grpc
import torch

from cluster.config import ModelConfig
from cluster.model.experts import LocalExperts
from deployments.experts.transport.grpc import DTYPES, from_proto, to_proto
from protos import expert_pb2, expert_pb2_grpc


class BadRequest(ValueError):
    pass


def check_forward(request, cfg: ModelConfig) -> None:
    """Raise BadRequest naming what is wrong with a Forward request."""
    hidden = request.hidden
    if hidden.dtype not in DTYPES:
        raise BadRequest(f"hidden.dtype {hidden.dtype!r} is not one of {sorted(DTYPES)}")
    if len(hidden.shape) != 2 or hidden.shape[1] != cfg.hidden_size or hidden.shape[0] < 0:
        raise BadRequest(f"hidden.shape {list(hidden.shape)} is not [rows, {cfg.hidden_size}]")
    rows = hidden.shape[0]
    itemsize = torch.empty((), dtype=DTYPES[hidden.dtype]).element_size()
    if len(hidden.data) != rows * cfg.hidden_size * itemsize:
        raise BadRequest(f"hidden.data has {len(hidden.data)} bytes, shape {list(hidden.shape)} needs "
                         f"{rows * cfg.hidden_size * itemsize}")
    if len(request.expert_id) != len(request.count):
        raise BadRequest(f"{len(request.expert_id)} expert ids but {len(request.count)} counts")
    if any(c < 0 for c in request.count) or sum(request.count) != rows:
        raise BadRequest(f"counts {list(request.count)[:16]} must be ≥ 0 and sum to the {rows} rows")
    if not (0 <= request.layer < cfg.num_layers and cfg.moe_layers[request.layer]):
        raise BadRequest(f"layer {request.layer} is not a MoE layer of this model")
    if any(not 0 <= e < cfg.num_experts for e in request.expert_id):
        raise BadRequest(f"expert ids must be in [0, {cfg.num_experts})")


def check_experts(request, cfg: ModelConfig) -> list[tuple[int, int]]:
    if len(request.layer) != len(request.expert_id):
        raise BadRequest(f"{len(request.layer)} layers but {len(request.expert_id)} expert ids")
    experts = list(zip(request.layer, request.expert_id))
    bad = [e for e in experts if not (0 <= e[0] < cfg.num_layers and cfg.moe_layers[e[0]]
                                      and 0 <= e[1] < cfg.num_experts)]
    if bad:
        raise BadRequest(f"not routed experts of this model: {bad[:4]}")
    return experts


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    """`service_time_per_token_s` > 0 makes the worker behave like a device of fixed capacity
    (benchmarks only): calls run one at a time and each takes at least that long per row,
    so a worker's time grows with its load even on a machine whose cores are all shared."""

    def __init__(self, name: str, cfg: ModelConfig, experts: LocalExperts, device: str,
                 service_time_per_token_s: float = 0.0,
                 loader: Callable[[list[tuple[int, int]]], int] | None = None):
        self.name, self.cfg, self.experts, self.device = name, cfg, experts, device
        self.service_time_per_token_s = service_time_per_token_s
        self.loader = loader  # experts -> weight bytes read (loading copies)
        self.busy_s = 0.0  # time spent computing: the worker's load, for pool autoscaling
        self._busy_lock = threading.Lock()  # calls run on several server threads
        self._device_lock = threading.Lock()

    def Forward(self, request, context):
        try:
            check_forward(request, self.cfg)
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.name}: {e}")
        missing = sorted({e for e in request.expert_id if not self.experts.holds(request.layer, e)})
        if missing:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{self.name} holds no copy of layer {request.layer} expert(s) {missing}")
        rows = from_proto(request.hidden).to(self.device)
        ids, counts = list(request.expert_id), list(request.count)
        t0 = time.perf_counter()
        if self.service_time_per_token_s <= 0:
            out = self.experts.run_subset(request.layer, rows, ids, counts)
        else:
            with self._device_lock:  # one call at a time, like one accelerator
                t0 = time.perf_counter()
                out = self.experts.run_subset(request.layer, rows, ids, counts)
                time.sleep(max(0.0, self.service_time_per_token_s * len(rows) - (time.perf_counter() - t0)))
        with self._busy_lock:
            self.busy_s += time.perf_counter() - t0
        return expert_pb2.ForwardReply(output=to_proto(out))

    def Load(self, request, context):
        try:
            experts = check_experts(request, self.cfg)
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.name}: {e}")
        if self.loader is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{self.name} cannot load copies")
        wanted = [e for e in experts if not self.experts.holds(*e)]
        return expert_pb2.CopiesReply(bytes_loaded=self.loader(wanted) if wanted else 0)

    def Retire(self, request, context):
        try:
            experts = check_experts(request, self.cfg)
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.name}: {e}")
        self.experts.remove(experts)
        return expert_pb2.CopiesReply()

    def Health(self, request, context):
        return expert_pb2.HealthReply(worker=self.name, experts=[f"{layer}:{e}" for layer, e in self.experts.held()])
