"""The in-process engine: add requests, step, read outputs.

    engine = LLMEngine.from_pretrained("models/demo")
    [out] = engine.generate(["def main("], SamplingParams(max_tokens=32, temperature=0))
"""
from __future__ import annotations

import itertools
import logging
import sys
from dataclasses import dataclass

import torch

from cluster.config import ModelConfig
from cluster.engine.memory import kv_cache_budget, memory_report
from cluster.engine.params import InvalidRequest, SamplingParams
from cluster.engine.prompts import PromptChecker
from cluster.engine.grammar import Grammars
from cluster.engine.sampling import History, Sampled, sample_row, top_logprobs
from cluster.engine.scheduler import PrefixCaching, Scheduler
from cluster.engine.sequence import Sequence
from cluster.generation_config import GenerationDefaults, read_generation_config
from cluster.expert_load import ExpertLoadTracker
from cluster.loader import load_backbone, load_experts, open_model, stderr_progress
from cluster.model.attention_backend import choose_backend, flashinfer_missing, make_backend
from cluster.model.batch import make_batch
from cluster.model.cuda_graphs import DecodeGraphs, bucket_grid
from cluster.model.cuda_graphs import unsupported as cuda_graphs_unsupported
from cluster.model.experts import ExpertExecutor, LocalExperts
from cluster.model.kv_cache import KVCache
from cluster.model.linear_attention_backend import delta_rule, linear_backend_for
from cluster.model.transformer import MoETransformer
from cluster.model.hyper import model_class
from cluster.precision import resolve_dtype, resolve_kv_dtype
from cluster.tokenizer import TextTokenizer, missing_reason


log = logging.getLogger("cluster.engine")

# Routing of one token: per MoE layer, (layer, expert ids, weights). For generated token i it is
# the routing of the forward pass that produced token i (its input: the previous token).
TokenRouting = tuple[tuple[int, tuple[int, ...], tuple[float, ...]], ...]


@dataclass(frozen=True)
class StepOutput:
    request_id: str
    token_id: int | None  # None only when a prompt is scored with max_tokens 0
    text_delta: str
    sampled: Sampled | None
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" | "error" when done
    routing: TokenRouting | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    expert_tokens: int = 0
    prompt_logprobs: tuple[Sampled | None, ...] | None = None  # on the first output, when asked for
    error: str | None = None  # finish_reason "error": why this sequence failed (the batch went on)
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache (usage.prompt_tokens_details)


@dataclass(frozen=True)
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[Sampled]
    expert_tokens: int
    routing: list[TokenRouting]
    prompt_logprobs: list[Sampled | None] | None = None
    cached_tokens: int = 0


class LLMEngine:
    def __init__(self, cfg: ModelConfig, model: MoETransformer, tokenizer: TextTokenizer | None = None,
                 max_num_seqs: int = 64, max_model_len: int = 1024, max_num_batched_tokens: int = 4096,
                 device: str = "cpu", kv_cache_dtype=None, kv_cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float = 0.9, block_size: int = 16,
                 generation: GenerationDefaults = GenerationDefaults(), no_tokenizer_reason: str | None = None,
                 cuda_graphs: bool | None = None, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, cuda_graph_max_seqs: int | None = None):
        """cuda_graphs: replay decode-only steps from CUDA graphs (None = auto: where the model allows it,
        i.e. on a CUDA device with in-process grouped experts; True where it does not raises). Their
        bucket grid is captured here, up to cuda_graph_max_seqs sequences (None: max_num_seqs; steps with
        more run eagerly) and max_model_len.
        enable_prefix_caching: reuse the KV-cache blocks of prompts that start like earlier ones.
        enable_chunked_prefill: prefill long prompts over several steps, beside the running decodes."""
        self.cfg, self.model, self.tokenizer, self.device = cfg, model, tokenizer, device
        self.max_model_len = max_model_len
        self.dtype = model.weights.embed.dtype
        self.kv_dtype = resolve_kv_dtype(kv_cache_dtype, self.dtype)
        budget = kv_cache_budget(cfg, self.kv_dtype, device, max_num_seqs, max_model_len, kv_cache_memory_bytes,
                                 gpu_memory_utilization, block_size)
        self.cache = KVCache.for_budget(cfg, budget, block_size, self.kv_dtype, device, max_num_seqs)
        if enable_prefix_caching and cfg.hybrid:
            log.info("prefix caching is off for %s: %s", cfg.model_type, PREFIX_CACHING_HYBRID)
            enable_prefix_caching = False
        self.prompts = PromptChecker(cfg, tokenizer, max_model_len, self.cache.capacity_tokens, no_tokenizer_reason)
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens,
                                   prefix_caching_for(cfg, self.kv_dtype) if enable_prefix_caching else None,
                                   enable_chunked_prefill, cfg.rope.length_threshold)
        self.expert_load = ExpertLoadTracker(cfg.moe_layer_ids, cfg.num_experts)
        self.generation = generation
        self.default_sampling = generation.as_dict()  # what a request that gives none of them gets
        self.stop_ids = tuple(dict.fromkeys(cfg.eos_token_ids + generation.eos_token_ids))  # config.json's first
        local = model.experts.experts.values() if isinstance(model.experts, LocalExperts) else ()  # remote: 0 here
        self.memory = memory_report(self.dtype, self.cache, model.weights.nbytes, sum(w.nbytes for w in local))
        use_graphs = cuda_graphs if cuda_graphs is not None else cuda_graphs_unsupported(model) is None
        self.graphs = None
        if use_graphs:
            graph_seqs = min(cuda_graph_max_seqs or max_num_seqs, max_num_seqs)
            self.graphs = DecodeGraphs(model, self.cache, graph_seqs)
            self.graphs.capture_grid(bucket_grid(graph_seqs, max_model_len))
        self._ids = itertools.count()
        self.grammars: Grammars | None = None  # built when the first constrained request comes

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", experts: ExpertExecutor | None = None,
                        max_model_len: int | None = None, show_progress: bool = False, dtype="auto",
                        overlap: bool | None = None, attention_backend: str = "auto",
                        linear_attention_backend: str = "auto", **kwargs) -> "LLMEngine":
        """overlap: run each step as two micro-batches in ping-pong, so remote experts compute one
        while the backbone runs the other (None = auto: on for remote experts on a GPU router, steps of ≥ 2 sequences).
        attention_backend: auto | sdpa | flashinfer (attention_backend.py; auto = FlashInfer on a GPU when
        installed).
        linear_attention_backend: auto | torch | fla, the gated delta rule's kernels (linear_attention_backend.py;
        auto = flash-linear-attention on a GPU when installed).
        kwargs: max_num_seqs, max_num_batched_tokens, kv_cache_dtype (auto = dtype),
        kv_cache_memory_bytes, gpu_memory_utilization, block_size, cuda_graphs, cuda_graph_max_seqs,
        enable_prefix_caching, enable_chunked_prefill."""
        ckpt, family, cfg = open_model(path)
        missing = flashinfer_missing() if attention_backend != "sdpa" and device.startswith("cuda") else None
        backend = choose_backend(attention_backend, device, cfg.attention, missing)  # refused before loading
        linear = linear_backend_for(linear_attention_backend, device, cfg)
        dtype = resolve_dtype(dtype, device, cfg.checkpoint_dtype)
        progress = stderr_progress("loading backbone") if show_progress else None
        backbone = load_backbone(ckpt, family, cfg, dtype=dtype, device=device, progress=progress)
        if experts is None:
            if show_progress:
                print(f"loading {len(cfg.experts())} experts", end="", flush=True, file=sys.stderr)
            experts = LocalExperts.stacked_by_layer(
                cfg.experts(), lambda pairs: load_experts(ckpt, family, cfg, pairs, dtype=dtype, device=device))
            if show_progress:
                print(" done", file=sys.stderr)
        max_len = min(max_model_len or 2048, cfg.context_limit)
        model = model_class(cfg)(cfg, backbone, experts, max_len, device, overlap=overlap,
                                 paged_attention=make_backend(backend, device), delta_rule=delta_rule(linear))
        return cls(cfg, model, TextTokenizer.from_checkpoint(path), max_model_len=max_len, device=device,
                   generation=read_generation_config(path), no_tokenizer_reason=missing_reason(path), **kwargs)

    @property
    def free_seq_slots(self) -> int:
        """Sequences that could still join the batch (what `cache.free_slots` counted before the
        cache was paged); the KV cache's own room is `cache.num_free_blocks`."""
        return self.scheduler.free_seq_slots

    def cache_stats(self) -> dict[str, float]:
        """Prefix caching since start: prompt tokens looked up and found, named blocks now, evictions."""
        p, blocks = self.scheduler.prefix_stats, self.cache.blocks
        return {"prefix_cache_query_tokens": p.query_tokens, "prefix_cache_hit_tokens": p.hit_tokens,
                "prefix_cache_hit_rate": p.hit_rate, "prefix_cached_blocks": blocks.num_cached,
                "prefix_cache_evictions": blocks.num_evictions}

    # -- requests ---------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.prompts.encode(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.prompts.validate(prompt_ids, params)

    def with_defaults(self, params: SamplingParams) -> SamplingParams:
        """The request's sampling with the fields it left as None filled from generation_config.json."""
        g = self.generation
        return params.with_defaults(g.temperature, g.top_p, g.top_k)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request: encoded and checked here (the in-process entry: offline `generate`, tests)."""
        prompt_ids = self.encode(prompt)
        self.validate(prompt_ids, params)
        return self.add_checked(prompt_ids, params, request_id)

    def add_checked(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request whose ids `validate` already passed (AsyncEngine checks on its event loop,
        before the request reaches this thread: cluster/engine/prompts.py says which check is where)."""
        request_id = request_id or f"req-{next(self._ids)}"
        seq = Sequence(request_id, prompt_ids, self.with_defaults(params))
        if params.grammar is not None:  # compiled here, on the engine's thread (cached by spec)
            seq.matcher = self._grammars().matcher(params.grammar)
            seq.in_reasoning = bool(params.grammar.reasoning_end)  # the reply starts inside a reasoning block
        self.scheduler.add(seq)
        return request_id

    def _grammars(self) -> Grammars:
        if self.tokenizer is None:
            raise InvalidRequest("response_format: constrained decoding needs the checkpoint's tokenizer.json",
                                 "response_format")
        if self.grammars is None:
            self.grammars = Grammars(self.tokenizer, self.cfg.vocab_size, self.stop_ids)
        return self.grammars

    def abort(self, request_id: str) -> bool:
        """Drop a request (e.g. its client went away); its KV-cache blocks are freed at once."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return False
        seq.finish_reason = "abort"
        self.scheduler.finish(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- stepping ---------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        seqs = self.scheduler.schedule()
        if not seqs:
            return []
        items = [(s.blocks, *s.next_input()) for s in seqs]
        slots = [s.state_slot for s in seqs] if self.cache.states is not None else None
        batch = make_batch(items, self.cache.block_size, self.device, slots)
        rows, prompt_rows = _logit_rows(batch, seqs)
        logits, routing = self._forward(batch, rows)  # [B + P, V]
        self.expert_load.record(routing)  # computed rows only: cached prefix tokens are no expert load
        for seq, chunk in zip(seqs, batch.chunks):
            self.scheduler.computed(seq, chunk.num_tokens)
        moe_rows = len(routing) * self.cfg.top_k
        # rows that sample under a grammar this step (a prompt chunk samples nothing: no bitmask to fill; a
        # reply still in its reasoning block is free until the block's end marker)
        constrained = [(i, s.matcher) for i, s in enumerate(seqs) if s.constrained and not s.is_prefilling]
        if constrained:  # one bitmask (on host logits) for the constrained rows; the others are not touched
            logits = logits.float().cpu()
            self.grammars.mask(logits, constrained)
        argmax = logits[:len(seqs)].argmax(-1).tolist()  # on the device, B ints to the host: most requests are greedy
        # the [B + P, V] logits cross to the host only when a sequence reads more than its argmax (39 MB per
        # step at B=64 and Qwen's 151,936 tokens)
        logits = logits.float().cpu() if constrained or any(_reads_logits(s) for s in seqs) else None
        if any(s.params.return_routing for s in seqs):  # once per step, not per sequence and layer
            routing = _host_routing(routing, batch)
        outputs = []
        for i, seq in enumerate(seqs):
            seq.expert_tokens += batch.chunks[i].num_tokens * moe_rows
            if seq.is_prefilling:  # a chunk of its prompt: nothing to sample yet
                continue
            try:
                outputs.append(self._next(seq, i, logits, argmax[i], prompt_rows, routing, batch))
            except Exception as e:  # noqa: BLE001 - one sequence's failure must not touch the others
                outputs.append(self._fail(seq, e))
        return outputs

    def _forward(self, batch, rows):
        out = self.graphs.run(batch, rows) if self.graphs is not None else None
        return out if out is not None else self.model.forward(batch, self.cache, rows=rows)

    def _next(self, seq: Sequence, i: int, logits, argmax: int, prompt_rows, routing, batch) -> StepOutput:
        scored = None
        if seq.wants_prompt_logprobs:
            seq.prompt_logprobs = _prompt_logprobs(seq, logits, prompt_rows[i])
            scored = tuple(seq.prompt_logprobs)
        if seq.params.max_tokens == 0:  # scoring only: nothing to sample
            seq.finish_reason = "length"
            self.scheduler.finish(seq)
            return StepOutput(seq.request_id, None, "", None, "length", None, len(seq.prompt_ids), 0,
                              seq.expert_tokens, scored, cached_tokens=seq.num_cached)
        history = History(seq.prompt_ids, seq.output_ids, self._banned_early(seq.params))
        sampled = sample_row(None if logits is None else logits[i], seq.params, seq.generator, argmax, history)
        row_routing = routing[i] if seq.params.return_routing else None
        return self._advance(seq, sampled, row_routing, scored)

    def _banned_early(self, params: SamplingParams) -> tuple[int, ...]:
        return (() if params.ignore_eos else self.stop_ids) + params.stop_token_ids

    def _fail(self, seq: Sequence, error: Exception) -> StepOutput:
        seq.finish_reason, seq.error = "error", f"{type(error).__name__}: {error}"[:500]
        self.scheduler.finish(seq)
        return StepOutput(seq.request_id, None, "", None, "error", prompt_tokens=len(seq.prompt_ids),
                          completion_tokens=len(seq.output_ids), expert_tokens=seq.expert_tokens, error=seq.error)

    def _advance(self, seq: Sequence, sampled: Sampled, routing: TokenRouting | None,
                 scored: tuple | None = None) -> StepOutput:
        seq.output_ids.append(sampled.token_id)
        seq.advance_grammar(sampled.token_id)
        if seq.params.logprobs is not None:
            seq.logprobs.append(sampled)
        if routing is not None:
            seq.routing.append(routing)
        seq.finish_reason = self._finish_reason(seq, sampled.token_id)
        if seq.finish_reason:
            self.scheduler.finish(seq)
        return StepOutput(seq.request_id, sampled.token_id, _text_delta(seq), sampled, seq.finish_reason,
                          routing, len(seq.prompt_ids), len(seq.output_ids), seq.expert_tokens, scored,
                          cached_tokens=seq.num_cached)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if (token in self.stop_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_ids)
            cut = min((i for i in (seq.text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                seq.text = seq.text[:cut]
                return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    # -- convenience ------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        seqs = {rid: self.scheduler.find(rid) for rid in ids}
        while self.has_unfinished():
            self.step()
        return [self._completion(seqs[rid]) for rid in ids]

    @staticmethod
    def _completion(seq: Sequence) -> Completion:
        if seq.error:
            raise RuntimeError(f"request {seq.request_id} failed: {seq.error}")
        return Completion(seq.request_id, seq.prompt_ids, seq.output_ids, seq.text, seq.finish_reason,
                          seq.logprobs, seq.expert_tokens, seq.routing,
                          seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None,
                          seq.num_cached)


# Why a hybrid model's prompts are always computed whole.
PREFIX_CACHING_HYBRID = ("its linear-attention layers keep one recurrent state per sequence, not one entry per "
                         "token: a cached prefix's KV blocks would not bring the state at the prefix's end, so the "
                         "rest of the prompt would be computed from a wrong (zero) state")


def prefix_caching_for(cfg: ModelConfig, kv_dtype: torch.dtype) -> PrefixCaching:
    """What names this engine's cached blocks beyond their tokens. Every attention kind is cached:
    the paged cache keeps every position's keys (sliding windows and sinks only mask at attention
    time) and MLA's latent is as reusable as plain keys; length-dependent RoPE caps it."""
    extra = f"{cfg.model_type}|{cfg.num_layers}|{cfg.hidden_size}|{cfg.quantization}|{kv_dtype}".encode()
    return PrefixCaching(extra, cfg.rope.length_threshold)


def _text_delta(seq: Sequence) -> str:
    """New text safe to hand out: a streamed prefix must never be taken back.

    Until the request ends, hold back what could still become a stop string
    (its length - 1 characters) and a trailing partial UTF-8 character.
    """
    ready = seq.text
    if not seq.finish_reason:
        hold = max((len(s) for s in seq.params.stop), default=1) - 1
        ready = ready[: len(ready) - hold] if hold else ready
        ready = ready.rstrip("\ufffd")
    delta = ready[seq.sent_chars:]
    seq.sent_chars = max(seq.sent_chars, len(ready))
    return delta


def _reads_logits(seq: Sequence) -> bool:
    """Whether this step's token (or scores) of `seq` need its logits, not only their argmax."""
    p = seq.params
    return not p.greedy or p.shapes_logits or p.logprobs is not None or seq.wants_prompt_logprobs


def _host_routing(routing, batch) -> list[TokenRouting]:
    """Each sequence's routing at its last row (the token it samples), read to the host in one copy per layer."""
    rows = batch.last_rows
    layers = [(r.layer, r.ids.index_select(0, rows).tolist(), r.weights.index_select(0, rows).tolist())
              for r in routing]
    return [tuple((layer, tuple(ids[i]), tuple(ws[i])) for layer, ids, ws in layers) for i in range(rows.shape[0])]


def _logit_rows(batch, seqs: list[Sequence]):
    """Rows that need logits: each chunk's last token, then every prompt row of a sequence whose
    prompt is scored (row r predicts token r + 1). Returns (rows [B + P], per-sequence (offset, count))."""
    extra, spans, offset = [], [], len(seqs)
    for chunk, seq in zip(batch.chunks, seqs):
        n = chunk.num_tokens - 1 if seq.wants_prompt_logprobs else 0
        extra.extend(range(chunk.start, chunk.start + n))
        spans.append((offset, n))
        offset += n
    if not extra:
        return None, spans
    return torch.cat([batch.last_rows, torch.tensor(extra, dtype=torch.long, device=batch.last_rows.device)]), spans


def _prompt_logprobs(seq: Sequence, logits, span: tuple[int, int]) -> list[Sampled | None]:
    """The first prompt token has no logprob (nothing predicts it); token r + 1 is scored by row r."""
    offset, n = span
    logp = torch.log_softmax(logits[offset:offset + n], -1)  # [n, V]
    out: list[Sampled | None] = [None]
    for r, token in enumerate(seq.prompt_ids[1:n + 1]):
        out.append(Sampled(token, float(logp[r, token]), top_logprobs(logp[r], seq.params.prompt_logprobs)))
    return out
