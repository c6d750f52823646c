"""Prometheus text-format metrics, kept by the event loop (so no locks) and rendered on /metrics."""
from __future__ import annotations

import bisect
from collections import defaultdict

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{name}="{_escape(value)}"' for name, value in zip(names, values)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Counter:
    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_text, label_names
        self.values: dict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        values = self.values or ({(): 0.0} if not self.label_names else {})
        lines += [f"{self.name}{_labels(self.label_names, labels)} {value:g}" for labels, value in sorted(values.items())]
        return lines


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            cumulative += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        lines += [f"{self.name}_sum {self.total:g}", f"{self.name}_count {cumulative}"]
        return lines


def _gauge(name: str, help_text: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:g}"]


CACHE_COUNTERS = {
    "prefix_cache_queried_tokens": "Prompt tokens looked up in the prefix cache",
    "prefix_cache_hit_tokens": "Prompt tokens whose KV blocks were found in the prefix cache",
    "vision_cache_hits": "Images and videos whose encodings were found in the vision cache",
}


class Metrics:
    """The server's counters and histograms; gauges are read from the live state when rendered."""

    def __init__(self):
        self.requests = Counter("qwen2vl_http_requests_total", "HTTP requests by endpoint and status code",
                                ("endpoint", "status"))
        self.prompt_tokens = Counter("qwen2vl_prompt_tokens_total", "Prompt tokens of accepted requests")
        self.generation_tokens = Counter("qwen2vl_generation_tokens_total", "Tokens generated")
        self.finished = Counter("qwen2vl_request_finished_total", "Generation requests finished, by reason",
                                ("finish_reason",))
        self.time_to_first_token = Histogram("qwen2vl_time_to_first_token_seconds",
                                             "From the request's arrival to its first generated token", TTFT_BUCKETS_S)
        self.request_latency = Histogram("qwen2vl_request_duration_seconds",
                                         "From the request's arrival to its last generated token", LATENCY_BUCKETS_S)

    def render(self, *, running: int, waiting: int, kv_cache_usage: float, caches: dict[str, int] | None = None) -> str:
        """`caches`: the engine's cache counters (`LLMEngine.cache_counters`)."""
        lines = _gauge("qwen2vl_requests_running", "Requests generating tokens", running)
        lines += _gauge("qwen2vl_requests_waiting", "Requests admitted and not yet generating (preparing media or queued)",
                        waiting)
        lines += _gauge("qwen2vl_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", kv_cache_usage)
        for name, value in (caches or {}).items():
            lines += [f"# HELP qwen2vl_{name}_total {CACHE_COUNTERS[name]}", f"# TYPE qwen2vl_{name}_total counter",
                      f"qwen2vl_{name}_total {value}"]
        for metric in (self.requests, self.prompt_tokens, self.generation_tokens, self.finished,
                       self.time_to_first_token, self.request_latency):
            lines += metric.render()
        return "\n".join(lines) + "\n"
