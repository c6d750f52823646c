"""Each Triton kernel equals its torch reference (the cases are in tests/triton_cases.py).

Without a GPU the kernels run under Triton's interpreter, which works only if `TRITON_INTERPRET=1`
is set before triton is first imported: triton's own jitted helpers (reductions) are built at
that import. When something earlier in this process already imported triton (transformers'
Qwen2-VL model does), the cases run in a fresh process instead.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

CASES = Path(__file__).with_name("triton_cases.py")

if torch.cuda.is_available() or "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1":
    from triton_cases import *  # noqa: F401,F403  (the cases, collected here)
else:
    def test_kernel_cases_in_a_fresh_interpreter_process():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        done = subprocess.run([sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider"],
                              capture_output=True, text=True, env=env, cwd=CASES.parent.parent, timeout=600)
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
        assert done.returncode == 0 and " passed" in summary, done.stdout[-4000:] + done.stderr[-2000:]
