"""Same node, CPU: rows and outputs in shared memory, a small control message per call.

Shapes: N rows of R values (ModelConfig.expert_row_size); B = N·R·element size bytes. Per channel (one connection,
deployments/experts/transport/local_socket.py) the router owns one buffer of
≥ 2·B bytes: it writes the rows into [0, B), sends a header of a few dozen bytes;
the worker validates it, computes on the rows where they are and writes the
outputs into [B, 2B); the reply is one status byte. A larger batch gets a larger
buffer (at least twice the old one, no upper limit), passed with that call.

The buffer is a memfd (anonymous shared memory) handed over with SCM_RIGHTS on the
authenticated socket: it has no name in /dev/shm, so no other process can open it,
nothing is left behind when either side dies, and Docker's 64 MiB /dev/shm does not
cap it. It is sealed against shrinking before it is sent: a worker refuses any
other buffer, since a shrink under its mapping would crash it (SIGBUS).
"""
from __future__ import annotations

import fcntl
import os
from typing import Sequence

import torch
from torch import Tensor

from deployments.experts.compute import ExpertCompute
from deployments.experts.transport.local_socket import (MODE_SHM, ChannelPool, ForwardHeader, call, checked_header,
                                                        compute_into, connect, grown_size)
from deployments.experts.validate import BadRequest


def shared_buffer(size: int) -> tuple[Tensor, int]:
    """A new sealed memfd of `size` bytes, mapped: (its bytes, its descriptor to send)."""
    fd = os.memfd_create("moe-expert-rows", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=size, dtype=torch.uint8), fd
    except BaseException:
        os.close(fd)
        raise


def map_buffer(fds: list[int]) -> Tensor:
    """The worker's side: map the one buffer a call sent (BadRequest unless it is a memfd sealed
    against shrinking); the descriptors are closed either way (the mapping stays)."""
    try:
        if len(fds) != 1:
            raise BadRequest(f"a call passes one buffer, not {len(fds)}")
        try:
            sealed = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        except OSError:
            sealed = 0
        size = os.fstat(fds[0]).st_size
        if not sealed or size == 0:
            raise BadRequest("the buffer must be a non-empty memfd sealed against shrinking")
        return torch.from_file(f"/proc/self/fd/{fds[0]}", shared=True, size=size, dtype=torch.uint8)
    finally:
        for fd in fds:
            os.close(fd)


class ShmChannel:
    """The router's side of one connection: its buffer and socket."""

    def __init__(self, path: str, secret: str, timeout: float):
        self.path = path
        self.sock = connect(path, secret, MODE_SHM, timeout)
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def _fit(self, size: int) -> list[int]:
        """Descriptors to send with this call: a new, larger buffer when the current one is too small."""
        if size <= self.buffer.numel():
            return []
        self.buffer, fd = shared_buffer(grown_size(size, self.buffer.numel()))
        return [fd]

    def forward(self, layer: int, rows: Tensor, expert_ids: Sequence[int], counts: Sequence[int],
                timeout: float) -> Tensor:
        header = ForwardHeader.for_rows(layer, rows, expert_ids, counts)
        nbytes, dtype = header.nbytes, header.torch_dtype
        fds = self._fit(2 * nbytes)
        try:
            self.buffer[:nbytes].view(dtype).view(rows.shape).copy_(rows.detach())  # any layout, device
            call(self.sock, header.pack(), fds, timeout, self.path)
        finally:
            for fd in fds:
                os.close(fd)
        return self.buffer[nbytes:2 * nbytes].view(dtype).view(rows.shape).clone()  # the buffer is reused

    def close(self) -> None:
        self.sock.close()


class ShmTransport(ChannelPool):
    """The router's transport to one worker on its node (Transport protocol, deployments/experts/remote.py)."""

    def __init__(self, address: str, path: str, secret: str):
        super().__init__(address, lambda timeout: ShmChannel(path, secret, timeout))


class ShmSession:
    """The worker's side of one connection: the buffer the router last sent."""

    def __init__(self, compute: ExpertCompute):
        self.compute = compute
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def handle(self, message: bytes, fds: list[int]) -> bytes:
        if fds:
            self.buffer = map_buffer(fds)
        h = checked_header(self.compute, message)
        if 2 * h.nbytes > self.buffer.numel():
            raise BadRequest(f"the shared buffer ({self.buffer.numel()} bytes) cannot hold {h.nbytes} bytes of rows "
                             "and their outputs")
        compute_into(self.compute, h, self.buffer, self.buffer[h.nbytes:])
        return b""

    def close(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)
