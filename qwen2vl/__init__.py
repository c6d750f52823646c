"""qwen2vl: an inference engine for Qwen2-VL vision-language models."""
from __future__ import annotations

from qwen2vl._lazy import lazy_exports

__version__ = "0.1.0"

# Exports resolve lazily, so `import qwen2vl` stays cheap and each part imports only what it needs.
_EXPORTS = {
    "Processor": "qwen2vl.processor",
    "Qwen2VL": "qwen2vl.api",
    "Completion": "qwen2vl.api",
    "answer_rows": "qwen2vl.batch_job",
    "SamplingParams": "qwen2vl.sampling_params",
    "EngineArgs": "qwen2vl.engine_args",
    "Qwen2VLError": "qwen2vl.errors",
    "InputError": "qwen2vl.errors",
    "MediaError": "qwen2vl.errors",
    "CheckpointError": "qwen2vl.errors",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports("qwen2vl", _EXPORTS)
