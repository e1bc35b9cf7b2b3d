"""The control channel of the same-node transports (shm, cuda_ipc): one Unix socket per worker.

Rows never cross this socket: they are in memory both processes map (a memfd for shm,
the worker's GPU buffers for cuda_ipc). Per call only a header of a few dozen bytes
goes out and a status byte comes back. SOCK_SEQPACKET keeps message boundaries (no
framing code) and carries file descriptors (SCM_RIGHTS) for shm's buffers.

Authentication: a mutual HMAC-SHA256 challenge-response over the application's
shared secret when a connection opens; the secret itself never crosses. A caller
that fails it gets UNAUTHENTICATED and is disconnected before any request is read,
and a router never writes rows for a "worker" that cannot prove it knows the secret
(a stranger binding a dead worker's socket name). Processes of other users are
refused before that (local_server.py).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from deployments.experts.validate import DTYPES, NAMES, BadRequest

MAX_HEADER_BYTES = 1 << 16  # a header: 256 experts take 3 KiB; anything longer is malformed
MAX_FDS = 4
GREETING = b"moe-experts/1"
NONCE = 32
OP_FORWARD, OP_GROW = b"F", b"G"
MODE_SHM, MODE_CUDA_IPC = b"s", b"c"
STATUSES = ("OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "INTERNAL", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED")
DTYPE_CODES = tuple(DTYPES)  # the wire's dtype byte indexes this


class CallFailed(RuntimeError):
    """The worker answered with an error; `status` is named as gRPC's codes are (uniform counters)."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message

    def __reduce__(self):  # picklable (Ray) despite its two arguments
        return CallFailed, (self.status, self.message)


@dataclass(frozen=True)
class ForwardHeader:
    """A Forward request without its rows: they are already in the shared buffer, `nbytes` long."""

    layer: int
    rows: int
    width: int  # ModelConfig.expert_row_size: hidden_size, or the latent size (Nemotron 3 Super)
    dtype: str
    nbytes: int
    expert_ids: tuple[int, ...]
    counts: tuple[int, ...]

    FIXED = struct.Struct("<iqiBqI")  # layer, rows, width, dtype code, nbytes, number of experts

    def pack(self) -> bytes:
        n = len(self.expert_ids)
        code = DTYPE_CODES.index(self.dtype) if self.dtype in DTYPE_CODES else 255  # 255: refused
        return (OP_FORWARD + self.FIXED.pack(self.layer, self.rows, self.width, code, self.nbytes, n)
                + struct.pack(f"<{n}i{len(self.counts)}q", *self.expert_ids, *self.counts))

    @classmethod
    def for_rows(cls, layer: int, rows: Tensor, expert_ids: Sequence[int], counts: Sequence[int]) -> "ForwardHeader":
        """The header of a call carrying `rows`, in the dtype they cross in (theirs if the data plane
        carries it, else fp32)."""
        dtype = rows.dtype if rows.dtype in NAMES else torch.float32
        return cls(layer, rows.shape[0], rows.shape[1], NAMES[dtype], rows.numel() * dtype.itemsize,
                   tuple(expert_ids), tuple(counts))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def unpack(cls, message: bytes) -> "ForwardHeader":
        """BadRequest when the bytes are not a whole header (ids and counts in equal number)."""
        body = message[1:]
        if message[:1] != OP_FORWARD or len(body) < cls.FIXED.size:
            raise BadRequest("not a forward header")
        layer, rows, width, code, nbytes, n = cls.FIXED.unpack_from(body)
        if len(body) != cls.FIXED.size + 12 * n:
            raise BadRequest(f"a header for {n} experts has {len(body)} bytes")
        values = struct.unpack_from(f"<{n}i{n}q", body, cls.FIXED.size)
        dtype = DTYPE_CODES[code] if code < len(DTYPE_CODES) else f"dtype code {code}"
        return cls(layer, rows, width, dtype, nbytes, values[:n], values[n:])


MIN_BUFFER = 1 << 20  # small batches never regrow


def grown_size(needed: int, held: int) -> int:
    """The one grow rule of both same-node transports' row buffers: at least double, at least 1 MiB, so a
    stream of growing batches maps a new buffer O(log n) times, not once per batch."""
    return max(needed, 2 * held, MIN_BUFFER)


def checked_header(compute, message: bytes) -> ForwardHeader:
    """A worker's first look at a forward call: a whole header that its ExpertCompute accepts."""
    h = ForwardHeader.unpack(message)
    compute.check(layer=h.layer, shape=(h.rows, h.width), dtype=h.dtype, nbytes=h.nbytes,
                  expert_ids=h.expert_ids, counts=h.counts)
    return h


def compute_into(compute, h: ForwardHeader, inputs: Tensor, outputs: Tensor) -> None:
    """Run the rows in `inputs` (bytes, already sized for h.nbytes) and write their outputs into `outputs`."""
    rows = inputs[:h.nbytes].view(h.torch_dtype).view(h.rows, h.width)
    out = compute.run(h.layer, rows, h.expert_ids, h.counts)
    outputs[:h.nbytes].copy_(out.reshape(-1).view(torch.uint8))


def _proof(secret: str, role: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret.encode(), role + b"".join(parts), hashlib.sha256).digest()


def reply(status: str, body: bytes = b"") -> bytes:
    return bytes([STATUSES.index(status)]) + body


def parse_reply(message: bytes, peer: str) -> bytes:
    """The body of an OK reply; CallFailed otherwise (ConnectionError when the worker hung up)."""
    if not message:
        raise ConnectionError(f"the worker at {peer} closed the connection")
    status = STATUSES[message[0]] if message[0] < len(STATUSES) else "INTERNAL"
    if status != "OK":
        raise CallFailed(status, message[1:].decode(errors="replace"))
    return message[1:]


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the descriptors that came with it; BadRequest (descriptors closed) if cut short."""
    message, fds, flags, _ = socket.recv_fds(sock, MAX_HEADER_BYTES, MAX_FDS)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise BadRequest(f"a header over {MAX_HEADER_BYTES} bytes or {MAX_FDS} descriptors")
    return message, fds


def sockaddr(path: str) -> str:
    """`@name` is a name in Linux's abstract socket namespace (no file); anything else a file path."""
    return "\0" + path[1:] if path.startswith("@") else path


def connect(path: str, secret: str, mode: bytes, timeout: float) -> socket.socket:
    """An authenticated connection to a worker's socket (both sides proved they know the secret)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr(path))
        greeting = sock.recv(MAX_HEADER_BYTES)
        if not greeting.startswith(GREETING) or len(greeting) != len(GREETING) + NONCE:
            raise ConnectionError(f"{path} is not an expert worker's socket")
        server_nonce, nonce = greeting[len(GREETING):], secrets.token_bytes(NONCE)
        sock.sendall(mode + nonce + _proof(secret, b"client", mode, server_nonce, nonce))
        if not hmac.compare_digest(parse_reply(sock.recv(MAX_HEADER_BYTES), path),
                                   _proof(secret, b"server", server_nonce, nonce)):
            raise CallFailed("UNAUTHENTICATED", f"the worker at {path} does not know the data plane's secret")
        return sock
    except BaseException:
        sock.close()
        raise


def accept(sock: socket.socket, secret: str) -> bytes | None:
    """The worker's side of `connect`: the mode the caller asked for, or None (refused, told why)."""
    nonce = secrets.token_bytes(NONCE)
    sock.sendall(GREETING + nonce)
    answer = sock.recv(MAX_HEADER_BYTES)
    mode, client_nonce, proof = answer[:1], answer[1:1 + NONCE], answer[1 + NONCE:]
    if len(answer) != 1 + 2 * NONCE or not hmac.compare_digest(proof, _proof(secret, b"client", mode, nonce,
                                                                             client_nonce)):
        sock.sendall(reply("UNAUTHENTICATED", b"expert data plane: missing or wrong secret"))
        return None
    sock.sendall(reply("OK", _proof(secret, b"server", nonce, client_nonce)))
    return mode


def call(sock: socket.socket, message: bytes, fds: list[int], timeout: float, peer: str) -> bytes:
    """Send one request (and descriptors), wait for its reply: the body of an OK reply.
    TimeoutError past `timeout`, CallFailed on an error reply, ConnectionError if the worker is gone."""
    sock.settimeout(timeout)
    if fds:
        socket.send_fds(sock, [message], fds)
    else:
        sock.send(message)  # a whole message or an error: SOCK_SEQPACKET never sends part of one
    return parse_reply(sock.recv(MAX_HEADER_BYTES), peer)


class Channel(Protocol):
    """One connection to a worker and the buffers it uses: one call at a time."""

    def forward(self, layer: int, rows: Tensor, expert_ids: Sequence[int], counts: Sequence[int],
                timeout: float) -> Tensor:
        ...

    def close(self) -> None:
        ...


class ChannelPool:
    """A transport to one worker over channels: calls in flight at once (two micro-batches, a
    failover) each take their own channel. A channel opens inside a call, so a worker that is
    down fails that call (and the router fails over) rather than the router's step. A channel
    whose call failed or timed out is closed, never reused: the worker may still write into it."""

    def __init__(self, address: str, open_channel: Callable[[float], Channel]):
        self.address = address
        self._open_channel = open_channel
        self._idle: list[Channel] = []
        self._lock = threading.Lock()
        self._closed = False

    def forward(self, layer: int, rows: Tensor, expert_ids: Sequence[int], counts: Sequence[int],
                timeout: float) -> Tensor:
        deadline = time.monotonic() + timeout
        with self._lock:
            channel = self._idle.pop() if self._idle else None
        try:
            # Channels outlive the call that opened them: their buffers must be normal tensors even
            # when that call ran under the engine's inference mode (a failover on its thread).
            with torch.inference_mode(False):
                channel = channel or self._open_channel(timeout)
                out = channel.forward(layer, rows, expert_ids, counts, max(deadline - time.monotonic(), 1e-3))
        except BaseException:
            if channel is not None:
                channel.close()
            raise
        with self._lock:
            keep = not self._closed
            if keep:
                self._idle.append(channel)
        if not keep:
            channel.close()
        return out

    def close(self) -> None:
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for channel in idle:
            channel.close()
