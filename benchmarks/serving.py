"""Load benchmark of the OpenAI-compatible server: requests/s, output tokens/s, time to first
token, time per output token and inter-token latency percentiles at several concurrency levels.
Needs httpx: `pip install -e '.[server,bench]'`.

    # start a server on a free 127.0.0.1 port for the run, and stop it afterwards
    python benchmarks/serving.py --model DIR [--image examples/shapes.png] [--concurrency 1 8 32]
    # or measure a server that is already running
    python benchmarks/serving.py --url http://127.0.0.1:8000 --served-model-name NAME

Every request streams (`stream: true`) a chat completion of exactly `--max-tokens` tokens
(`ignore_eos`), so runs are comparable; TTFT is measured to the first content chunk, the time
per output token (TPOT) of a request is the rest of its latency over its other tokens, and the
inter-token latency (ITL) between content chunks. Tokens without text (special tokens, as a model
writes past its end with `ignore_eos`, or pieces of one character) send no chunk, and a fast model's
tokens can share one: ITL is "n/a" when no request streamed two content chunks (the bundled demo
model answering about an image), TPOT always counts every token. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import httpx
except ModuleNotFoundError:
    raise SystemExit("benchmarks/serving.py needs httpx: pip install httpx, or from a clone "
                     "pip install -e '.[server,bench]'") from None


@dataclass
class RequestResult:
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # between consecutive content chunks

    @property
    def time_per_output_token(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None  # nothing measured: "n/a" in the table, null in --json
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def build_messages(prompt: str, image: str | None, index: int) -> list[dict]:
    text = f"{prompt} (request {index})"
    if image is None:
        return [{"role": "user", "content": text}]
    data = base64.b64encode(Path(image).read_bytes()).decode()
    suffix = Path(image).suffix.lstrip(".").lower().replace("jpg", "jpeg") or "png"
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/{suffix};base64,{data}"}},
                                         {"type": "text", "text": text}]}]


async def one_request(client: httpx.AsyncClient, body: dict) -> RequestResult:
    result = RequestResult()
    start = time.perf_counter()
    last = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
            if not any(choice["delta"].get("content") for choice in chunk["choices"]):
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft = now - start
            else:
                result.gaps.append(now - last)
            last = now
    result.latency = time.perf_counter() - start
    return result


async def run_level(url: str, headers: dict, model: str, concurrency: int, num_requests: int, args,
                    extra=None) -> dict:
    """`num_requests` streamed chats, `concurrency` at a time; `extra(index)` adds fields to
    request `index`'s body (warm-up requests have negative indexes)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        def body(index: int) -> dict:
            return {"model": model, "messages": build_messages(args.prompt, args.image, index),
                    "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, **(extra(index) if extra else {})}

        await asyncio.gather(*(one_request(client, body(-1 - i)) for i in range(min(concurrency, 4))))  # warm up
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in range(num_requests):
            queue.put_nowait(index)
        results: list[RequestResult] = []

        async def worker():
            while not queue.empty():
                results.append(await one_request(client, body(queue.get_nowait())))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ttfts = [r.ttft for r in results]
    gaps = [gap for r in results for gap in r.gaps]
    tpots = [r.time_per_output_token for r in results if r.time_per_output_token is not None]
    return {
        "concurrency": concurrency, "requests": len(results), "seconds": elapsed,
        "requests_per_s": len(results) / elapsed,
        "output_tokens_per_s": sum(r.output_tokens for r in results) / elapsed,
        "ttft_ms": milliseconds(ttfts), "tpot_ms": milliseconds(tpots), "itl_ms": milliseconds(gaps),
        "latency_s_mean": statistics.mean(r.latency for r in results),
    }


def milliseconds(seconds: list[float]) -> dict[int, float | None]:
    """The 50th, 90th and 99th percentiles of `seconds`, in milliseconds (None: no values)."""
    return {q: None if percentile(seconds, q) is None else 1000 * percentile(seconds, q) for q in (50, 90, 99)}


def shown(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def percentiles(row: dict, key: str, digits: int) -> str:
    return " / ".join(shown(row[key][q], digits) for q in (50, 90, 99))


def markdown(rows: list[dict]) -> str:
    lines = ["| concurrency | requests | req/s | output tok/s | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) "
             "| ITL p50 / p90 / p99 (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['concurrency']} | {row['requests']} | {row['requests_per_s']:.2f} | "
                     f"{row['output_tokens_per_s']:.1f} | {percentiles(row, 'ttft_ms', 0)} | "
                     f"{percentiles(row, 'tpot_ms', 1)} | {percentiles(row, 'itl_ms', 1)} |")
    return "\n".join(lines)


def start_server(args, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`qwen2vl serve` in a subprocess (with `env` added to this process's environment)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-m", "qwen2vl.cli", "serve", "--model", args.model, "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", args.served_model_name, "--log-level", "warning",
               "--device", args.device, *args.server_args]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise SystemExit("the server did not come up within 600 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="checkpoint to serve for the run (a `qwen2vl serve` subprocess)")
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--served-model-name", default="bench")
    parser.add_argument("--api-key", default=os.environ.get("QWEN2VL_API_KEY"))
    parser.add_argument("--device", default="auto", help="with --model")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="extra `qwen2vl serve` options (with --model; must come last)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=4, help="requests = this x concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="Describe this image in detail.")
    parser.add_argument("--image", help="send this image (as a data: URI) with every request")
    parser.add_argument("--json", metavar="OUT.json", help="also write the raw numbers here")
    args = parser.parse_args(argv)

    process = None
    url = args.url
    if args.model:
        process, url = start_server(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        rows = []
        for concurrency in args.concurrency:
            row = asyncio.run(run_level(url, headers, args.served_model_name, concurrency,
                                        concurrency * args.requests_per_client, args))
            print(f"concurrency {concurrency}: {row['requests_per_s']:.2f} req/s, "
                  f"{row['output_tokens_per_s']:.1f} tok/s, TTFT p50 {shown(row['ttft_ms'][50], 0)} ms, "
                  f"TPOT p50 {shown(row['tpot_ms'][50], 1)} ms, ITL p50 {shown(row['itl_ms'][50], 1)} ms",
                  file=sys.stderr)
            rows.append(row)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
