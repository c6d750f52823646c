"""The core package without ray: it imports, `generate` runs, and `--ray` says what to install."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import qwen2vl

PACKAGE = Path(qwen2vl.__file__).resolve().parent

WITHOUT_RAY = """
import sys
sys.modules["ray"] = None  # as if not installed: `import ray` raises ModuleNotFoundError
import qwen2vl, qwen2vl.cli, qwen2vl.batch_job, qwen2vl.distributed
from qwen2vl import Qwen2VL, answer_rows
from qwen2vl.cli import main
code = main(["generate", "--ray", "--model", sys.argv[1], "--input", sys.argv[2]])
assert code == 2, code
code = main(["generate", "--model", sys.argv[1], "--input", sys.argv[2], "--temperature", "0", "--max-tokens", "2"])
assert code == 0, code
"""


def test_core_runs_without_ray(tiny_ckpt, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": 1, "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = subprocess.run([sys.executable, "-c", WITHOUT_RAY, str(tiny_ckpt), str(source)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "qwen2vl: error: --ray needs the ray extra (ray is not installed): pip install 'qwen2vl[ray]'" in out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["id"] == 1


def test_only_ray_batch_imports_ray():
    importers = [path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
                 if any(line.strip().startswith(("import ray", "from ray")) for line in path.read_text().splitlines())]
    assert importers == ["distributed/ray_batch.py"]
