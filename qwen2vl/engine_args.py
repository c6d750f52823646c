"""How to load a checkpoint and size its engine: one object, checked once where it is made.

`Qwen2VL.from_pretrained(model, **fields)` builds it from keywords, the CLI from its model flags
(each field's `flag` below; `qwen2vl.cli` derives them), and `LLMEngine` reads the engine's part.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from qwen2vl.errors import InputError


def _option(default=None, help: str = "", flag: bool = True, positive: bool = False):
    """A field; `flag`: the CLI offers it (`--name-with-dashes`); `positive`: an integer >= 1 when set."""
    return field(default=default, metadata={"help": help, "flag": flag, "positive": positive})


@dataclass(frozen=True)
class EngineArgs:
    model: str | os.PathLike | None = _option(
        help="checkpoint directory, or a hub id such as Qwen/Qwen2-VL-2B-Instruct-AWQ (default: that one if in "
             "the Hugging Face cache, else the bundled demo model)")
    device: str = _option("auto", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    dtype: str = _option("auto", help="auto, bf16, fp16 or fp32 (auto: bf16 on GPU; on CPU bf16 with the int4 "
                                      "kernel for 4-bit checkpoints, else fp32)")
    min_pixels: int | None = _option(help="smallest image area after resizing (pixels)", positive=True)
    max_pixels: int | None = _option(help="largest image area after resizing (pixels); fewer = faster", positive=True)
    int8_vocab: bool = _option(True, help="keep a 4-bit checkpoint's vocabulary table in bf16 (default: int8 rows)")
    max_model_len: int | None = _option(help="longest prompt + answer in tokens", positive=True)
    max_num_seqs: int = _option(64, help="most requests generating at once", positive=True)
    max_num_batched_tokens: int = _option(2048, help="most new tokens in one step (longer prompts are prefilled in "
                                                     "chunks)", positive=True)
    max_vision_tokens_per_step: int | None = _option(flag=False, positive=True)
    block_size: int = _option(16, flag=False, positive=True)
    num_kv_blocks: int | None = _option(flag=False, positive=True)
    kv_cache_memory: int | None = _option(help="bytes of KV cache (default: most of the free GPU memory; on CPU "
                                               "room for a few sequences of max_model_len, at most 1 GiB)",
                                          positive=True)
    prefix_caching: bool = _option(True, help="recompute every prompt from its start (default: reuse the KV "
                                              "blocks of earlier requests' matching prefixes)")
    vision_cache_bytes: int | None = _option(help="bytes of image/video encodings kept for reuse (default: 256 MiB "
                                                  "on CPU, 1 GiB on GPU; 0: off)")
    grammar_cache_bytes: int | None = _option(help="bytes of compiled structured-output constraints kept for reuse, "
                                                   "estimated from their text (default: 256 MiB; 0: off)")
    cuda_graphs: bool | None = _option(flag=False)
    run_ahead: bool | None = _option(flag=False)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["positive"] and value is not None and not (
                    isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise InputError(f"{f.name}={value!r} is invalid: expected an integer >= 1", field=f.name)
        for name in ("vision_cache_bytes", "grammar_cache_bytes"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise InputError(f"{name}={value!r} is invalid: expected an integer >= 0", field=name)
        for name in ("int8_vocab", "prefix_caching", "cuda_graphs", "run_ahead"):
            if getattr(self, name) not in (True, False, None) or (name in ("int8_vocab", "prefix_caching")
                                                                   and getattr(self, name) is None):
                raise InputError(f"{name}={getattr(self, name)!r} is invalid: expected True or False", field=name)

    @classmethod
    def from_keywords(cls, **fields) -> EngineArgs:
        """`EngineArgs(**fields)`, with an unknown name an `InputError` that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise InputError(f"unknown engine argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**fields)
