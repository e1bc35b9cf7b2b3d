"""The engine on a background thread, fed by asyncio request handlers.

One thread owns the LLMEngine (it is not thread-safe): handlers post
commands to its inbox and read their request's outputs from an asyncio queue.
A request whose consumer goes away (client disconnect, timeout) is aborted and
its KV-cache blocks freed on the next loop turn.

The loop survives any single bad request: a command that fails fails only its
request, a sequence that fails inside a step fails only itself. If the loop
still dies (a bug), `alive` turns False so the host's health check fails and
Serve replaces the replica instead of leaving requests hanging.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from typing import AsyncIterator, Callable

from cluster.engine.engine import LLMEngine, StepOutput
from cluster.engine.params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine failed while running this request (or is not running at all)."""


class SequenceFailed(RuntimeError):
    """This request's sequence failed inside a step; the rest of the batch went on."""

    def __reduce__(self):
        return SequenceFailed, (str(self),)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05, step_delay_s: float = 0.0,
                 on_idle: Callable[[], None] | None = None):
        self.engine = engine
        self.on_idle = on_idle  # run on the loop thread while there is no work (e.g. switch tables now)
        self.idle_wait_s = idle_wait_s
        self.step_delay_s = step_delay_s  # tests only: a slow-step hook, so timing-dependent tests are deterministic
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.step_seconds = 0.0
        self.steps = 0
        self.active = 0  # requests between generate() start and end (event-loop side only)
        self.died: str | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.died is None

    # -- called from request handlers (any thread / event loop) ---------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[list[StepOutput]]:
        """This request's outputs, in batches: everything produced since the consumer last read
        (one message per read however far it fell behind)."""
        if not self.alive:
            raise EngineDeadError(f"the engine loop is not running ({self.died or 'stopped'})")
        request_id = uuid.uuid4().hex
        out: asyncio.Queue = asyncio.Queue()
        self._inbox.put(("add", request_id, prompt_ids, params, asyncio.get_running_loop(), out))
        self._wake.set()
        if not self.alive:  # died between the check and the put: nothing would answer this request
            self._fail_queued(EngineDeadError(f"the engine loop is not running ({self.died or 'stopped'})"))
        finished = False
        self.active += 1
        try:
            while not finished:
                items = [await out.get()]
                while not out.empty():
                    items.append(out.get_nowait())
                batch, finished = _unpack(items)
                yield batch
        finally:
            self.active -= 1
            if not finished:
                self.abort(request_id)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """The engine's request checks (pure reads of its config and cache size: safe off its thread)."""
        self.engine.validate(prompt_ids, params)

    def set_expert_load_window(self, alpha: float) -> None:
        self.engine.expert_load.set_alpha(alpha)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict[str, float]:
        s = self.engine.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "steps": self.steps,
                "step_seconds": self.step_seconds, "active_requests": self.active,
                "free_seq_slots": self.engine.free_seq_slots, "free_kv_blocks": self.engine.cache.num_free_blocks,
                "kv_blocks": self.engine.cache.num_blocks, "preemptions": s.num_preemptions,
                "engine_alive": self.alive}

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
            try:
                self._apply(cmd)
            except Exception as e:  # noqa: BLE001 - a bad command fails its own request only
                log.warning("engine command %s failed: %s", cmd[0], e)
                if cmd[0] == "add":
                    cmd[4].call_soon_threadsafe(cmd[5].put_nowait, e)

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, request_id, prompt_ids, params, loop, out = cmd
            self.engine.add_request(prompt_ids, params, request_id=request_id)
            self._streams[request_id] = (loop, out)
        elif self.engine.abort(cmd[1]) or cmd[1] in self._streams:
            self._streams.pop(cmd[1], None)

    def _emit(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, out = stream
            loop.call_soon_threadsafe(out.put_nowait, item)

    def _step(self) -> None:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        t0 = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - the whole batch failed (e.g. an expert had no live copy)
            log.warning("engine step failed: %s", e)
            for request_id in list(self._streams):
                self._emit(request_id, e)
                self.engine.abort(request_id)
            self._streams.clear()
            return
        self.step_seconds += time.perf_counter() - t0
        self.steps += 1
        for o in outputs:
            self._emit(o.request_id, SequenceFailed(o.error) if o.error else o)
            if o.finish_reason:
                self._streams.pop(o.request_id, None)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if self.engine.has_unfinished():
                    self._step()
                else:
                    if self.on_idle is not None:
                        self.on_idle()
                    self._wake.wait(self.idle_wait_s)
                    self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - a bug: report dead, fail everyone waiting
            self.died = f"{type(e).__name__}: {e}"
            log.exception("engine loop died")
            error = EngineDeadError(self.died)
            for request_id in list(self._streams):
                self._emit(request_id, error)
            self._fail_queued(error)

    def _fail_queued(self, error: Exception) -> None:
        """Requests still in the inbox when the loop is gone get the error instead of no answer."""
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                cmd[4].call_soon_threadsafe(cmd[5].put_nowait, error)


def _unpack(items: list) -> tuple[list[StepOutput], bool]:
    """Outputs up to a failure (raised as it is: the request's own error, the step's error such as
    an expert without a live copy, or EngineDeadError when the loop died) or the final one."""
    batch = []
    for item in items:
        if isinstance(item, BaseException):
            raise item
        batch.append(item)
        if item.finish_reason:
            return batch, True
    return batch, False
