"""The real Qwen2-VL-2B-Instruct-AWQ architecture, random weights: written by our writer
(in about half a minute), loaded without a second copy of the weights, run end to end.

The slowest test of this part of the suite (~1 min on 2 cores, ~5 GB of RAM in bf16).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG_2B = ROOT / "qwen2vl" / "assets" / "qwen2-vl-2b-instruct-awq.config.json"
CHECKPOINT_BYTES = 2.5 * 2**30  # the writer's output measured 2.38 GiB


@pytest.fixture(scope="module")
def ckpt_2b_awq(tmp_path_factory):
    # tmp first; where it is too small (a CI machine's may be), the repository's ignored .cache
    places = [tmp_path_factory.mktemp("qwen2-vl-2b-awq"), ROOT / ".cache" / "test-qwen2-vl-2b-awq"]
    free = {place: _free_bytes(place) for place in places}
    out = next((place for place in places if free[place] >= CHECKPOINT_BYTES), None)
    if out is None:
        # a full disk would fail every later test that writes a file, not just this one
        pytest.skip(f"the 2B checkpoint needs {CHECKPOINT_BYTES / 2**30:.1f} GiB free; "
                    + ", ".join(f"{place.parent}: {room / 2**30:.2f} GiB" for place, room in free.items()))
    out.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "qwen2vl.tools.random_checkpoint", "--config", str(CONFIG_2B),
                        "--quant", "awq", "--out", str(out)], check=True, cwd=ROOT)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the largest file of the suite: later tests get the disk back


def _free_bytes(path: Path) -> int:
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    return shutil.disk_usage(existing).free


def test_writer_produces_the_card_layout(ckpt_2b_awq):
    config = json.loads((ckpt_2b_awq / "config.json").read_text())
    assert config["quantization_config"] == json.loads(CONFIG_2B.read_text())["quantization_config"]
    assert config["torch_dtype"] == "float16"
    index = json.loads((ckpt_2b_awq / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.27.mlp.down_proj.qweight" in index and "visual.blocks.31.mlp.fc2.weight" in index
    assert "lm_head.weight" not in index  # tied
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json",
                 "generation_config.json"):
        assert (ckpt_2b_awq / name).is_file()


def test_loads_in_one_copy_and_runs(ckpt_2b_awq):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load.py"), str(ckpt_2b_awq),
                             "--dtype", "bf16", "--forward"], check=True, capture_output=True, text=True, cwd=ROOT)
    result = json.loads(result.stdout.strip().splitlines()[-1])
    # a cold load (repacking, then writing the load cache entry) and a warm one (reading it)
    for report in (result["cold"], result["warm"]):
        assert report["peak_rss_over_weights"] < 1.2, report
        # the CPU int4 path: 4-bit decoder linears, bf16 vision tower, the tied vocabulary table in
        # int8 (quantized as it is read), no dequantized copy
        assert 1.8 * 2**30 < report["weight_bytes"] < 2.4 * 2**30, report
        assert report["logits_finite"] and report["logits_shape"] == [1, 151936]
    assert result["cold"]["weight_bytes"] == result["warm"]["weight_bytes"]
    assert result["read_bytes"] == sum(path.stat().st_size for path in ckpt_2b_awq.glob("*.safetensors"))
