"""Find a checkpoint directory for a user's model argument: a local path or a hub id."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError

# What runs when no model is named: the card's checkpoint if the Hugging Face cache holds it,
# else the tiny demo model committed with the source (trained by scripts/train_demo.py).
DEFAULT_REPO_ID = "Qwen/Qwen2-VL-2B-Instruct-AWQ"
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "qwen2-vl-shapes-demo"


def _cached_snapshot(repo_id: str) -> Path | None:
    """The newest complete snapshot of `repo_id` in the Hugging Face cache, if any."""
    hub_cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    snapshots = Path(hub_cache) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    candidates = [s for s in snapshots.glob("*") if (s / "config.json").is_file()]
    return max(candidates, key=lambda s: s.stat().st_mtime) if candidates else None


def default_model_dir() -> Path:
    """The checkpoint used when none is given (see DEFAULT_REPO_ID / DEMO_MODEL_DIR)."""
    cached = _cached_snapshot(DEFAULT_REPO_ID)
    if cached is not None:
        return cached
    if (DEMO_MODEL_DIR / "config.json").is_file():
        return DEMO_MODEL_DIR
    raise CheckpointError(f"no model given, {DEFAULT_REPO_ID} is not in the Hugging Face cache and the demo "
                          f"model ({DEMO_MODEL_DIR}) is not there (it ships with a source checkout): name a model")


def resolve_model_dir(model: str | os.PathLike | None = None) -> Path:
    """A local checkpoint directory for `model`.

    `model` is a directory holding config.json, or a hub id such as
    `Qwen/Qwen2-VL-2B-Instruct-AWQ`: taken from the local Hugging Face cache if present, else
    downloaded with `huggingface_hub` when it is installed and the machine is online. None: the
    default model (`default_model_dir`).
    """
    if model is None:
        return default_model_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is a directory but holds no config.json: not a checkpoint")
        return path
    repo_id = str(model)
    if path.exists() or repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise CheckpointError(f"model {repo_id!r}: no such checkpoint directory")
    cached = _cached_snapshot(repo_id)
    if cached is not None:
        return cached
    how = (
        f"download it elsewhere (e.g. `huggingface-cli download {repo_id} --local-dir DIR`), "
        "copy the directory here and pass its path: --model DIR / Qwen2VL.from_pretrained('DIR')"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"model {repo_id!r} is not a local directory and huggingface_hub is not installed; "
            f"`pip install huggingface_hub`, or {how}"
        ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
    except Exception as exc:  # offline, unknown repo, gated: all end the same way for the user
        raise CheckpointError(f"could not download {repo_id!r} ({type(exc).__name__}: {exc}); {how}") from None
