"""How `moe-cluster serve` stops: stop signals, the drain, and removing what it deployed.

Until the application is ready a stop signal interrupts the start (KeyboardInterrupt); from then on
the first one starts the drain and the next cuts it. On a cluster joined with --address the
application is removed, and Serve itself only if this process started it and nothing else is
deployed on it: Serve's actors are detached, and another team's applications are not ours to stop.
"""
from __future__ import annotations

import signal
import sys
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_S = 0.05


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def interrupt_on_stop_signals() -> None:
    """Until ready. Again after ray.init, which puts its own SIGTERM handler (sys.exit) in place."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)


def ignore_stop_signals() -> None:
    """While removing what was deployed: a second Ctrl-C must not leave half of it behind."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def is_stop_exit(e: BaseException) -> bool:
    """A stop signal during ray.init: Ray's handler, in place then, raises SystemExit(SIGTERM)."""
    return isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and e.code == signal.SIGTERM)


class StopSignals:
    """SIGINT / SIGTERM once ready: the first asks for the drain (`stop`), the next cuts it (`cut`), as a
    second Ctrl-C does in uvicorn and vLLM. A plain counter polled by the main thread: a handler that
    takes a lock (threading.Event.set does) deadlocks if the signal lands while that lock is held."""

    def __init__(self):
        self.count = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, *_) -> None:
        self.count += 1

    @property
    def stop(self) -> bool:
        return self.count >= 1

    @property
    def cut(self) -> bool:
        return self.count >= 2

    def wait_stop(self) -> None:
        while not self.stop:
            time.sleep(0.2)

    def sleep(self, seconds: float) -> None:
        """`seconds`, or less if the drain is cut meanwhile."""
        deadline = time.monotonic() + seconds
        while not self.cut and time.monotonic() < deadline:
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


def drain(controller, timeout_s: float, signals: StopSignals) -> None:
    """New requests get 503 from now on; in-flight ones may finish for up to `timeout_s` (or until
    the drain is cut), then the rest end with an error event (streams) or a 503 before the server stops."""
    controller.start_drain.remote().result(timeout_s=30)
    signals.sleep(1.0)  # every ingress replica has polled the controller: none admits new requests
    left = controller.in_flight.remote().result(timeout_s=30)
    print(f"shutting down: draining {left} in-flight request(s) (up to {timeout_s:g} s; Ctrl-C again to cut them "
          "now)" if left else "shutting down: no request in flight", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout_s
    while left and time.monotonic() < deadline and not signals.cut:
        signals.sleep(0.2)
        left = controller.in_flight.remote().result(timeout_s=30)
    if left:
        why = "stop asked again" if signals.cut else "drain window over"
        print(f"{why}: {left} request(s) cut off", file=sys.stderr, flush=True)
        controller.cut.remote().result(timeout_s=30)
        time.sleep(1.5)  # the ingress replicas end them with an error event / 503


def serve_running() -> bool:
    """Serve already runs on the cluster joined (another application, or a run that left it)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def remove(app_name: str, started_serve: bool) -> None:
    """Our application; Serve too where we started it and no other application is left on it. Never
    raises: a cluster or Serve gone meanwhile is said, and the process still stops."""
    from ray import serve
    from ray.serve.context import _check_cached_client_alive

    try:
        # a 5 s probe, as serve.shutdown makes: a cluster that went away must not hang the stop
        client, had_client = _check_cached_client_alive()
        if client is None and (had_client or not serve_running()):
            print("Serve is gone from the cluster: nothing to remove", file=sys.stderr, flush=True)
            return
        serve.delete(app_name)  # waits for its replicas to stop (60 s at most, then TimeoutError)
        if started_serve and not serve.status().applications:
            serve.shutdown()
    except Exception as e:  # noqa: BLE001 - report it: the operator has to remove it by hand
        print(f"could not remove application {app_name!r} from the cluster: {type(e).__name__}: {e} (see `serve "
              "status`)", file=sys.stderr, flush=True)
