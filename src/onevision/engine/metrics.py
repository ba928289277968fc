"""Engine counters and latency histograms (bounded memory: fixed buckets), and their Prometheus text
exposition under vLLM's metric names, so dashboards made for vLLM read onevision's /metrics."""

from __future__ import annotations

import bisect
import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def quantile(self, q: float) -> float:
        """Upper bucket bound holding the q-quantile (for log lines; benchmarks measure exact values)."""
        if not self.count:
            return 0.0
        target, seen = q * self.count, 0
        for bound, n in zip(self.buckets, self.counts):
            seen += n
            if seen >= target:
                return bound
        return float("inf")


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.prompt_tokens = self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.ttft, self.itl, self.e2e = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS), Histogram(E2E_BUCKETS)

    def count_finish(self, reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1


def _escape(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _line(name: str, value: float, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {value}" if inner else f"{name} {value}"


def prometheus_text(metrics: Metrics, state: dict, model_name: str) -> str:
    """The text exposition format (version 0.0.4)."""
    base = {"model_name": model_name}
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float, dict]]) -> None:
        if kind == "counter":  # format 0.0.4 names a counter by its sample, x_total (prometheus_client does too)
            name += "_total"
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(_line(n, v, {**base, **labels}) for n, v, labels in samples)

    def gauge(name, help_text, value):
        metric(name, "gauge", help_text, [(name, value, {})])

    def counter(name, help_text, value):
        metric(name, "counter", help_text, [(name + "_total", value, {})])

    def histogram(name, help_text, h: Histogram):
        samples, cumulative = [], 0
        for bound, n in zip(list(h.buckets) + [float("inf")], h.counts):
            cumulative += n
            samples.append((name + "_bucket", cumulative, {"le": "+Inf" if bound == float("inf") else str(bound)}))
        samples += [(name + "_sum", h.sum, {}), (name + "_count", h.count, {})]
        metric(name, "histogram", help_text, samples)

    with metrics.lock:
        gauge("vllm:num_requests_running", "Number of requests in model execution batches.", state["running"])
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", state["waiting"])
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", state["kv_usage"])
        counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.", state["preemptions"])
        counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                state["prefix_queries"])
        counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                state["prefix_hits"])
        counter("vllm:mm_cache_queries", "Multi-modal (vision feature) cache queries, in items.",
                state["vision_queries"])
        counter("vllm:mm_cache_hits", "Multi-modal (vision feature) cache hits, in items.", state["vision_hits"])
        counter("vllm:prompt_tokens", "Number of prefill tokens processed.", metrics.prompt_tokens)
        counter("vllm:generation_tokens", "Number of generation tokens processed.", metrics.generation_tokens)
        metric("vllm:request_success", "counter", "Count of finished requests by finish reason.",
               [("vllm:request_success_total", n, {"finished_reason": r}) for r, n in sorted(metrics.finished.items())])
        histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", metrics.ttft)
        histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", metrics.itl)
        histogram("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.",
                  metrics.e2e)
    return "\n".join(out) + "\n"


__all__ = ["Histogram", "Metrics", "prometheus_text"]
