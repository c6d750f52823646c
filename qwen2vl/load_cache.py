"""A cache of what loading computes beyond reading a checkpoint: the 4-bit linears repacked for
their kernel (`Int4Linear`'s layout), the vocabulary table quantized to int8 rows
(`Int8VocabTable`) and the tensors read into another dtype than stored (an AWQ checkpoint's
float16 vision tower, loaded in bfloat16). Computing them is most of a 4-bit checkpoint's load on
the CPU; a later load reads them straight into the final tensors (the 2B AWQ model on a shared
2-core machine: ~1-1.5 s warm against 12-36 s cold; benchmarks/load.py), and reads from the
checkpoint only what it uses as stored. An entry is about the size of the loaded weights.

One file per checkpoint directory and load settings, `<dir>/load/<key>.safetensors` (a
safetensors file: the tensors, and in its metadata the checkpoint's identity and each module's
backend), where `<dir>` is `$QWEN2VL_CACHE_DIR`, else `$XDG_CACHE_HOME/qwen2vl`, else
`~/.cache/qwen2vl`. `$QWEN2VL_LOAD_CACHE=0` turns the cache off (`load_model(cache=False)`
too; `cache=DIR` uses DIR). The identity is a digest of the checkpoint's config.json and
safetensors files (names, sizes, modification times and inodes; small files by content) and of
what decides the layout (our `FORMAT_VERSION`, torch's version, the CPU's vector extension, which
picks the int4 CPU layout, the device, dtype and kernels): an entry that does not match, is
truncated or unreadable is ignored and written again, never an error. Entries are written to a
temporary file and renamed into place, so a reader never sees half of one. A flipped bit inside
a tensor's bytes is not detected (hashing them would cost about as much as reading them).

Bump `FORMAT_VERSION` whenever a cached layout or the code that computes it changes.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT_VERSION = 1
SWITCH_ENV = "QWEN2VL_LOAD_CACHE"
DIR_ENV = "QWEN2VL_CACHE_DIR"
_OFF = ("0", "off", "false", "no")
_CONTENT_HASH_MAX_BYTES = 64 * 1024**2  # files up to this size are identified by their content
_METADATA_KEY = "qwen2vl_load_cache"
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
           torch.int64: "I64", torch.int8: "I8", torch.uint8: "U8"}
_DTYPE_OF_NAME = {name: dtype for dtype, name in _DTYPES.items()}

# What a cached load restores: module name -> (its kind's settings, its tensors by name).
Layout = dict[str, tuple[dict, dict[str, torch.Tensor]]]


def cache_dir(cache: bool | str | os.PathLike | None = None) -> Path | None:
    """Where entries go for `load_model`'s `cache`: False none, a path that folder, True the
    default folder, None the default unless `$QWEN2VL_LOAD_CACHE` is 0/off/false/no."""
    if cache is False:
        return None
    if cache is not None and cache is not True:
        return Path(cache)
    if cache is None and os.environ.get(SWITCH_ENV, "").strip().lower() in _OFF:
        return None
    root = os.environ.get(DIR_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen2vl"
    return Path(root) / "load"


def layout_settings(device: torch.device, dtypes: tuple[torch.dtype, ...], int4_kernel: bool | str,
                    int8_vocab: bool) -> dict:
    """Everything besides the checkpoint that decides what the cached tensors hold (`dtypes`: the
    text decoder's and the vision tower's)."""
    return {"format": FORMAT_VERSION, "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "device": device.type, "dtypes": [str(dtype) for dtype in dtypes], "int4_kernel": int4_kernel,
            "int8_vocab": int8_vocab}


@dataclass
class Entry:
    """The cache file of one checkpoint directory under one set of load settings."""

    path: Path
    identity: str

    @classmethod
    def find(cls, directory: Path, model_dir: Path, files: list[Path], settings: dict) -> "Entry":
        """The entry of `model_dir` (whose checkpoint is `files`) loaded with `settings`."""
        name = _digest(json.dumps([str(model_dir.resolve()), settings], sort_keys=True).encode())
        identity = _digest(json.dumps([_file_identity(f) for f in files] + [settings], sort_keys=True).encode())
        return cls(Path(directory) / f"{name[:32]}.safetensors", identity)

    def read(self) -> Layout | None:
        """The cached layout, or None where there is none, or it is stale or unreadable."""
        if not self.path.is_file():
            return None
        try:
            return self._read()
        except (OSError, ValueError, KeyError, TypeError, struct.error, RuntimeError) as e:
            print(f"qwen2vl: ignoring the unreadable load cache entry {self.path} ({e}); writing it again",
                  file=sys.stderr)
            return None

    def _read(self) -> Layout | None:
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("its header is longer than the file")
            header = json.loads(f.read(header_len))
            manifest = json.loads(header.pop("__metadata__")[_METADATA_KEY])
            if manifest["identity"] != self.identity:
                return None  # the checkpoint or the settings changed: stale
            data_start = 8 + header_len
            if size != data_start + manifest["data_bytes"]:
                raise ValueError("its size does not match its header")
            layout = {}
            position = 0
            for key, entry in header.items():  # written in data order
                begin, end = entry["data_offsets"]
                dtype = _DTYPE_OF_NAME[entry["dtype"]]
                tensor = torch.empty(entry["shape"], dtype=dtype)
                if begin != position or end - begin != tensor.numel() * dtype.itemsize:
                    raise ValueError(f"tensor {key}: offsets {begin}..{end} do not fit its shape")
                if f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - begin:
                    raise ValueError(f"tensor {key}: truncated")
                module, _, name = key.rpartition(".")
                layout.setdefault(module, (manifest["modules"][module], {}))[1][name] = tensor
                position = end
        return layout

    def write(self, layout: Layout) -> int | None:
        """Write `layout` (atomically: a temporary file renamed into place); its byte count, or
        None where it could not be written (said on stderr, the load goes on)."""
        header, data_bytes = {}, 0
        for module, (_, tensors) in layout.items():
            for name, tensor in tensors.items():
                size = tensor.numel() * tensor.element_size()
                header[f"{module}.{name}"] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                                              "data_offsets": [data_bytes, data_bytes + size]}
                data_bytes += size
        manifest = {"identity": self.identity, "data_bytes": data_bytes,
                    "modules": {module: settings for module, (settings, _) in layout.items()}}
        header["__metadata__"] = {_METADATA_KEY: json.dumps(manifest)}
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
        temp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=self.path.stem, suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(struct.pack("<Q", len(encoded)) + encoded)
                for _, tensors in layout.values():
                    for tensor in tensors.values():
                        f.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
            os.chmod(temp, 0o644)
            os.replace(temp, self.path)
        except OSError as e:
            print(f"qwen2vl: could not write the load cache entry {self.path} ({e}); the next load repacks again",
                  file=sys.stderr)
            if temp is not None and os.path.exists(temp):
                os.unlink(temp)
            return None
        return 8 + len(encoded) + data_bytes


def _file_identity(path: Path) -> list:
    stat = path.stat()
    if stat.st_size <= _CONTENT_HASH_MAX_BYTES:
        return [path.name, _digest(path.read_bytes())]
    return [path.name, stat.st_size, stat.st_mtime_ns, stat.st_ino]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
