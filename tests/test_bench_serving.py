"""benchmarks/serving.py's numbers: time per output token counts every token, and a latency
nothing measured is n/a (JSON null), never nan."""
from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "benchmarks" / "serving.py")
serving = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # by path: benchmarks/ stays off sys.path
_spec.loader.exec_module(serving)


def test_a_request_whose_text_came_in_one_chunk_has_a_tpot_and_no_itl():
    # 16 tokens, the text in the first chunk only (the rest special tokens past the answer's end)
    result = serving.RequestResult(ttft=0.010, latency=0.160, output_tokens=16, gaps=[])
    assert abs(result.time_per_output_token - 0.010) < 1e-12
    assert serving.RequestResult(ttft=0.01, latency=0.01, output_tokens=1).time_per_output_token is None
    row = {"concurrency": 1, "requests": 1, "requests_per_s": 6.25, "output_tokens_per_s": 100.0,
           "ttft_ms": serving.milliseconds([0.010]), "tpot_ms": serving.milliseconds([0.010]),
           "itl_ms": serving.milliseconds([])}
    assert row["itl_ms"] == {50: None, 90: None, 99: None}
    assert serving.markdown([row]).splitlines()[-1] == ("| 1 | 1 | 6.25 | 100.0 | 10 / 10 / 10 | 10.0 / 10.0 / 10.0 "
                                                        "| n/a / n/a / n/a |")


def test_httpx_comes_with_the_bench_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "httpx" in extras["bench"]
