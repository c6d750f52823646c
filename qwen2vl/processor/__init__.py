"""Chat messages to model inputs: media, chat template, tokenizer, placeholder expansion, M-RoPE.

Exports resolve lazily, so the server's settings can name `MediaPolicy` (`fetch.py`, the standard
library only) without importing the image and video code.
"""
from qwen2vl._lazy import lazy_exports

_EXPORTS = {
    "IncrementalDetokenizer": "qwen2vl.processor.tokenizer",
    "MediaBudget": "qwen2vl.processor.budget",
    "MediaPolicy": "qwen2vl.processor.fetch",
    "PreparedPrompt": "qwen2vl.processor.types",
    "Processor": "qwen2vl.processor.processor",
    "Tokenizer": "qwen2vl.processor.tokenizer",
    "VisionItem": "qwen2vl.processor.types",
    "mrope_positions": "qwen2vl.processor.mrope",
    "smart_resize": "qwen2vl.processor.image",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports("qwen2vl.processor", _EXPORTS)
