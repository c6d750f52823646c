"""The load cache (`qwen2vl.load_cache`): a cached load gives the same tensors and tokens as an
uncached one, never packs again, and a changed checkpoint, a damaged entry or the cache turned off
never gives a wrong model."""
from __future__ import annotations

import shutil

import pytest
import torch

from checkpoints import reference_config
from qwen2vl import kernels, load_cache, loader
from qwen2vl.kernels import int4_cpu
from qwen2vl.layers.linear import GPTQLinear, Int4Linear, Linear
from qwen2vl.layers.vocab import Int8VocabTable
from qwen2vl.loader import load_model
from qwen2vl.tools.random_checkpoint import write_random_checkpoint
from test_cpu_int4 import greedy_ids
from test_kernels_int4 import gptq_linear

pytestmark = pytest.mark.skipif(not int4_cpu.available(), reason="this torch has no CPU int4 kernel")


def write_awq(out_dir, seed: int = 0):
    return write_random_checkpoint(reference_config("a").to_dict(), out_dir, quant="awq", group_size=32, seed=seed)


@pytest.fixture(scope="module")
def awq_ckpt(tmp_path_factory):
    return write_awq(tmp_path_factory.mktemp("awq"))


def entries(cache_dir) -> list:
    return sorted(cache_dir.glob("*")) if cache_dir.exists() else []


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key].view(torch.uint8), sb[key].view(torch.uint8)), key  # bitwise


def refuse_repacking(monkeypatch) -> None:
    """A load that computes a layout again, or reads a tensor from the checkpoint into another
    dtype than stored, fails: what follows must come from the cache."""
    def fail(*args, **kwargs):
        raise AssertionError("repacked although the cache holds the layout")
    monkeypatch.setattr(kernels, "pack_int4", fail)
    monkeypatch.setattr(kernels, "int8_rows", fail)
    read = loader._Shard.read

    def read_as_stored(shard, f, key, dtype, *args):
        assert dtype == shard.dtype(key), f"{key} converted although the cache holds it"
        return read(shard, f, key, dtype, *args)
    monkeypatch.setattr(loader._Shard, "read", read_as_stored)


def test_cached_load_is_bitwise_identical_and_gives_the_same_tokens(awq_ckpt, tmp_path, monkeypatch, capsys):
    uncached = load_model(awq_ckpt, dtype=torch.bfloat16, cache=False)
    first = load_model(awq_ckpt, dtype=torch.bfloat16, cache=tmp_path)
    [entry] = entries(tmp_path)
    message = capsys.readouterr().err
    assert f"first load of {awq_ckpt} took" in message and str(entry) in message and message.count("\n") == 1
    refuse_repacking(monkeypatch)
    cached = load_model(awq_ckpt, dtype=torch.bfloat16, cache=tmp_path)
    assert capsys.readouterr().err == ""  # a cached load says nothing
    assert entries(tmp_path) == [entry]
    linears = [m for m in cached.modules() if isinstance(m, Int4Linear)]
    assert len(linears) == 8 and all(m.backend == "cpu" for m in linears)
    assert isinstance(cached.head, Int8VocabTable) and isinstance(cached.language_model.embed_tokens, Int8VocabTable)
    assert_same_tensors(uncached, cached)
    assert_same_tensors(first, cached)
    ids = greedy_ids(cached, awq_ckpt)
    assert len(set(map(tuple, ids.values()))) == len(ids)  # prompts lead somewhere different
    assert ids == greedy_ids(uncached, awq_ckpt)


def test_settings_have_entries_of_their_own(awq_ckpt, tmp_path):
    load_model(awq_ckpt, dtype=torch.bfloat16, cache=tmp_path)
    load_model(awq_ckpt, dtype=torch.float32, int4_kernel=True, cache=tmp_path)  # int4, no int8 rows
    assert len(entries(tmp_path)) == 2
    exact = load_model(awq_ckpt, dtype=torch.float32, cache=tmp_path)  # dequantized: nothing to cache
    assert len(entries(tmp_path)) == 2
    assert not any(isinstance(m, Int4Linear) for m in exact.modules())
    # float16: a bfloat16 decoder as with bfloat16, but a float16 vision tower
    half = load_model(awq_ckpt, dtype=torch.float16, cache=tmp_path)
    assert len(entries(tmp_path)) == 3
    again = load_model(awq_ckpt, dtype=torch.float16, cache=tmp_path)
    assert again.visual.blocks[0].attn.qkv.weight.dtype == torch.float16
    assert_same_tensors(half, again)


def test_a_changed_checkpoint_invalidates_its_entry(tmp_path, capsys):
    ckpt = write_awq(tmp_path / "ckpt", seed=0)
    cache = tmp_path / "cache"
    old = load_model(ckpt, dtype=torch.bfloat16, cache=cache)
    [entry] = entries(cache)
    written = entry.read_bytes()
    shutil.rmtree(ckpt)
    write_awq(ckpt, seed=1)  # same names and sizes, other weights
    capsys.readouterr()
    new = load_model(ckpt, dtype=torch.bfloat16, cache=cache)
    assert "first load" in capsys.readouterr().err  # computed again and cached again
    assert entries(cache) == [entry] and entry.read_bytes() != written  # the same entry, rewritten
    assert_same_tensors(new, load_model(ckpt, dtype=torch.bfloat16, cache=False))
    assert not torch.equal(old.head.values, new.head.values)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "stale_header"])
def test_a_damaged_entry_is_ignored_and_written_again(awq_ckpt, tmp_path, monkeypatch, capsys, damage):
    reference = load_model(awq_ckpt, dtype=torch.bfloat16, cache=tmp_path)
    [entry] = entries(tmp_path)
    good = entry.read_bytes()
    if damage == "truncated":
        entry.write_bytes(good[: len(good) - 1000])
    elif damage == "garbage":
        entry.write_bytes(b"\x00\x01not a safetensors file" * 100)
    elif damage == "empty":
        entry.write_bytes(b"")
    else:  # a valid file naming a module this model does not have
        header_len = int.from_bytes(good[:8], "little")
        header = good[8:8 + header_len].replace(b"language_model.layers.0.", b"language_model.layers.9.")
        entry.write_bytes(good[:8] + header + good[8 + header_len:])
    capsys.readouterr()
    model = load_model(awq_ckpt, dtype=torch.bfloat16, cache=tmp_path)
    assert "first load" in capsys.readouterr().err
    assert_same_tensors(reference, model)
    assert entry.read_bytes() == good  # written again, whole
    refuse_repacking(monkeypatch)
    assert_same_tensors(reference, load_model(awq_ckpt, dtype=torch.bfloat16, cache=tmp_path))


def test_cache_off_writes_nothing(awq_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv(load_cache.DIR_ENV, str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_model(awq_ckpt, dtype=torch.bfloat16, cache=False)
    monkeypatch.setenv(load_cache.SWITCH_ENV, "0")
    load_model(awq_ckpt, dtype=torch.bfloat16)
    assert not any(tmp_path.iterdir())
    assert load_cache.cache_dir(tmp_path / "given") == tmp_path / "given"  # an explicit folder wins over the switch
    monkeypatch.delenv(load_cache.SWITCH_ENV, raising=False)
    assert load_cache.cache_dir() == tmp_path / "env" / "load"
    monkeypatch.delenv(load_cache.DIR_ENV)
    assert load_cache.cache_dir(True) == tmp_path / "xdg" / "qwen2vl" / "load"


def test_an_unwritable_cache_folder_is_not_an_error(awq_ckpt, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder would go")
    model = load_model(awq_ckpt, dtype=torch.bfloat16, cache=blocker / "cache")
    assert "could not write the load cache entry" in capsys.readouterr().err
    assert_same_tensors(model, load_model(awq_ckpt, dtype=torch.bfloat16, cache=False))


def test_progress_reports_bytes_read_up_to_the_total(awq_ckpt, tmp_path):
    calls = []
    load_model(awq_ckpt, dtype=torch.bfloat16, cache=False, progress=lambda *call: calls.append(call))
    reads = [(done, total) for text, done, total in calls if text.startswith("loading")]
    assert reads[-1][0] == reads[-1][1] > 0 and [d for d, _ in reads] == sorted(d for d, _ in reads)
    converted = [(done, total) for text, done, total in calls if text.startswith("converting")]
    assert converted[-1] == (8, 8)  # the 8 quantized linears of the tiny model


def test_the_cli_draws_the_load_on_a_terminal_and_clears_it(awq_ckpt, monkeypatch):
    """`from_pretrained(progress=)` hears the load; the CLI's line is drawn on a terminal and
    cleared once the model is loaded, so the answer starts on a clean line."""
    import io

    from qwen2vl import progress
    from qwen2vl.api import Qwen2VL

    calls = []
    Qwen2VL.from_pretrained(awq_ckpt, device="cpu", progress=lambda *call: calls.append(call))
    assert any(text.startswith("loading") and done == total for text, done, total in calls)
    terminal = io.StringIO()
    line = progress.ProgressLine(terminal, isatty=True, every_s=0)
    line.update("loading tiny", 5, 10)
    line.close()
    line.update("loading tiny", 10, 10)
    assert terminal.getvalue() == "\r\x1b[K 50%|##########          | loading tiny\r\x1b[K"


def test_an_act_order_linear_round_trips_through_an_entry(tmp_path):
    """A GPTQ linear with act order keeps its input order: rebuilt from an entry and an empty
    source, it is the same linear."""
    g_idx = (torch.randperm(128, generator=torch.Generator().manual_seed(4)) // 32).int()
    fast = Int4Linear(gptq_linear(32, 128, 32, seed=13, g_idx=g_idx), "cpu")
    assert fast.input_order is not None
    entry = load_cache.Entry(tmp_path / "entry.safetensors", "identity")
    assert entry.write({"layer": ({"backend": "cpu"}, fast.layout())}) == entry.path.stat().st_size
    [(settings, tensors)] = entry.read().values()
    with torch.device("meta"):
        empty = GPTQLinear(Linear(128, 32), 4, 32, zero_offset=1)
    rebuilt = Int4Linear(empty, settings["backend"], tensors)
    assert rebuilt.weight_names == fast.weight_names and torch.equal(rebuilt.input_order, fast.input_order)
    assert all(torch.equal(getattr(rebuilt, name), getattr(fast, name)) for name in fast.weight_names)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5))
    assert torch.equal(rebuilt(x), fast(x))
    assert load_cache.Entry(entry.path, "another checkpoint").read() is None  # stale: not used
