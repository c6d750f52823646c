"""OpenAI-compatible HTTP server (`qwen2vl serve`): FastAPI app, schemas, limits, media safety, metrics.

Needs the `server` extra (fastapi, uvicorn, pydantic). Exports resolve lazily, so the CLI can read
the limits' defaults without importing the web stack.
"""
from __future__ import annotations

_EXPORTS = {
    "create_app": "qwen2vl.server.app",
    "serve": "qwen2vl.server.app",
    "ServerLimits": "qwen2vl.server.limits",
    "MediaAccess": "qwen2vl.server.limits",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qwen2vl.server' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
