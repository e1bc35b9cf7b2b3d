"""The router end of the token stream: outputs grouped per ingress replica, one message per step.

Each served request is a `Stream` (its destination, the outputs to skip when it
resumes a request another router had started, and `stream_interval`). The engine
delivers a step's outputs on the router's event loop; `flush` then sends one message
to each ingress replica that has new outputs. A destination whose call fails (the
ingress replica is gone) fails its requests, which frees their slots.
"""
from __future__ import annotations

import asyncio
import logging

from grpc import aio

from deployments.tokens import wire

log = logging.getLogger("ray.serve")


class DeliveryFailed(ConnectionError):
    """The ingress replica this request's outputs go to cannot be reached."""


class Stream:
    """One request's outputs on their way to its ingress: `deliver` is the engine's callback."""

    __slots__ = ("request_id", "dest", "skip", "interval", "pending", "sent", "done")

    def __init__(self, request_id: str, dest: "Destination", skip: int, interval: int, done: asyncio.Future):
        self.request_id, self.dest, self.skip, self.interval, self.done = request_id, dest, skip, interval, done
        self.pending: list = []
        self.sent = False  # the first output goes at once (time to first token), then `interval` at a time

    def deliver(self, item) -> None:
        if isinstance(item, BaseException):
            self.close(item)
            return
        if self.skip:  # already delivered by the router that died: replayed, not sent again
            self.skip -= 1
            return
        self.pending.append(item)
        if item.finish_reason or not self.sent or len(self.pending) >= self.interval:
            self.dest.outgoing.append((self.request_id, self.pending))
            self.dest.publisher.dirty.add(self.dest)
            self.pending, self.sent = [], True
        if item.finish_reason:
            self.close(None)

    def close(self, error: BaseException | None) -> None:
        self.dest.streams.pop(self.request_id, None)
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)


class Destination:
    """One ingress replica: a client-streaming call kept open, fed one message per step."""

    def __init__(self, publisher: "TokenPublisher", address: str):
        self.publisher, self.address = publisher, address
        self.streams: dict[str, Stream] = {}
        self.outgoing: list[tuple[str, list]] = []
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def send(self) -> None:
        if self.outgoing:
            self.queue.put_nowait(wire.encode(self.outgoing))
            self.outgoing = []

    async def _messages(self):
        while True:
            yield await self.queue.get()

    async def _run(self) -> None:
        metadata = ((wire.SECRET_KEY, self.publisher.secret),)
        try:
            async with aio.insecure_channel(self.address, options=wire.OPTIONS) as channel:
                await channel.stream_unary(wire.METHOD)(self._messages(), metadata=metadata)
            error: BaseException = DeliveryFailed(f"token stream to {self.address} ended")
        except asyncio.CancelledError:
            error = DeliveryFailed(f"token stream to {self.address} closed")
        except Exception as e:  # noqa: BLE001 - the ingress replica is gone or refused us
            why = f"{e.code().name}: {e.details() or ''}" if isinstance(e, aio.AioRpcError) else str(e)
            error = DeliveryFailed(f"token stream to {self.address} failed: {why}")
            if self.streams:
                log.warning("%s; %d request(s) on it end", error, len(self.streams))
            else:  # an idle stream to a replica that stopped (a scale-in, a shutdown) is routine
                log.debug("%s (idle)", error)
        self.publisher.destinations.pop(self.address, None)
        for stream in list(self.streams.values()):
            stream.close(error)


class TokenPublisher:
    def __init__(self, secret: str, interval: int = 1):
        self.secret, self.interval = secret, interval
        self.destinations: dict[str, Destination] = {}
        self.dirty: set[Destination] = set()

    def open(self, request_id: str, reply_to: str, skip: int, done: asyncio.Future) -> Stream:
        dest = self.destinations.get(reply_to)
        if dest is None:
            dest = self.destinations[reply_to] = Destination(self, reply_to)
        stream = dest.streams[request_id] = Stream(request_id, dest, skip, self.interval, done)
        return stream

    def flush(self) -> None:
        """After each step's outputs are delivered: one message per ingress replica with news."""
        for dest in self.dirty:
            dest.send()
        self.dirty.clear()

    async def close(self) -> None:
        for dest in list(self.destinations.values()):
            dest.task.cancel()
        await asyncio.gather(*(d.task for d in self.destinations.values()), return_exceptions=True)
