"""A worker's Unix-socket server for the same-node transports, next to its gRPC server.

The socket is in Linux's abstract namespace (`@moe-experts-<random>`): no file, so
nothing is left behind when a worker is killed, and no path-length limit. Only
processes of the worker's own user may talk to it (the peer's uid, SO_PEERCRED, is
checked before anything is read); they then authenticate (local_socket.accept).

A router opens one connection per call it has in flight to this worker (a few); each gets
a thread. A connection names its mode (shm or cuda_ipc) and gets a session of that mode,
which owns the buffers the connection uses and frees them when the connection closes.
Every request is validated by the session (the same rules as gRPC's,
deployments/experts/validate.py) before anything is computed.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading
from typing import Callable, Protocol

from deployments.experts.transport.local_socket import accept, receive, reply, sockaddr
from deployments.experts.validate import BadRequest, refusal

log = logging.getLogger("ray.serve")
HANDSHAKE_TIMEOUT_S = 5.0  # a caller that connects and says nothing does not hold a thread for long
PEERCRED = struct.Struct("3i")  # pid, uid, gid


class Session(Protocol):
    def handle(self, message: bytes, fds: list[int]) -> bytes:
        """The body of an OK reply; one of validate.REFUSALS for a request refused."""

    def close(self) -> None:
        ...


class _Refused:
    """A connection whose mode this worker cannot serve: every request gets the reason."""

    def __init__(self, reason: str):
        self.reason = reason

    def handle(self, message: bytes, fds: list[int]) -> bytes:
        for fd in fds:
            os.close(fd)
        raise BadRequest(self.reason)

    def close(self) -> None:
        pass


def same_user(conn: socket.socket) -> bool:
    _, uid, _ = PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
    return uid == os.getuid()


class LocalServer:
    """Serves `sessions[mode]()` per authenticated connection on `self.path` until `close()`."""

    def __init__(self, name: str, secret: str, sessions: dict[bytes, Callable[[], Session]]):
        if not secret:
            raise ValueError("the expert data plane needs a secret")
        self.name, self.secret, self.sessions = name, secret, sessions
        self.path = f"@moe-experts-{secrets.token_hex(12)}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(sockaddr(self.path))
        self._listener.listen(64)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_forever, name="experts-local", daemon=True).start()

    def _accept_forever(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                self._open.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="experts-local-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        session = None
        try:
            if not same_user(conn):  # another user on the machine: not a word
                return
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            mode = accept(conn, self.secret)
            if mode is None:
                return
            session = self._open_session(mode)
            conn.settimeout(None)  # a router's connection may idle between steps
            while True:
                answer = self._answer(conn, session)
                if answer is None:
                    return
                conn.send(answer)
        except OSError:  # the router went away (or gave up on a call and closed)
            pass
        finally:
            if session is not None:
                session.close()
            with self._lock:
                self._open.discard(conn)
            conn.close()

    def _open_session(self, mode: bytes) -> Session:
        try:
            if mode not in self.sessions:
                raise BadRequest(f"unknown transport mode {mode!r}")
            return self.sessions[mode]()
        except BadRequest as e:
            return _Refused(str(e))

    def _answer(self, conn: socket.socket, session: Session) -> bytes | None:
        """The reply to the next request; None when the caller hung up."""
        try:
            message, fds = receive(conn)
        except BadRequest as e:
            return self._refuse(e)
        if not message and not fds:
            return None
        try:
            return reply("OK", session.handle(message, fds))
        except Exception as e:  # noqa: BLE001 - the caller fails over; the worker keeps serving
            return self._refuse(e)

    def _refuse(self, error: Exception) -> bytes:
        """The reply validate.refusal gives `error` (INTERNAL for what is no refusal: logged here)."""
        status, message = refusal(self.name, error)
        if status == "INTERNAL":
            log.exception("%s: a local data-plane call failed", self.name)
        return reply(status, message.encode())

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; close alone may not
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            opened, self._open = self._open, set()
        for conn in opened:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
