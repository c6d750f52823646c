"""Continuous batching over a paged KV cache: sequences, scheduler, model runner, engine."""
from qwen2vl.engine.llm_engine import LLMEngine
from qwen2vl.engine.sequence import RequestOutput, Sequence, SequenceStatus

__all__ = ["LLMEngine", "RequestOutput", "Sequence", "SequenceStatus"]
