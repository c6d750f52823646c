"""Find a checkpoint directory for a user's model argument: a local path or a hub id."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import CheckpointError

logger = logging.getLogger("qwen2vl")

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
        f"download it elsewhere (e.g. `{hub_cli()} download {repo_id} --local-dir DIR`), "
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


def hub_cli() -> str:
    """The Hugging Face command line that the installed huggingface_hub ships: `hf` (since 0.34,
    and what `pip install huggingface_hub` brings), else the older `huggingface-cli`."""
    from importlib import metadata

    try:
        scripts = {entry.name for entry in metadata.distribution("huggingface_hub").entry_points}
    except metadata.PackageNotFoundError:
        return "hf"
    return "huggingface-cli" if "huggingface-cli" in scripts and "hf" not in scripts else "hf"


def model_id(model: str | os.PathLike | None, model_dir: Path | None) -> str:
    """The short name of `model` (as given; None: the default), which resolved to `model_dir`
    (None: not resolved here): a hub id as given, a directory's folder name (the repo id for a
    snapshot in the Hugging Face cache), and for the default the card's repo id or the demo
    model's folder name."""
    if model is not None and (model_dir is None or not Path(model).expanduser().is_dir()):
        return str(model)
    folder = model_dir.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.removeprefix("models--").replace("--", "/", 1)
    return folder.name


def model_notice(model: str | os.PathLike | None, model_dir: Path | None) -> tuple[int, str]:
    """The log level and line that say which checkpoint loads for `model` (None: the default),
    found at `model_dir` (None: not looked up here): a warning when that is the bundled demo
    model, which knows only synthetic shapes, saying how to pick a real one."""
    name = model_id(model, model_dir)
    where = name if model_dir is None else f"{name} ({model_dir})"
    if model is not None:
        return logging.INFO, f"loading {model_dir if model_dir and Path(model).expanduser().is_dir() else where}"
    if model_dir.resolve() == DEMO_MODEL_DIR.resolve():
        return logging.WARNING, (
            f"no model given: loading the bundled demo model {where}, a tiny model trained only on synthetic "
            f"shapes that cannot describe real images; pick a real one with --model {DEFAULT_REPO_ID} or "
            f"--model DIR (Python: Qwen2VL.from_pretrained('{DEFAULT_REPO_ID}'))")
    return logging.INFO, f"no model given: loading {where}; --model picks another"


def announce_model(model: str | os.PathLike | None, model_dir: Path | None) -> None:
    """Log `model_notice` on the `qwen2vl` logger (the CLI prints its records on stderr)."""
    logger.log(*model_notice(model, model_dir))
