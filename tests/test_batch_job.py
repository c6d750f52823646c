"""The generate job's files: JSONL read in bytes, and rows that outlive a kill at any moment."""
from __future__ import annotations

import io
import json
import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

from qwen2vl.jsonl import jsonl_lines

ROOT = Path(__file__).resolve().parent.parent

# `qwen2vl generate` with a stand-in model: each row's answer is its prompt, with multi-byte
# characters and a line separator, so a cut can land inside a character. Its first argument:
# "kill" makes a write past RLIMIT_FSIZE kill it (SIGXFSZ, which Python ignores), "fail" leaves
# that write failing with EFBIG, as on a full disk.
STAND_IN_JOB = """
import signal
import sys
from types import SimpleNamespace

from qwen2vl import cli

if sys.argv.pop(1) == "kill":
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)

def complete(prompts, params):
    return [SimpleNamespace(text=f"{prompt} \\u00e9\\u2028\\u00e9 " * 3, finish_reason="stop",
                            usage=SimpleNamespace(prompt_tokens=1, completion_tokens=1)) for prompt in prompts]

processor = SimpleNamespace(prepare=lambda messages, context_len=None: messages[-1]["content"])
cli._load = lambda args: SimpleNamespace(engine=SimpleNamespace(max_model_len=64), processor=processor,
                                         complete=complete)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_jsonl_lines_split_at_newline_only_and_skip_what_is_over_the_limit():
    data = "a\u2028b\u0085cd\n".encode() + b"123456789\n" + b"1234567890\n" + b"x" * 3000 + b"\n" + b"end"
    lines = list(jsonl_lines(io.BytesIO(data), max_line_bytes=9))
    assert lines == [(1, "a\u2028b\u0085cd\n".encode(), True), (2, b"123456789\n", True),
                     (3, b"1234567890", False), (4, b"x" * 10, False), (5, b"end", True)]
    assert [line for _, line, _ in jsonl_lines(io.BytesIO(data))] == data.splitlines(keepends=True)


def _run_job(source: Path, target: Path, max_file_bytes: int | None = None,
             past_the_limit: str = "kill") -> subprocess.CompletedProcess:
    """The stand-in job with --resume, killed by the kernel (SIGXFSZ) when a write would take any
    file past `max_file_bytes`: a kill -9 at that exact byte, wherever the job is writing
    (`past_the_limit="fail"`: that write fails instead, as on a full disk)."""
    def limit_files():
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", STAND_IN_JOB, past_the_limit, "generate", "--input", str(source),
                           "--output", str(target), "--batch-size", "4", "--resume"],
                          cwd=target.parent, env=env, preexec_fn=limit_files, capture_output=True, text=True)


def test_generate_killed_at_random_moments_loses_no_row(tmp_path):
    """Kill the job at seeded random bytes of its writes, resuming each time: a kill while
    --resume copies the kept rows leaves OUT.partial as it was; a kill while rows are written
    leaves every row written before it; the file is always the finished output's first bytes, and
    a last --resume completes it."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": f"q\u2028{i}"}]},
                                         ensure_ascii=False) + "\n" for i in range(40)), encoding="utf-8")
    full = "".join(json.dumps({"id": f"r{i}", "text": f"q\u2028{i} \u00e9\u2028\u00e9 " * 3, "finish_reason": "stop",
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1}}, ensure_ascii=False) + "\n"
                   for i in range(40)).encode()
    target = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    rng = random.Random(40)  # kills at bytes 3757 and 4748 (writing rows), 4293 and 261 (copying the kept ones)
    for _ in range(4):
        before = partial.read_bytes() if partial.exists() else b""
        kept = before[:before.rfind(b"\n") + 1]  # without a last line cut short
        kill_at = rng.randrange(1, len(full))
        assert _run_job(source, target, kill_at).returncode == -signal.SIGXFSZ
        after = partial.read_bytes()
        assert after == (before if kill_at < len(kept) else full[:kill_at])
        assert len({json.loads(line)["id"] for line in after.split(b"\n")[:-1]}) == after.count(b"\n")
        assert not target.exists()
    # A write that fails (a full disk): one line, the rows so far kept.
    failed = _run_job(source, target, len(full) - 100, past_the_limit="fail")
    assert failed.returncode == 2
    assert f"qwen2vl: error: --output: cannot write {partial}: File too large\n" in failed.stderr
    assert "Traceback" not in failed.stderr and partial.read_bytes() == full[:len(full) - 100]
    assert _run_job(source, target).returncode == 0
    assert target.read_bytes() == full
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
