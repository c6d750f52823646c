"""OpenAI-compatible HTTP server (`qwen2vl serve`): FastAPI app (`app.py`; its request flow is
described there), request and reply models, limits, media safety, metrics.

Needs the `server` extra (fastapi, uvicorn, pydantic). Exports resolve lazily, so the CLI can read
the limits' defaults without importing the web stack.
"""
from __future__ import annotations

from qwen2vl._lazy import lazy_exports

_EXPORTS = {
    "create_app": "qwen2vl.server.app",
    "serve": "qwen2vl.server.app",
    "ServerLimits": "qwen2vl.server.limits",
    "MediaPolicy": "qwen2vl.processor.fetch",  # `media=`: where images and videos may come from
    "MediaAccess": "qwen2vl.server.limits",  # a MediaPolicy under the server's earlier keyword names
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports("qwen2vl.server", _EXPORTS)
