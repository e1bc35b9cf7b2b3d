"""The expert data plane over gRPC: raw tensor bytes in protobuf, one call per (layer, worker).

`ExpertServicer` runs inside an expert worker; `RemoteExperts` is the router's
ExpertExecutor that fans a layer's rows out to the workers holding them.
Shapes: N rows, D hidden.
"""
from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Callable, Sequence

import grpc
import numpy as np
import torch
from torch import Tensor

from cluster.model.experts import LocalExperts
from cluster.placement import Placement
from protos import expert_pb2, expert_pb2_grpc

_MAX_MESSAGE = 256 << 20
CHANNEL_OPTIONS = [("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE)]
_NP = {"float32": np.float32, "float16": np.float16}


def to_proto(t: Tensor) -> expert_pb2.Tensor:
    t = t.detach().to("cpu", torch.float32).contiguous()
    return expert_pb2.Tensor(data=t.numpy().tobytes(), shape=list(t.shape), dtype="float32")


def from_proto(p: expert_pb2.Tensor) -> Tensor:
    if p.dtype not in _NP:
        raise ValueError(f"unsupported tensor dtype {p.dtype!r}")
    array = np.frombuffer(p.data, dtype=_NP[p.dtype])
    return torch.from_numpy(array.copy()).reshape(tuple(p.shape))


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    def __init__(self, name: str, experts: LocalExperts, device: str):
        self.name, self.experts, self.device = name, experts, device

    def Forward(self, request, context):
        counts = dict(zip(request.expert_id, request.count))
        missing = [e for e in counts if not self.experts.holds(request.layer, e)]
        if missing:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{self.name} holds no copy of layer {request.layer} expert(s) {missing}")
        rows = from_proto(request.hidden).to(self.device)
        out = self.experts.run_subset(request.layer, rows, list(request.expert_id), list(request.count))
        return expert_pb2.ForwardReply(output=to_proto(out))

    def Health(self, request, context):
        slots = [f"{layer}:{e}" for layer, e in self.experts.slots()]
        return expert_pb2.HealthReply(worker=self.name, slots=slots)


def start_server(servicer: ExpertServicer, host: str) -> tuple[grpc.Server, int]:
    """Serve on host:<free port>; a few threads: calls for different layers never overlap in one step."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=CHANNEL_OPTIONS)
    expert_pb2_grpc.add_ExpertServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{host}:0")
    server.start()
    return server, port


class StepTimer:
    """Cumulative time the router spends on the data plane, for the step-time breakdown."""

    def __init__(self):
        self.lock = threading.Lock()
        self.totals = {"serialize_s": 0.0, "wait_s": 0.0, "deserialize_s": 0.0, "calls": 0}

    def add(self, **kw: float) -> None:
        with self.lock:
            for k, v in kw.items():
                self.totals[k] += v

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return dict(self.totals)


class ExpertUnavailable(RuntimeError):
    """No live copy of an expert could serve a layer's rows."""


def _split(start: int, n: int, parts: int) -> list[tuple[int, int]]:
    """Rows [start, start + n) in `parts` contiguous chunks of near-equal size."""
    sizes = [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
    offsets = [start + sum(sizes[:i]) for i in range(parts)]
    return list(zip(offsets, sizes))


class RemoteExperts:
    """ExpertExecutor over gRPC. `resolve(worker, refresh)` returns a worker's data-plane address
    (refresh=True: look it up again, the worker may have been replaced).

    An expert's rows are split evenly among its copies, using only copies on the
    router's own node (`local_workers`) when there are any. When a call fails, its
    rows are re-sent to other copies of the same experts: expert compute is a pure
    function, so a retry is safe and no request has to fail.
    """

    def __init__(self, placement: Placement, resolve: Callable[[int, bool], str],
                 local_workers: frozenset[int] = frozenset()):
        self.resolve, self.local_workers = resolve, local_workers
        self.timer = StepTimer()
        self.failovers = 0
        self.calls_per_worker: dict[int, int] = {}
        self._stubs: dict[int, tuple[str, expert_pb2_grpc.ExpertServiceStub]] = {}
        # Blocking calls on long-lived threads: grpc's `.future()` starts a new thread per call
        # (measured ~2.8 ms each here), more than the expert compute it waits for.
        self._pool = futures.ThreadPoolExecutor(max_workers=max(2, placement.num_workers), thread_name_prefix="experts")
        self.swap_placement(placement)

    def swap_placement(self, placement: Placement) -> None:
        """Atomically switch to a new table: `run` reads `_copies` once per call, so a layer's
        fan-out sees either the old table or the new one, never a mix."""
        self.placement, self._copies = placement, placement.copies()

    def _stub(self, worker: int, refresh: bool = False) -> expert_pb2_grpc.ExpertServiceStub:
        if refresh or worker not in self._stubs:
            address = self.resolve(worker, refresh)
            channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._stubs[worker] = (address, expert_pb2_grpc.ExpertServiceStub(channel))
        return self._stubs[worker][1]

    def _groups(self, copies, layer: int, counts: Sequence[int]) -> dict[int, list[tuple[int, int, int]]]:
        """worker -> [(expert_id, first row, rows)] for one layer."""
        groups: dict[int, list[tuple[int, int, int]]] = {}
        start = 0
        for expert_id, n in enumerate(counts):
            if n:
                workers = copies[(layer, expert_id)]
                preferred = [w for w in workers if w in self.local_workers] or list(workers)
                for worker, (s, k) in zip(preferred, _split(start, n, len(preferred))):
                    if k:
                        groups.setdefault(worker, []).append((expert_id, s, k))
                start += n
        return groups

    def run(self, layer: int, rows: Tensor, counts: Sequence[int]) -> Tensor:
        copies = self._copies
        groups = self._groups(copies, layer, counts)
        t0 = time.perf_counter()
        calls = {w: self._send(w, layer, rows, g) for w, g in groups.items()}
        t1 = time.perf_counter()
        for w in calls:
            self.calls_per_worker[w] = self.calls_per_worker.get(w, 0) + 1
        out = torch.empty_like(rows)
        wait = deser = 0.0
        for worker, (future, index) in calls.items():
            t = time.perf_counter()
            try:
                reply = future.result()
            except grpc.RpcError as e:
                self._failover(copies, worker, layer, rows, groups[worker], out, e)
                continue
            t2 = time.perf_counter()
            out[index] = from_proto(reply.output).to(rows.device)
            wait, deser = wait + t2 - t, deser + time.perf_counter() - t2
        self.timer.add(serialize_s=t1 - t0, wait_s=wait, deserialize_s=deser, calls=len(calls))
        return out

    def _request(self, layer: int, rows: Tensor, group: list[tuple[int, int, int]]):
        index = torch.cat([torch.arange(s, s + n, device=rows.device) for _, s, n in group])
        req = expert_pb2.ForwardRequest(layer=layer, hidden=to_proto(rows.index_select(0, index)),
                                        expert_id=[e for e, _, _ in group], count=[n for _, _, n in group])
        return req, index

    def _send(self, worker: int, layer: int, rows: Tensor, group):
        req, index = self._request(layer, rows, group)
        return self._pool.submit(self._stub(worker).Forward, req), index

    def _failover(self, copies, failed: int, layer: int, rows: Tensor, group, out: Tensor, error) -> None:
        """Re-send a failed worker's rows: to other copies where they exist, else to the same
        worker once more at a fresh address (it may have been replaced)."""
        self.failovers += 1
        for expert_id, start, n in group:
            others = [w for w in copies[(layer, expert_id)] if w != failed]
            for worker in others + [failed]:
                try:
                    req, index = self._request(layer, rows, [(expert_id, start, n)])
                    reply = self._stub(worker, refresh=worker == failed).Forward(req, timeout=30)
                    out[index] = from_proto(reply.output).to(rows.device)
                    break
                except grpc.RpcError as e:
                    error = e
            else:
                raise ExpertUnavailable(f"layer {layer} expert {expert_id}: no live copy answered "
                                        f"({error.code().name})") from None
