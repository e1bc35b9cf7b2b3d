"""The expert data plane over gRPC: raw tensor bytes in protobuf, one call per (layer, worker).

`ExpertServicer` runs inside an expert worker; `RemoteExperts` is the router's
ExpertExecutor that fans a layer's rows out to the workers holding them.
Shapes: N rows, D hidden.
"""
from __future__ import annotations

import logging
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
from deployments import metrics
from protos import expert_pb2, expert_pb2_grpc

log = logging.getLogger("ray.serve")
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
    """`service_time_per_token_s` > 0 makes the worker behave like a device of fixed capacity
    (benchmarks only): calls run one at a time and each takes at least that long per row,
    so a worker's time grows with its load even on a machine whose cores are all shared."""

    def __init__(self, name: str, experts: LocalExperts, device: str, service_time_per_token_s: float = 0.0,
                 loader: Callable[[list[tuple[int, int]]], int] | None = None):
        self.name, self.experts, self.device = name, experts, device
        self.service_time_per_token_s = service_time_per_token_s
        self.loader = loader  # (layer, expert_id) pairs -> weight bytes read
        self.busy_s = 0.0  # time spent computing: the worker's load, for pool autoscaling
        self._device_lock = threading.Lock()

    def Forward(self, request, context):
        counts = dict(zip(request.expert_id, request.count))
        missing = [e for e in counts if not self.experts.holds(request.layer, e)]
        if missing:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{self.name} holds no copy of layer {request.layer} expert(s) {missing}")
        rows = from_proto(request.hidden).to(self.device)
        t0 = time.perf_counter()
        if self.service_time_per_token_s <= 0:
            out = self.experts.run_subset(request.layer, rows, list(request.expert_id), list(request.count))
        else:
            with self._device_lock:  # one call at a time, like one accelerator
                t0 = time.perf_counter()
                out = self.experts.run_subset(request.layer, rows, list(request.expert_id), list(request.count))
                time.sleep(max(0.0, self.service_time_per_token_s * len(rows) - (time.perf_counter() - t0)))
        self.busy_s += time.perf_counter() - t0
        return expert_pb2.ForwardReply(output=to_proto(out))

    def Load(self, request, context):
        if self.loader is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{self.name} cannot load experts")
        slots = [s for s in zip(request.layer, request.expert_id) if not self.experts.holds(*s)]
        return expert_pb2.SlotsReply(bytes_loaded=self.loader(slots) if slots else 0)

    def Retire(self, request, context):
        self.experts.remove(list(zip(request.layer, request.expert_id)))
        return expert_pb2.SlotsReply()

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


def _slots_request(slots: list[tuple[int, int]]) -> expert_pb2.SlotsRequest:
    return expert_pb2.SlotsRequest(layer=[s[0] for s in slots], expert_id=[s[1] for s in slots])


class RemoteExperts:
    """ExpertExecutor over gRPC. `resolve(worker, refresh)` returns a worker's data-plane address
    (refresh=True: look it up again, the worker may have been replaced).

    An expert's rows go to its live copies on the router's own node
    (`local_workers`) when there are any, else to all its live copies: split evenly
    among them (token_split "even"), or all to the copy whose worker has the fewest
    rows so far in this layer ("least_loaded"). Every call has a
    deadline. A call that fails or times out is re-sent to another live copy of the
    same experts (expert compute is a pure function, so a retry is safe and no
    request has to fail); the worker is marked down and a background thread waits
    for it (or Serve's replacement) to answer a health check, has it load the
    table's slots (a replacement starts with its original ones), and puts it back. With no live copy, `run` raises ExpertUnavailable at
    once: a clear error, never a hang.
    """

    def __init__(self, placement: Placement, resolve: Callable[[int, bool], str],
                 local_workers: frozenset[int] = frozenset(), call_timeout_s: float = 10.0,
                 heal_timeout_s: float = 600.0, token_split: str = "even"):
        self.resolve, self.local_workers = resolve, local_workers
        self.token_split = token_split  # "even" or "least_loaded" (the policy's token_split)
        self.call_timeout_s, self.heal_timeout_s = call_timeout_s, heal_timeout_s
        self.timer = StepTimer()
        self.failovers = 0
        self.failures: dict[str, int] = {}  # gRPC status name -> failed expert calls
        self.calls_per_worker: dict[int, int] = {}
        self._stubs: dict[int, tuple[str, expert_pb2_grpc.ExpertServiceStub]] = {}
        self._down: set[int] = set()
        self._fixed: dict[int, str] = {}  # workers that joined at run time: their address never changes
        self._lock = threading.Lock()
        self._closed = threading.Event()
        # Blocking calls on long-lived threads: grpc's `.future()` starts a new thread per call
        # (measured ~2.8 ms each here), more than the expert compute it waits for.
        self._pool = futures.ThreadPoolExecutor(max_workers=max(2, placement.num_workers), thread_name_prefix="experts")
        self.swap_placement(placement)

    def swap_placement(self, placement: Placement) -> None:
        """Atomically switch to a new table: `run` reads `_copies` once per call, so a layer's
        fan-out sees either the old table or the new one, never a mix."""
        self.placement, self._copies = placement, placement.copies()

    # -- membership and copies ----------------------------------------------------------------
    def add_worker(self, address: str, local: bool) -> int:
        """A worker that joined at run time (an expert-pool replica): empty until handed copies."""
        with self._lock:
            worker = self.placement.num_workers
            self._fixed[worker] = address
            if local:
                self.local_workers = self.local_workers | {worker}
        self.swap_placement(Placement(self.placement.workers + ((),)))
        return worker

    def worker_at(self, address: str) -> int | None:
        """The index of a worker that joined at run time, by its address."""
        with self._lock:
            return next((w for w, a in self._fixed.items() if a == address), None)

    def load(self, worker: int, slots: list[tuple[int, int]], stub=None) -> int:
        """Have a worker load copies (blocking; it keeps serving meanwhile); returns bytes read."""
        return (stub or self._stub(worker)).Load(_slots_request(slots), timeout=600).bytes_loaded

    def retire(self, worker: int, slots: list[tuple[int, int]]) -> None:
        self._stub(worker).Retire(_slots_request(slots), timeout=60)

    def _address(self, worker: int, refresh: bool) -> str:
        return self._fixed.get(worker) or self.resolve(worker, refresh)

    # -- health ------------------------------------------------------------------------------
    def down_workers(self) -> list[int]:
        with self._lock:
            return sorted(self._down)

    def uncovered(self) -> list[tuple[int, int]]:
        """Slots with no live copy right now (readiness: empty when every expert can be served)."""
        down = set(self.down_workers())
        return sorted(slot for slot, ws in self._copies.items() if all(w in down for w in ws))

    def close(self) -> None:
        self._closed.set()

    def _mark_down(self, worker: int, error: grpc.RpcError) -> None:
        code = error.code().name if hasattr(error, "code") else "UNKNOWN"
        with self._lock:
            self.failures[code] = self.failures.get(code, 0) + 1
            metrics.EXPERT_CALL_FAILURES.labels(code).inc()
            if worker in self._down:
                return
            self._down.add(worker)
        log.warning("expert worker %d failed (%s); its rows go to other copies until it is back", worker, code)
        threading.Thread(target=self._heal, args=(worker,), name=f"heal-{worker}", daemon=True).start()

    def _heal(self, worker: int) -> None:
        """Bounded: until the worker answers a health check (then it is back) or heal_timeout_s."""
        deadline = time.monotonic() + self.heal_timeout_s
        while not self._closed.is_set() and time.monotonic() < deadline:
            try:
                address = self._address(worker, True)
                stub = expert_pb2_grpc.ExpertServiceStub(grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
                stub.Health(expert_pb2.HealthRequest(), timeout=2)
                self.load(worker, list(self.placement.workers[worker]), stub)  # loads only what it lacks
                with self._lock:
                    self._stubs[worker] = (address, stub)
                    self._down.discard(worker)
                log.warning("expert worker %d is back at %s", worker, address)
                return
            except Exception:  # noqa: BLE001 - not back yet (dead actor, refused connection, ...)
                self._closed.wait(0.5)

    # -- the data path ---------------------------------------------------------------------
    def _stub(self, worker: int) -> expert_pb2_grpc.ExpertServiceStub:
        with self._lock:
            known = self._stubs.get(worker)
        if known is None:
            address = self._address(worker, False)
            known = (address, expert_pb2_grpc.ExpertServiceStub(grpc.insecure_channel(address, options=CHANNEL_OPTIONS)))
            with self._lock:
                self._stubs[worker] = known
        return known[1]

    def _live(self, copies, layer: int, expert_id: int, exclude: set[int]) -> list[int]:
        live = [w for w in copies[(layer, expert_id)] if w not in exclude]
        if not live:
            raise ExpertUnavailable(f"layer {layer} expert {expert_id}: no live copy (worker(s) "
                                    f"{list(copies[(layer, expert_id)])} down); retry once it is back")
        return live

    def _groups(self, copies, layer: int, counts: Sequence[int]) -> dict[int, list[tuple[int, int, int]]]:
        """worker -> [(expert_id, first row, rows)] for one layer."""
        groups: dict[int, list[tuple[int, int, int]]] = {}
        rows: dict[int, int] = {}  # rows given to each worker so far in this layer
        down = set(self.down_workers())
        start = 0
        for expert_id, n in enumerate(counts):
            if n:
                live = self._live(copies, layer, expert_id, down)
                preferred = [w for w in live if w in self.local_workers] or live
                if self.token_split == "least_loaded":  # all rows to one copy: fewer, larger calls
                    preferred = [min(preferred, key=lambda w: rows.get(w, 0))]
                for worker, (s, k) in zip(preferred, _split(start, n, len(preferred))):
                    if k:
                        groups.setdefault(worker, []).append((expert_id, s, k))
                        rows[worker] = rows.get(worker, 0) + k
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
        return self._pool.submit(self._stub(worker).Forward, req, timeout=self.call_timeout_s), index

    def _failover(self, copies, failed: int, layer: int, rows: Tensor, group, out: Tensor, error) -> None:
        """Re-send a failed (or timed-out) worker's rows to other live copies of the same experts."""
        self.failovers += 1
        self._mark_down(failed, error)
        for expert_id, start, n in group:
            req, index = self._request(layer, rows, [(expert_id, start, n)])
            tried = {failed}  # each copy at most once: bounded even if a worker flaps
            while True:
                try:
                    worker = self._live(copies, layer, expert_id, set(self.down_workers()) | tried)[0]
                except ExpertUnavailable:
                    raise ExpertUnavailable(f"layer {layer} expert {expert_id}: worker {failed} failed "
                                            f"({error.code().name}) and no other live copy answered; "
                                            "retry once it is back") from None
                tried.add(worker)
                try:
                    reply = self._stub(worker).Forward(req, timeout=self.call_timeout_s)
                    out[index] = from_proto(reply.output).to(rows.device)
                    break
                except grpc.RpcError as e:
                    self._mark_down(worker, e)  # then try the next live copy, if any
