"""How many bytes the KV cache gets, and the start-up memory report.

The cache takes what max_num_seqs sequences of max_model_len tokens need, but
never below one full-length sequence (whole blocks: a cache that cannot hold one
would refuse every request that leaves max_tokens out, as it is filled up to max_model_len); on a CPU that is capped at
CPU_KV_CAP_BYTES, on a GPU at what is left of `gpu_memory_utilization` of the
device after the weights are loaded (as vLLM does). Memory PyTorch's caching
allocator holds but no tensor uses counts as free there: mem_get_info reports it
as used, which would leave a second engine in the process nothing.
An explicit kv_cache_memory_bytes wins.
"""
from __future__ import annotations

import logging

import torch

from cluster.config import ModelConfig
from cluster.model.kv_cache import KVCache, budget_layout, kv_bytes_per_token
from cluster.model.state_cache import state_bytes_per_seq
from cluster.precision import dtype_name

CPU_KV_CAP_BYTES = 4 << 30
log = logging.getLogger("cluster.engine")


def one_sequence_bytes(cfg: ModelConfig, kv_dtype: torch.dtype, max_model_len: int, block_size: int = 16) -> int:
    """Cache bytes one sequence of max_model_len tokens takes: its blocks, and a hybrid model's recurrent state."""
    blocks = -(-max_model_len // block_size)
    return blocks * block_size * kv_bytes_per_token(cfg, kv_dtype) + state_bytes_per_seq(cfg, kv_dtype)


def full_length_refusal(cfg: ModelConfig, kv_dtype: torch.dtype, memory_bytes: int, max_model_len: int,
                        block_size: int = 16, max_num_seqs: int = 1) -> str | None:
    """Why an explicit KV budget cannot serve (None: it holds one sequence of max_model_len), naming both
    ways out, as vLLM refuses to start on it."""
    try:
        blocks, _ = budget_layout(cfg, memory_bytes, block_size, kv_dtype, max_num_seqs)
    except ValueError:
        blocks = 0
    fits = blocks * block_size
    if fits >= max_model_len:
        return None
    # a hybrid model's state slots come first, one per sequence (budget_layout): the others' too
    need = one_sequence_bytes(cfg, kv_dtype, max_model_len, block_size) + (max_num_seqs - 1) * state_bytes_per_seq(
        cfg, kv_dtype)
    return (f"kv_cache_memory_bytes={memory_bytes} holds {fits} tokens of this model's KV cache "
            f"({dtype_name(kv_dtype)}), less than one sequence of max_model_len={max_model_len}: "
            f"raise kv_cache_memory_bytes to at least {need}" + (f" or lower max_model_len to at most {fits}"
                                                                 if fits >= 8 else ""))  # max_model_len's floor


def kv_cache_budget(cfg: ModelConfig, kv_dtype: torch.dtype, device: str, max_num_seqs: int, max_model_len: int,
                    memory_bytes: int | None = None, gpu_memory_utilization: float = 0.9, block_size: int = 16) -> int:
    if memory_bytes is not None:  # as given (tests size tiny caches); the served path checks it (full_length_refusal)
        return int(memory_bytes)
    one_seq = one_sequence_bytes(cfg, kv_dtype, max_model_len, block_size)
    needed = max_num_seqs * one_seq
    if not str(device).startswith("cuda"):
        return max(min(needed, CPU_KV_CAP_BYTES), one_seq)
    free = gpu_free_bytes(device, gpu_memory_utilization)
    if free < one_seq:
        raise ValueError(f"KV cache: {free} bytes of {device} are left within gpu_memory_utilization="
                         f"{gpu_memory_utilization}, less than one sequence of max_model_len={max_model_len} "
                         f"({one_seq} bytes); raise gpu_memory_utilization or set kv_cache_memory_bytes")
    return min(needed, free)


def gpu_free_bytes(device: str, gpu_memory_utilization: float) -> int:
    """Bytes of the GPU this engine may still take, within gpu_memory_utilization of the device."""
    dev = torch.device(device)
    free, total = torch.cuda.mem_get_info(dev)
    cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return max(0, int(free + cached - (1 - gpu_memory_utilization) * total))


def memory_report(dtype: torch.dtype, cache: KVCache, backbone_bytes: int, expert_bytes: int) -> dict:
    """Bytes of weights and KV cache this process holds; logged at start-up, kept as engine.memory."""
    report = {"dtype": dtype_name(dtype), "kv_cache_dtype": dtype_name(cache.k.dtype),
              "weights_bytes": backbone_bytes + expert_bytes, "backbone_bytes": backbone_bytes,
              "local_expert_bytes": expert_bytes, "kv_cache_bytes": cache.nbytes,
              "kv_cache_tokens": cache.capacity_tokens, "kv_bytes_per_token": cache.bytes_per_token,
              "kv_block_size": cache.block_size, "kv_blocks": cache.num_blocks,
              "state_bytes_per_seq": cache.states.bytes_per_seq if cache.states is not None else 0,
              "state_slots": cache.states.num_slots if cache.states is not None else 0}
    log.info("weights %.3f GiB (%s; backbone %.3f GiB, local experts %.3f GiB), KV cache %.3f GiB (%s): "
             "%d tokens in %d blocks of %d", report["weights_bytes"] / 2**30, report["dtype"], backbone_bytes / 2**30,
             expert_bytes / 2**30, cache.nbytes / 2**30, report["kv_cache_dtype"], cache.capacity_tokens,
             cache.num_blocks, cache.block_size)
    return report
