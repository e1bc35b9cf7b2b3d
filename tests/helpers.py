"""Shared test helpers: our model driven step by step, and transformers as the reference."""
from __future__ import annotations

from pathlib import Path

import torch

from cluster.engine import LLMEngine
from cluster.model.batch import make_batch
from cluster.model.kv_cache import KVCache

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"  # the trained demo checkpoint


def our_greedy_logits(engine: LLMEngine, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding through the engine's model and a KV cache of its own, keeping every step's logits."""
    cache = KVCache.for_model(engine.cfg, num_blocks=(len(prompt) + steps) // 16 + 1, block_size=16,
                              dtype=engine.kv_dtype, device=engine.device)
    table = cache.allocate(cache.num_blocks)
    tokens, logits_per_step, new, pos = [], [], list(prompt), 0
    for _ in range(steps):
        logits, _ = engine.model.forward(make_batch([(table, new, pos)], cache.block_size, engine.device), cache)
        pos += len(new)
        logits_per_step.append(logits[0].cpu())
        tokens.append(int(logits[0].argmax()))
        new = [tokens[-1]]
    return tokens, logits_per_step


def run_recording_logits(engine: LLMEngine, prompts, params) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Drive engine.step(), keeping each request's logits per step (rows follow the step's outputs).
    params: one SamplingParams for all prompts, or one each."""
    forward, seen = engine.model.forward, {}

    def spy(batch, cache, rows=None):
        logits, routing = forward(batch, cache, rows=rows)
        spy.last = logits
        return logits, routing

    engine.model.forward = spy
    try:
        each = params if isinstance(params, list) else [params] * len(prompts)
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, each)]
        tokens = {rid: [] for rid in ids}
        while engine.has_unfinished():
            for row, out in enumerate(engine.step()):
                tokens[out.request_id].append(out.token_id)
                seen.setdefault(out.request_id, []).append(spy.last[row].clone())
    finally:
        engine.model.forward = forward
    return [tokens[r] for r in ids], [seen[r] for r in ids]


def hf_greedy_logits(hf_model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with transformers' own forward and KV cache: raw argmax, EOS not special
    (generate()'s min_new_tokens would mask EOS out of the choice)."""
    tokens, logits = [], []
    with torch.no_grad():
        out = hf_model(torch.tensor([prompt]), use_cache=True)
        for _ in range(steps):
            logits.append(out.logits[0, -1].float())
            tokens.append(int(logits[-1].argmax()))
            out = hf_model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logits


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


class GeneratorClient:
    """The ingress's router client (deployments/api/router_client.py's `start`) over any
    `generate(prompt_ids, params)` async iterator of output batches: an in-process AsyncEngine or a
    scripted router. No Ray, no token stream: tests of the API layer above `Serving.stream`."""

    def __init__(self, generate, shutdown=None):
        self.generate, self.shutdown = generate, shutdown or (lambda: None)

    def start(self, index, prompt_ids, params, out):
        return _GeneratorRun(self.generate(prompt_ids, params), index, out)


class _GeneratorRun:
    def __init__(self, stream, index, out):
        import asyncio

        self.admitted = asyncio.get_running_loop().create_future()
        self.task = asyncio.ensure_future(self._run(stream, index, out))

    async def _run(self, stream, index, out):
        try:
            async for batch in stream:
                if not self.admitted.done():
                    self.admitted.set_result(None)  # the first batch: admitted
                if batch:
                    out.put_nowait((index, batch))
        except Exception as e:  # noqa: BLE001 - the request's error, as a router's would arrive
            if self.admitted.done():
                out.put_nowait((index, e))
            else:
                self.admitted.set_exception(e)
        finally:
            await stream.aclose()

    async def close(self):
        import asyncio

        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        if not self.admitted.done():
            self.admitted.cancel()
