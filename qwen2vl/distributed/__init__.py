"""Batch inference over a Ray cluster (`qwen2vl generate --ray`; docs/distributed.md).

Needs the `ray` extra (`pip install 'qwen2vl[ray]'`). Exports resolve lazily: importing this
package does not import ray, and only `ray_batch` does.
"""
from __future__ import annotations

from qwen2vl._lazy import lazy_exports

_EXPORTS = {
    "generate_dataset": "qwen2vl.distributed.ray_batch",
    "read_dataset": "qwen2vl.distributed.ray_batch",
    "run_job": "qwen2vl.distributed.ray_batch",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports("qwen2vl.distributed", _EXPORTS)
