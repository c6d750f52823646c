"""Rows/s of `qwen2vl generate --ray` with 1 vs 2 single-threaded CPU replicas, same run.

    PYTHONPATH=$PWD python benchmarks/ray_replicas.py [--rows 192] [--max-tokens 32]

The tiny random checkpoint of the tests (tests/checkpoints.py, needs transformers), a local Ray
cluster, conversations of text and small images (greedy, fixed length: `ignore_eos`). Rows/s is
timed from the row a quarter of the way through to the last (steady state: every replica loaded
and answering; model loading and Ray's start are reported apart), so the two runs differ only in
how many replicas answer. The load average is printed: on a shared machine it decides the result.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from checkpoints import write_tiny_checkpoint  # noqa: E402

from qwen2vl.batch_job import Progress  # noqa: E402
from qwen2vl.distributed import run_job  # noqa: E402
from qwen2vl.engine_args import EngineArgs  # noqa: E402
from qwen2vl.progress import ProgressLine  # noqa: E402
from qwen2vl.sampling_params import SamplingParams  # noqa: E402


class _Timed(Progress):
    """Progress that also records when the first row and the row `mark` arrived."""

    def __init__(self, mark: int):
        super().__init__(None, ProgressLine(open(os.devnull, "w")))
        self.mark, self.first, self.marked = mark, None, None

    def add(self, row):
        super().add(row)
        self.first = self.first or time.perf_counter()
        if self.rows == self.mark:
            self.marked, self.tokens_at_mark = time.perf_counter(), self.tokens


def _conversations(folder: Path, rows: int) -> Path:
    images = []
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 256, (84, 112, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        images.append(str(folder / f"{i}.png"))
    source = folder / "in.jsonl"
    with open(source, "w") as file:
        for i in range(rows):
            content = ([{"type": "image", "image": images[i % 4]}] if i % 2 else []) + [
                {"type": "text", "text": f"Describe item {i}."}]
            file.write(json.dumps({"id": i, "messages": [{"role": "user", "content": content}]}) + "\n")
    return source


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = write_tiny_checkpoint(folder / "ckpt", "a")
        source = _conversations(folder, args.rows)
        print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
        start = time.perf_counter()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        print(f"ray.init: {time.perf_counter() - start:.1f} s")
        ray.data.DataContext.get_current().enable_progress_bars = False
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        rates = {}
        for replicas in (1, 2):
            progress, start = _Timed(args.rows // 4), time.perf_counter()
            run_job(str(source), str(folder / f"out-{replicas}.jsonl"), engine_args=EngineArgs(model=str(checkpoint)),
                    params=params, num_replicas=replicas, cpus_per_replica=1, batch_size=args.batch_size,
                    progress=progress)
            end = time.perf_counter()
            rates[replicas] = (progress.rows - progress.mark) / (end - progress.marked)
            tokens = (progress.tokens - progress.tokens_at_mark) / (end - progress.marked)
            print(f"{replicas} replica(s): {progress.rows} rows, {progress.failed} failed, "
                  f"first row after {progress.first - start:.1f} s, {rates[replicas]:.2f} rows/s "
                  f"({tokens:.0f} tokens/s) from row {progress.mark} to the last; "
                  f"load average {os.getloadavg()[0]:.1f}")
        print(f"speed-up 2 vs 1 replica: {rates[2] / rates[1]:.2f}x")
        ray.shutdown()


if __name__ == "__main__":
    main()
