"""What the server's bounds cost normal traffic: this tree's `qwen2vl serve` against another
revision's (the one before the bounds), same machine, same run, the sides alternating.

    python benchmarks/hardening.py --base REV [--model DIR] [--rounds 3] [--write]

Both servers run on the same checkpoint (default: the bundled demo model, whose few microseconds of
math a step leave the server's own costs visible), with an API key (so every request passes the
key check before its body is read), each in a subprocess that imports its revision's qwen2vl (the
base revision is checked out into `.cache/ab-REV` as a git worktree). Each round runs every
workload on one side, then on the other, the order swapped round by round; a workload is
`benchmarks/serving.py`'s streamed chats at a fixed concurrency:

- text: a short text chat, 8 at a time;
- image: the same with examples/shapes.png as a data: URI, 4 at a time (media bounds, the pool share);
- schema: a small `response_format` JSON schema, the same for every request, 4 at a time (schema
  bounds; compiled once, then the cache);
- new schema: a different schema per request, 2 at a time (each compiles: the compile's isolation).

Reported: requests/s and time to first token p50 per side (each side's median over rounds) and
this tree over the base. `--write` puts the table into docs/benchmarks.md ("Server bounds").
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # noqa: E402
from engine_ab import ROOT, base_tree  # noqa: E402
from report import write_section  # noqa: E402

API_KEY = "bench-key"
DEMO = ROOT / "models" / "qwen2-vl-shapes-demo"
SCHEMA = {"type": "object", "properties": {"shape": {"enum": ["circle", "square", "triangle"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["shape", "count"], "additionalProperties": False}


def response_format(schema: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}


_fresh = itertools.count()


def new_schema(index: int) -> dict:
    """A schema no request had before (in any round): each request compiles its grammar."""
    properties = {**SCHEMA["properties"], f"note{next(_fresh)}": {"type": "string", "maxLength": 8}}
    return response_format({**SCHEMA, "properties": properties})


WORKLOADS = {  # name: (concurrency, requests, image, fields added to request i's body)
    "text": (8, 32, None, None),
    "image": (4, 16, str(ROOT / "examples" / "shapes.png"), None),
    "schema": (4, 16, None, lambda index: response_format(SCHEMA)),
    "new schema": (2, 8, None, new_schema),
}


def start(tree: Path, model: str) -> tuple[subprocess.Popen, str]:
    """`qwen2vl serve` of the revision checked out at `tree`, on a free loopback port."""
    args = SimpleNamespace(model=model, served_model_name="bench", device="cpu",
                           server_args=["--api-key", API_KEY])
    return serving.start_server(args, env={"PYTHONPATH": str(tree)})


def run_workload(url: str, name: str, max_tokens: int) -> dict:
    concurrency, requests, image, extra = WORKLOADS[name]
    args = SimpleNamespace(prompt="What shapes are in the image?", image=image, max_tokens=max_tokens)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return asyncio.run(serving.run_level(url, headers, "bench", concurrency, requests, args, extra))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision before the bounds")
    parser.add_argument("--model", default=str(DEMO))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)

    sides = {"base": base_tree(args.base), "this tree": ROOT}
    servers = {side: start(tree, args.model) for side, tree in sides.items()}
    results: dict[tuple[str, str], list[dict]] = {}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()[0]
    try:
        for round_index in range(args.rounds):
            order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
            for side in order:
                for name in WORKLOADS:
                    row = run_workload(servers[side][1], name, args.max_tokens)
                    results.setdefault((side, name), []).append(row)
                    print(f"round {round_index + 1} {side:9} {name:10} {row['requests_per_s']:.2f} req/s "
                          f"TTFT p50 {row['ttft_ms'][50]:.0f} ms", file=sys.stderr)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=30)
    load_after = os.getloadavg()[0]

    def median(side: str, name: str, pick) -> float:
        return statistics.median(pick(row) for row in results[(side, name)])

    lines = [f"Command: `python benchmarks/hardening.py --base {args.base} --rounds {args.rounds}` "
             f"({Path(args.model).name}, {platform.machine()}, {os.cpu_count()} cores, load average "
             f"{load_before:.2f} before and {load_after:.2f} after, {started}). Medians over the rounds; "
             "ratios this tree / base (req/s above 1 and TTFT below 1 are better).", "",
             "| workload | concurrency | req/s base | req/s this tree | ratio | TTFT p50 base (ms) | "
             "TTFT p50 this tree (ms) | ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (concurrency, *_) in WORKLOADS.items():
        rate = [median(side, name, lambda row: row["requests_per_s"]) for side in sides]
        ttft = [median(side, name, lambda row: row["ttft_ms"][50]) for side in sides]
        lines.append(f"| {name} | {concurrency} | {rate[0]:.2f} | {rate[1]:.2f} | {rate[1] / rate[0]:.2f} | "
                     f"{ttft[0]:.0f} | {ttft[1]:.0f} | {ttft[1] / ttft[0]:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(ROOT / "docs" / "benchmarks.md", "hardening", "## Server bounds: their cost on normal traffic\n\n"
                      + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
