"""The token path router -> ingress without a cluster: a real gRPC stream on 127.0.0.1 between a
TokenPublisher and a TokenSink, and the engine handing each step's outputs over in one call."""
import asyncio

import pytest

from cluster.engine import SamplingParams
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import StepOutput
from deployments.tokens.publisher import DeliveryFailed, TokenPublisher
from deployments.tokens.sink import TokenSink

SECRET = "s3cret"


def out(request_id: str, token: int, finish: str | None = None) -> StepOutput:
    return StepOutput(request_id, token, f"<{token}>", None, finish)


class CountingSink(TokenSink):
    """A real sink that also records each message it receives (one per router step per ingress)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.messages = 0

    def dispatch(self, message: bytes) -> None:
        self.messages += 1
        super().dispatch(message)


async def _wait_for(predicate, what: str) -> None:
    for _ in range(500):  # bounded: 5 s of 10 ms polls, far above a loopback round trip
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def _pair(interval: int = 1):
    sink = CountingSink("127.0.0.1", SECRET)
    await sink.start()
    return sink, TokenPublisher(SECRET, interval)


def test_one_message_per_step_carries_every_stream():
    async def run():
        sink, publisher = await _pair()
        got: dict[str, list] = {r: [] for r in "abc"}
        for r in "abc":
            sink.register(r, got[r].extend)
        loop = asyncio.get_running_loop()
        streams = {r: publisher.open(r, sink.address, 0, loop.create_future()) for r in "abc"}
        for step in range(3):
            for r in "abc":
                streams[r].deliver(out(r, step, "stop" if step == 2 else None))
            publisher.flush()  # what the engine's on_delivered does after each step
        await _wait_for(lambda: all(len(v) == 3 for v in got.values()), "three steps")
        assert sink.messages == 3  # three steps, three streams: three messages, not nine
        assert [o.token_id for o in got["b"]] == [0, 1, 2] and got["b"][-1].finish_reason == "stop"
        assert all(s.done.done() and s.done.exception() is None for s in streams.values())
        await publisher.close()
        await sink.stop()

    asyncio.run(run())


def test_interval_sends_the_first_at_once_then_groups_and_skip_drops_replayed_outputs():
    async def run():
        sink, publisher = await _pair(interval=3)
        batches = []
        sink.register("r", batches.append)
        stream = publisher.open("r", sink.address, 2, asyncio.get_running_loop().create_future())
        for token in range(9):  # 2 replayed (skipped), then 7 new: [2], [3, 4, 5], [6, 7, 8]
            stream.deliver(out("r", token, "length" if token == 8 else None))
            publisher.flush()
        await _wait_for(lambda: sum(len(b) for b in batches) == 7, "seven outputs")
        assert [[o.token_id for o in b] for b in batches] == [[2], [3, 4, 5], [6, 7, 8]]
        await publisher.close()
        await sink.stop()

    asyncio.run(run())


def test_outputs_of_unregistered_requests_are_dropped():
    async def run():
        sink, publisher = await _pair()
        kept = []
        sink.register("live", kept.extend)
        loop = asyncio.get_running_loop()
        gone = publisher.open("abandoned", sink.address, 0, loop.create_future())
        live = publisher.open("live", sink.address, 0, loop.create_future())
        gone.deliver(out("abandoned", 1))
        live.deliver(out("live", 2, "stop"))
        publisher.flush()
        await _wait_for(lambda: kept, "the live request's output")
        assert [o.request_id for o in kept] == ["live"]
        await publisher.close()
        await sink.stop()

    asyncio.run(run())


def test_a_wrong_secret_is_refused_and_fails_the_streams():
    async def run():
        sink = TokenSink("127.0.0.1", SECRET)
        await sink.start()
        received = []
        sink.register("r", received.append)
        intruder = TokenPublisher("not-the-secret")
        stream = intruder.open("r", sink.address, 0, asyncio.get_running_loop().create_future())
        stream.deliver(out("r", 1))
        intruder.flush()
        with pytest.raises(DeliveryFailed, match="UNAUTHENTICATED|secret"):
            await asyncio.wait_for(stream.done, 10)
        assert received == []
        await sink.stop()

    asyncio.run(run())


def test_an_ingress_that_goes_away_fails_its_streams():
    """The router frees the slots of requests whose ingress replica is gone."""
    async def run():
        sink, publisher = await _pair()
        stream = publisher.open("r", sink.address, 0, asyncio.get_running_loop().create_future())
        stream.deliver(out("r", 1))
        publisher.flush()
        await _wait_for(lambda: sink.messages == 1, "the first message")
        await sink.stop()
        with pytest.raises(DeliveryFailed) as failed:
            await asyncio.wait_for(stream.done, 30)
        assert publisher.destinations == {}
        assert "\n" not in str(failed.value), str(failed.value)  # a status and its details, not the RPC's repr

    asyncio.run(run())


def test_the_engine_hands_each_step_over_in_one_call():
    from cluster.engine import LLMEngine
    from tests.helpers import DEMO

    engine = LLMEngine.from_pretrained(str(DEMO), max_num_seqs=8, max_model_len=128)

    async def run():
        ae = AsyncEngine(engine)
        calls = []
        ae.on_delivered = lambda: calls.append(1)
        try:
            params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
            got = await asyncio.gather(*(_collect(ae, [5, 17, 33 + i], params) for i in range(4)))
            return got, len(calls), ae.steps
        finally:
            ae.shutdown()

    got, calls, steps = asyncio.run(run())
    assert all(len(tokens) == 6 for tokens in got)
    assert calls <= steps  # 4 streams x 6 tokens in at most one hand-over per step, not one per token


async def _collect(ae, prompt, params):
    return [o.token_id async for batch in ae.generate(prompt, params) for o in batch]
