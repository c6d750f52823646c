"""qwen2vl: an inference engine for Qwen2-VL vision-language models."""
from __future__ import annotations

__version__ = "0.1.0"

# Exports resolve lazily, so `import qwen2vl` stays cheap and each part imports only what it needs.
_EXPORTS = {
    "Processor": "qwen2vl.processor",
    "Qwen2VL": "qwen2vl.api",
    "Completion": "qwen2vl.api",
    "SamplingParams": "qwen2vl.sampling_params",
    "InputError": "qwen2vl.errors",
    "MediaError": "qwen2vl.errors",
    "CheckpointError": "qwen2vl.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qwen2vl' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
