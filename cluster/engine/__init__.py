"""In-process engine: continuous batching, KV cache, sampling."""
from cluster.engine.engine import Completion, LLMEngine, StepOutput
from cluster.engine.params import InvalidRequest, SamplingParams

__all__ = ["Completion", "InvalidRequest", "LLMEngine", "SamplingParams", "StepOutput"]
