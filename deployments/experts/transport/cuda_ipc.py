"""Same node, router and worker both on GPUs: rows copied device to device, no host copy.

Shapes: N rows of R values (ModelConfig.expert_row_size); B = N·R·element size bytes. Per channel (one connection,
deployments/experts/transport/local_socket.py) the worker allocates an input and an
output buffer on its GPU and shares them with the router through CUDA IPC handles
(what torch.multiprocessing does, without pickling: the handles cross as JSON). The
router maps them into its own device's address space and copies rows straight into
the worker's memory (a peer copy: NVLink when present, else PCIe), sends a header,
and copies the outputs back once the reply (one status byte) says they are there.
A larger batch first asks the worker for larger buffers (no upper limit).

Needs CUDA on both sides (`transport.choose` never picks it otherwise) and peer access
between the two GPUs (or one shared GPU). The router cannot ask for peer access (under
Ray each actor sees only its own GPU), so the first mapping tells: when it fails,
`MappingFailed` is raised and the transport falls back to shared memory for that worker
(`transport.CudaIpcOrShm`).
"""
from __future__ import annotations

import json
import os
import struct
import time
from typing import Sequence

import torch
from torch import Tensor

from deployments.experts.compute import ExpertCompute
from deployments.experts.transport.local_socket import (MODE_CUDA_IPC, OP_GROW, CallFailed, ChannelPool,
                                                        ForwardHeader, call, checked_header, compute_into, connect,
                                                        grown_size)
from deployments.experts.validate import BadRequest

GROW = struct.Struct("<q")  # bytes per buffer


def export(t: Tensor) -> dict:
    """A GPU buffer's CUDA IPC handle and torch's cross-process ref counter, as JSON-able fields."""
    device, handle, size, offset, counter, counter_offset, event, sync = t.untyped_storage()._share_cuda_()
    return {"handle": handle.hex(), "size": size, "offset": offset, "counter": counter.hex(),
            "counter_offset": counter_offset, "event": (event or b"").hex(), "sync": bool(sync)}


def open_shared(fields: dict, device: torch.device) -> Tensor:
    """The worker's buffer mapped into this process, addressed from `device` (peer access)."""
    storage = torch.UntypedStorage._new_shared_cuda(
        device.index, bytes.fromhex(fields["handle"]), int(fields["size"]), int(fields["offset"]),
        bytes.fromhex(fields["counter"]), int(fields["counter_offset"]), bytes.fromhex(fields["event"]) or None,
        bool(fields["sync"]))
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (storage.nbytes(),), (1,))


class MappingFailed(CallFailed):
    """The worker's buffers could not be mapped here (no peer access, an allocator whose segments
    cannot be shared): CUDA IPC cannot reach this worker, shared memory still can."""


class CudaIpcChannel:
    """The router's side of one connection: the worker's two buffers, mapped."""

    def __init__(self, path: str, secret: str, timeout: float, device: torch.device):
        self.path, self.device = path, device
        self.sock = connect(path, secret, MODE_CUDA_IPC, timeout)
        self.inputs = self.outputs = None  # mapped on the first call

    def _fit(self, nbytes: int, timeout: float) -> None:
        held = 0 if self.inputs is None else self.inputs.numel()
        if nbytes <= held:
            return
        size = grown_size(nbytes, held)
        self.inputs = self.outputs = None  # unmap the old ones
        body = call(self.sock, OP_GROW + GROW.pack(size), [], timeout, self.path)
        try:
            handles = json.loads(body)
            fields = [handles[k] for k in ("inputs", "outputs")]
        except (ValueError, KeyError, TypeError) as e:
            raise CallFailed("INTERNAL", f"the worker at {self.path} sent unusable buffer handles ({e})") from None
        try:
            self.inputs, self.outputs = (open_shared(f, self.device) for f in fields)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:  # torch.AcceleratorError is a RuntimeError
            raise MappingFailed("FAILED_PRECONDITION", f"the buffers of the worker at {self.path} cannot be "
                                f"mapped on {self.device} ({e})") from None

    def forward(self, layer: int, rows: Tensor, expert_ids: Sequence[int], counts: Sequence[int],
                timeout: float) -> Tensor:
        deadline = time.monotonic() + timeout
        header = ForwardHeader.for_rows(layer, rows, expert_ids, counts)
        nbytes, dtype = header.nbytes, header.torch_dtype
        self._fit(nbytes, timeout)
        self.inputs[:nbytes].view(dtype).view(rows.shape).copy_(rows.detach())  # device to device
        torch.cuda.current_stream(self.device).synchronize()  # the worker reads them on its own stream
        call(self.sock, header.pack(), [], max(deadline - time.monotonic(), 1e-3), self.path)
        out = self.outputs[:nbytes].view(dtype).view(rows.shape).clone()
        torch.cuda.current_stream(self.device).synchronize()  # before the next call may overwrite them
        return out

    def close(self) -> None:
        self.sock.close()
        self.inputs = self.outputs = None


class CudaIpcTransport(ChannelPool):
    """The router's transport to one GPU worker on its node (Transport protocol, deployments/experts/remote.py)."""

    def __init__(self, address: str, path: str, secret: str, device: str):
        here = torch.device(device)
        here = torch.device("cuda", torch.cuda.current_device()) if here.index is None else here
        super().__init__(address, lambda timeout: CudaIpcChannel(path, secret, timeout, here))


class CudaIpcSession:
    """The worker's side of one connection: its input and output buffers on its GPU."""

    def __init__(self, compute: ExpertCompute):
        if not compute.device.startswith("cuda"):
            raise BadRequest(f"cuda_ipc needs a worker on a GPU; {compute.name} computes on {compute.device}")
        self.compute = compute
        self.inputs = self.outputs = torch.empty(0, dtype=torch.uint8, device=compute.device)

    def handle(self, message: bytes, fds: list[int]) -> bytes:
        for fd in fds:  # this mode passes no descriptors
            os.close(fd)
        if message[:1] == OP_GROW:
            return self._grow(message[1:])
        h = checked_header(self.compute, message)
        if h.nbytes > self.inputs.numel():
            raise BadRequest(f"the shared buffers ({self.inputs.numel()} bytes) cannot hold {h.nbytes} bytes")
        compute_into(self.compute, h, self.inputs, self.outputs)
        torch.cuda.current_stream(self.outputs.device).synchronize()  # the router copies them on the reply
        return b""

    def _grow(self, body: bytes) -> bytes:
        if len(body) != GROW.size or GROW.unpack(body)[0] <= 0:
            raise BadRequest("a grow request names a positive byte count")
        (size,) = GROW.unpack(body)
        self.inputs = self.outputs = None  # the old pair goes back to the allocator first
        self.inputs = torch.empty(size, dtype=torch.uint8, device=self.compute.device)
        self.outputs = torch.empty(size, dtype=torch.uint8, device=self.compute.device)
        return json.dumps({"inputs": export(self.inputs), "outputs": export(self.outputs)}).encode()

    def close(self) -> None:
        self.inputs = self.outputs = None
