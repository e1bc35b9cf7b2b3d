"""Shared test helpers: our model driven step by step, and transformers as the reference."""
from __future__ import annotations

import torch

from cluster.engine import LLMEngine
from cluster.model.batch import make_batch
from cluster.model.kv_cache import KVCache


def our_greedy_logits(engine: LLMEngine, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding through the engine's model and KV cache, keeping every step's logits."""
    cfg = engine.cfg
    cache = KVCache(cfg.num_layers, 1, len(prompt) + steps + 1, cfg.num_kv_heads, cfg.head_dim, device=engine.device)
    tokens, logits_per_step, new, pos = [], [], list(prompt), 0
    for _ in range(steps):
        logits, _ = engine.model.forward(make_batch([(0, new, pos)], engine.device), cache)
        pos += len(new)
        logits_per_step.append(logits[0].cpu())
        tokens.append(int(logits[0].argmax()))
        new = [tokens[-1]]
    return tokens, logits_per_step


def hf_greedy_logits(hf_model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                            output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), [step[0].float() for step in out.logits]


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
