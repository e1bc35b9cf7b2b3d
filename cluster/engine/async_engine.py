"""The engine on a background thread, fed by asyncio request handlers.

One thread owns the LLMEngine (it is not thread-safe): handlers post
commands to its inbox and read their request's outputs from an asyncio queue.
A request whose consumer goes away (client disconnect) is aborted and its
KV-cache blocks freed on the next loop turn.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from typing import AsyncIterator

from cluster.engine.engine import LLMEngine, StepOutput
from cluster.engine.params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine failed while running this request."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.step_seconds = 0.0
        self.steps = 0
        self.active = 0  # requests between generate() start and end (event-loop side only)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # -- called from request handlers (any thread / event loop) ---------------------------
    def prepare(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Tokenise and validate now, so a bad request fails before anything is streamed."""
        prompt_ids = self.engine.encode(prompt)
        self.engine.validate(prompt_ids, params)
        return prompt_ids

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StepOutput]:
        request_id = uuid.uuid4().hex
        out: asyncio.Queue = asyncio.Queue()
        self._inbox.put(("add", request_id, prompt_ids, params, asyncio.get_running_loop(), out))
        self._wake.set()
        finished = False
        self.active += 1
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(str(item)) from item
                yield item
                if item.finish_reason:
                    finished = True
                    return
        finally:
            self.active -= 1
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict[str, float]:
        s = self.engine.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "steps": self.steps,
                "step_seconds": self.step_seconds, "active_requests": self.active,
                "free_kv_slots": self.engine.free_seq_slots, "free_kv_blocks": self.engine.cache.num_free_blocks,
                "kv_blocks": self.engine.cache.num_blocks, "preemptions": s.num_preemptions}

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # -- the loop thread -------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, request_id, prompt_ids, params, loop, out = cmd
                self._streams[request_id] = (loop, out)
                self.engine.add_request(prompt_ids, params, request_id=request_id)
            elif self.engine.abort(cmd[1]):
                self._streams.pop(cmd[1], None)

    def _emit(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, out = stream
            loop.call_soon_threadsafe(out.put_nowait, item)

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - every running request must hear about it
            log.exception("engine step failed")
            for request_id in list(self._streams):
                self._emit(request_id, e)
                self.engine.abort(request_id)
            self._streams.clear()
            return
        self.step_seconds += time.perf_counter() - t0
        self.steps += 1
        for o in outputs:
            self._emit(o.request_id, o)
            if o.finish_reason:
                self._streams.pop(o.request_id, None)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if self.engine.has_unfinished():
                self._step()
            else:
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
