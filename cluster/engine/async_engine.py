"""The engine on a background thread, fed by asyncio request handlers.

One thread owns the LLMEngine (it is not thread-safe): handlers post
commands to its inbox. After each step the thread hands the step's outputs to
each event loop that has requests in it in ONE cross-thread call; there each
output goes to its request's `deliver` callback (an asyncio queue's put for
`generate`, the router's token publisher for served requests). A request whose
consumer goes away (client disconnect, timeout) is aborted and its KV-cache
blocks freed on the next loop turn.

The loop survives any single bad request: a command that fails fails only its
request, a sequence that fails inside a step fails only itself. If the loop
still dies (a bug), `alive` turns False so the host's health check fails and
Serve replaces the replica instead of leaving requests hanging.

In-flight work in the host's process is counted here alone (its host reads it):
`admitted` from the host's admission check to the request's end (the router's queue
limit), `active` from `start` to the end (the `active_requests` stat). The
scheduler's running and waiting queues are the engine thread's own, read for stats.
"""
from __future__ import annotations

import asyncio
import contextlib
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


Deliver = Callable[[object], None]  # gets a StepOutput, or the exception that ended the request


class AsyncEngine:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05, step_delay_s: float = 0.0,
                 on_idle: Callable[[], None] | None = None):
        self.engine = engine
        self.on_idle = on_idle  # run on the loop thread while there is no work (e.g. switch tables now)
        self.on_delivered: Callable[[], None] | None = None  # event-loop side, after each step's outputs
        self.idle_wait_s = idle_wait_s
        self.step_delay_s = step_delay_s  # tests only: a slow-step hook, so timing-dependent tests are deterministic
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}  # loop thread: request -> its event loop
        self._delivers: dict[str, Deliver] = {}  # event-loop side: request -> callback
        self._admitted = 0  # event-loop side: inside `admission()`
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.step_seconds = 0.0
        self.step_cpu_seconds = 0.0  # the engine thread's CPU in steps (torch's other intra-op threads not counted)
        self.steps = 0
        self.died: str | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        """Requests started and not yet ended or aborted (event-loop side)."""
        return len(self._delivers)

    @property
    def admitted(self) -> int:
        """Requests inside `admission()`: admitted by the host, started or not, not yet ended."""
        return self._admitted

    @contextlib.contextmanager
    def admission(self):
        """One admitted request, counted in `admitted` for as long as the block runs. The host checks
        its limit and enters this with no await between, so a burst cannot overshoot it."""
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.died is None

    # -- called from request handlers (an event loop) -------------------------------------
    def start(self, request_id: str, prompt_ids: list[int], params: SamplingParams, deliver: Deliver, *,
              checked: bool = False) -> None:
        """Runs the request; `deliver` gets each of its outputs on this event loop, or the exception
        that ended it (the request's own error, the step's, or EngineDeadError), then nothing more.
        The request is validated here (InvalidRequest) unless the caller already did (`checked`: the
        router, at admission); the engine thread does not check it again."""
        if not self.alive:
            raise EngineDeadError(f"the engine loop is not running ({self.died or 'stopped'})")
        if not checked:
            self.validate(prompt_ids, params)
        loop = asyncio.get_running_loop()
        self._delivers[request_id] = deliver
        self._inbox.put(("add", request_id, prompt_ids, params, loop))
        self._wake.set()
        if not self.alive:  # died between the check and the put: nothing would answer this request
            self._fail_queued(EngineDeadError(f"the engine loop is not running ({self.died or 'stopped'})"))

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *,
                       checked: bool = False) -> AsyncIterator[list[StepOutput]]:
        """This request's outputs, in batches: everything produced since the consumer last read
        (one message per read however far it fell behind). `checked` as for `start`."""
        request_id = uuid.uuid4().hex
        out: asyncio.Queue = asyncio.Queue()
        self.start(request_id, prompt_ids, params, out.put_nowait, checked=checked)
        finished = False
        try:
            while not finished:
                items = [await out.get()]
                while not out.empty():
                    items.append(out.get_nowait())
                batch, finished = _unpack(items)
                yield batch
        finally:
            if not finished:
                self.abort(request_id)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """The engine's request checks (pure reads of its config and cache size: safe off its thread)."""
        self.engine.validate(prompt_ids, params)

    def set_expert_load_window(self, alpha: float) -> None:
        self.engine.expert_load.set_alpha(alpha)

    def expert_load_report(self, co_activation: bool) -> tuple:
        """`ExpertLoadTracker.report`: the expert load a router sends the controller."""
        return self.engine.expert_load.report(co_activation)

    def abort(self, request_id: str) -> None:
        """From the request's event loop: nothing more is delivered; the engine frees its slot."""
        self._delivers.pop(request_id, None)
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict[str, float]:
        s = self.engine.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "steps": self.steps,
                "step_seconds": self.step_seconds,
                "step_cpu_seconds": self.step_cpu_seconds, "active_requests": self.active,
                "free_seq_slots": self.engine.free_seq_slots, "free_kv_blocks": self.engine.cache.num_free_blocks,
                "kv_blocks": self.engine.cache.num_blocks, "preemptions": s.num_preemptions,
                "engine_alive": self.alive, **self.engine.cache_stats()}

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # -- event-loop side -------------------------------------------------------------------
    def _deliver(self, items: list[tuple[str, object]]) -> None:
        """One step's outputs for this loop: each to its request (one call_soon_threadsafe per step)."""
        for request_id, item in items:
            deliver = self._delivers.get(request_id)
            if deliver is None:
                continue  # aborted meanwhile
            if isinstance(item, BaseException) or item.finish_reason:
                del self._delivers[request_id]
            deliver(item)
        if self.on_delivered is not None:
            self.on_delivered()

    # -- the loop thread -------------------------------------------------------------------
    def _queued(self):
        """The inbox's commands, until it is empty."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drain_inbox(self) -> None:
        for cmd in self._queued():
            try:
                self._apply(cmd)
            except Exception as e:  # noqa: BLE001 - a bad command fails its own request only
                log.warning("engine command %s failed: %s", cmd[0], e)
                if cmd[0] == "add":
                    cmd[4].call_soon_threadsafe(self._deliver, [(cmd[1], e)])

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, request_id, prompt_ids, params, loop = cmd
            self.engine.add_checked(prompt_ids, params, request_id=request_id)
            self._loops[request_id] = loop
        elif self.engine.abort(cmd[1]) or cmd[1] in self._loops:
            self._loops.pop(cmd[1], None)

    def _send(self, items: list[tuple[str, object]]) -> None:
        """Items to their requests' event loops: one cross-thread call per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            loop = self._loops.get(request_id)
            if loop is not None:
                by_loop.setdefault(loop, []).append((request_id, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(self._deliver, batch)

    def _fail_all(self, error: BaseException) -> None:
        self._send([(request_id, error) for request_id in self._loops])
        self._loops.clear()

    def _step(self) -> None:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        t0, cpu0 = time.perf_counter(), time.thread_time()
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - the whole batch failed (e.g. an expert had no live copy)
            log.warning("engine step failed: %s", e)
            for request_id in list(self._loops):
                self.engine.abort(request_id)
            self._fail_all(e)
            return
        self.step_seconds += time.perf_counter() - t0
        self.step_cpu_seconds += time.thread_time() - cpu0
        self.steps += 1
        self._send([(o.request_id, SequenceFailed(o.error) if o.error else o) for o in outputs])
        for o in outputs:
            if o.finish_reason:
                self._loops.pop(o.request_id, None)

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
            self._fail_all(error)
            self._fail_queued(error)

    def _fail_queued(self, error: Exception) -> None:
        """Requests still in the inbox when the loop is gone get the error instead of no answer."""
        for cmd in self._queued():
            if cmd[0] == "add":
                cmd[4].call_soon_threadsafe(self._deliver, [(cmd[1], error)])


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
