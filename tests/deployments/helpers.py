"""Helpers the deployment tests share (tests import helpers and conftest, never each other).

- standalone expert workers as the data-plane tests start them (processes on this machine, which the
  tests and their "router", the test process, call one node) and the transports to them;
- steady completion load against a served cluster, with the in-process outputs to compare;
- the HTTP API in process over a scripted router (no Ray);
- a checkpoint directory holding the demo tokenizer and a chat template.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import requests
from transformers import PreTrainedTokenizerFast

from cluster.engine import LLMEngine, SamplingParams
from cluster.engine.engine import StepOutput
from cluster.placement import WorkerRef
from deployments import standalone_worker
from deployments.api.chat import ChatTemplates
from deployments.api.http import build_http_app
from deployments.experts import transport as transports
from deployments.experts.transport.grpc import GrpcTransport
from deployments.experts.transport.shm import ShmTransport
from tests.helpers import GeneratorClient

# -- standalone expert workers ---------------------------------------------------------------
SECRET = "test-data-plane-secret"
HERE = "node-here"
KINDS = {"grpc": GrpcTransport, "shm": ShmTransport}  # the CPU transports the data-plane tests run on


def start_worker(model: str, experts, *extra: str) -> subprocess.Popen:
    """A worker holding copies of `experts` ([(layer, expert_id), ...]); the caller kills it."""
    return standalone_worker.start(model, experts, *extra, secret=SECRET)


def worker_ref(proc: subprocess.Popen, node: str = HERE) -> WorkerRef:
    return standalone_worker.worker_ref(proc, node)


def connect(ref: WorkerRef, kind: str = "grpc"):
    """A transport of `kind` from this process (a router on HERE) to a standalone worker."""
    return transports.connect(ref, node_id=HERE, device="cpu", secret=SECRET, prefer=kind)


# -- steady load on a served cluster -----------------------------------------------------------
LOAD_PROMPTS = [[5, 17, 33], [100, 3, 9, 12], list(range(3, 30, 2)), [7, 7, 8]]
LOAD_MAX_TOKENS = 12


class Load:
    """`clients` threads sending greedy completions in a loop until stopped (or `limit_s`)."""

    def __init__(self, base: str, clients: int = 3, limit_s: float = 240):
        self.base, self.limit_s = base, limit_s
        self.sent = self.ok = 0
        self.failed: list[tuple[int, str, float]] = []  # (status, message, seconds)
        self.outputs: dict[int, set[tuple[int, ...]]] = {}
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _loop(self, client: int) -> None:
        deadline = time.monotonic() + self.limit_s
        i = client
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            p = i % len(LOAD_PROMPTS)
            i += 1
            t0 = time.monotonic()
            with self.lock:
                self.sent += 1
            try:
                r = requests.post(f"{self.base}/v1/completions", timeout=60,
                                  json={"prompt": LOAD_PROMPTS[p], "max_tokens": LOAD_MAX_TOKENS, "temperature": 0,
                                        "ignore_eos": True})
                status, body = r.status_code, r.json()
            except (requests.RequestException, ValueError) as e:
                status, body = 0, {"error": {"message": repr(e)}}
            with self.lock:
                if status == 200:
                    self.ok += 1
                    self.outputs.setdefault(p, set()).add(tuple(body["choices"][0]["token_ids"]))
                else:
                    self.failed.append((status, body.get("error", {}).get("message", ""), time.monotonic() - t0))

    def wait_ok(self, n: int, limit_s: float = 120) -> None:
        deadline = time.monotonic() + limit_s
        while self.ok < n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.ok >= n, f"only {self.ok} requests succeeded ({len(self.failed)} failed: {self.failed[:3]})"

    def stop(self) -> str:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=90)
        return f"sent {self.sent}, succeeded {self.ok}, failed {len(self.failed)}"


def load_expected(model: str) -> dict[int, tuple[int, ...]]:
    """What Load's prompts give in process (greedy): each prompt's index -> its tokens."""
    params = SamplingParams(max_tokens=LOAD_MAX_TOKENS, temperature=0, ignore_eos=True)
    outs = LLMEngine.from_pretrained(model).generate(LOAD_PROMPTS, params)
    return {i: tuple(o.token_ids) for i, o in enumerate(outs)}


# -- the HTTP API in process over a scripted router -------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "options": {"type": "object"}}}}},
         {"type": "function", "function": {"name": "search", "parameters": {
             "type": "object", "properties": {"query": {"type": "string"}}}}}]

WEATHER = {"city": "Zürich 東京", "options": {"units": ["c", "f"], "deep": {"ok": True}}}
# gpt-oss replies in harmony: analysis then final, and analysis then a call (<|call|> is its EOS)
HARMONY_REPLY = ("<|channel|>analysis<|message|>User asks weather.<|end|><|start|>assistant<|channel|>final"
                 "<|message|>Sunny.<|return|>")
HARMONY_CALL = ("<|channel|>analysis<|message|>Use search.<|end|><|start|>assistant<|channel|>commentary "
                'to=functions.search <|constrain|>json<|message|>{"query": "x"}<|call|>')
MESSAGES = [{"role": "user", "content": "Weather in Zürich?"}]


class NoRouters:
    """Serving only needs a handle it can call `.options(stream=True)` on to be built."""

    def options(self, **kw):
        return self


class ScriptedRouters:
    """Streams `reply` as a router would: an empty batch (admitted), then one StepOutput per token,
    ending with "stop", or "length" when max_tokens runs out first; `stop` strings end the text before
    them, and until then what could still become one is held back (as the engine does)."""

    def __init__(self, tokenizer, reply: str):
        self.tokenizer, self.reply = tokenizer, reply

    async def generate(self, prompt_ids, params):
        ids = self.tokenizer.encode(self.reply, add_special_tokens=False)
        hold = max((len(s) for s in params.stop), default=1) - 1  # what could still become a stop string
        yield []
        text = ""
        for i, token in enumerate(ids[:params.max_tokens]):
            new = self.tokenizer.decode(ids[:i + 1])
            last = i + 1 == len(ids) or i + 1 == params.max_tokens
            finish = ("stop" if i + 1 == len(ids) else "length") if last else None
            cut = min((i for i in (new.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:  # a stop string: the text ends before it, as the engine ends it
                new, last, finish = new[:cut], True, "stop"
            elif new.endswith("\ufffd") and not last:  # half a character: held back, as a detokenizer does
                new = text
            elif hold and not last:
                new = new[:max(len(text), len(new) - hold)]
            yield [StepOutput("r", token, new[len(text):], None, finish)]
            text = new
            if last:
                return


class IngressStub:
    """What the HTTP app reads from its ingress: Serving, the config, a ready cluster, no metrics."""

    def __init__(self, serving):
        self.cfg, self.serving, self.cluster_state = serving.cfg, serving, {"ready": True}

    async def service_metrics(self) -> str:
        return ""


def ask(serving, reply: str, **kwargs):
    """One chat completion through the real HTTP app and the openai client, the routers replaced by
    a scripted `reply` (a list of chunks with stream=True)."""
    import httpx2
    import openai

    serving.client = GeneratorClient(ScriptedRouters(serving.tokenizer, reply).generate)
    serving.cut = asyncio.Event()  # each call runs its own event loop
    transport = httpx2.ASGITransport(app=build_http_app(IngressStub(serving)))

    async def run():
        async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", max_retries=0,
                                      http_client=httpx2.AsyncClient(transport=transport)) as client:
            if not kwargs.pop("stream", False):
                return await client.chat.completions.create(model=serving.cfg.model_name, messages=MESSAGES,
                                                            **kwargs)
            stream = await client.chat.completions.create(model=serving.cfg.model_name, messages=MESSAGES,
                                                          stream=True, **kwargs)
            return [chunk async for chunk in stream]
    return asyncio.run(run())


# -- chat templates ------------------------------------------------------------------------------
DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "models" / "demo" / "tokenizer.json"


def checkpoint(root: Path, chat_template=None, **config) -> tuple[PreTrainedTokenizerFast, ChatTemplates]:
    """A checkpoint directory with the demo tokenizer; the reference tokenizer and ours, read from it."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO_TOKENIZER, root / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
              "eos_token": "<|endoftext|>", **config}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return PreTrainedTokenizerFast.from_pretrained(root), ChatTemplates.from_checkpoint(root)


# Faults on a live Serve cluster (test_faults.py, test_tiers_served.py)

def kill_replica(deployment: str) -> str:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::moe#{deployment}#")]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def plane_stats(base: str) -> dict:
    return requests.get(f"{base}/admin/stats", timeout=30).json()["data_plane"]


def wait_healed(base: str, limit_s: float = 120) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        dp = plane_stats(base)
        if not dp["down_workers"] and requests.get(f"{base}/ready", timeout=30).status_code == 200:
            return dp
        time.sleep(0.5)
    raise AssertionError(f"worker not back within {limit_s} s: {plane_stats(base)}")


def streamed(chunks) -> tuple[str, str]:
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    return ("".join(getattr(d, "reasoning_content", None) or "" for d in deltas),
            "".join(d.content or "" for d in deltas))


def openai_over_engine(serving, engine: LLMEngine, use):
    """`await use(client, model_name)` with the official openai client over the real HTTP app and
    `serving`, whose router is `engine` in process (AsyncEngine, no Ray)."""
    import httpx2
    import openai

    from cluster.engine.async_engine import AsyncEngine

    async def run():
        async_engine = AsyncEngine(engine)
        serving.client = GeneratorClient(async_engine.generate, async_engine.shutdown)
        serving.cut = asyncio.Event()
        transport = httpx2.ASGITransport(app=build_http_app(IngressStub(serving)))
        try:
            async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", max_retries=0,
                                          http_client=httpx2.AsyncClient(transport=transport)) as client:
                return await use(client, serving.cfg.model_name)
        finally:
            serving.client.shutdown()
    return asyncio.run(run())
