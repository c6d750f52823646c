"""Every Triton kernel compiles for Hopper (sm_90) at the real 2B launch shapes, without a GPU.

The interpreter (tests/test_triton_kernels.py) checks what the kernels compute; this checks what
only the compiler sees: layouts, dot shapes, shared memory per block. See tests/triton_aot.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Not imported here: triton must first be imported after tests/test_triton_kernels.py turns its
# interpreter on, and the compiler runs in its own process anyway.
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: the GPU kernels cannot be compiled", allow_module_level=True)


def test_every_kernel_compiles_for_sm90():
    script = Path(__file__).with_name("triton_aot.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in reports if not r["ok"]]
    assert reports and not failed and done.returncode == 0, failed or done.stderr[-2000:]
    assert any(r["variant"].startswith("paged decode attention") for r in reports)
