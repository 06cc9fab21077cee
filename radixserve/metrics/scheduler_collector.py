"""The scheduler process's Prometheus metrics, with SGLang's names and labels."""

from __future__ import annotations

from dataclasses import dataclass

from radixserve.metrics.registry import metric, metric_name

# Seconds; SGLang's buckets for the time a request waits before its first forward.
QUEUE_TIME_BUCKETS = [0.0, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80,
                      90, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1200, 1400,
                      1600, 1800, 2000, 2500, 3000]


@dataclass
class SchedulerGauges:
    """What the scheduler reports at each logged batch (and when it goes idle)."""

    num_running_reqs: int = 0
    num_queue_reqs: int = 0
    num_used_tokens: int = 0
    token_usage: float = 0.0
    cache_hit_rate: float = 0.0
    gen_throughput: float = 0.0
    max_total_num_tokens: int = 0
    new_token_ratio: float = 0.0


class SchedulerMetricsCollector:
    def __init__(self, prefix: str, labels: dict[str, str]) -> None:
        self.labels = labels
        names = list(labels)

        def gauge(name: str, doc: str) -> object:
            # The scheduler is the only writer of its gauges: the latest value wins.
            return metric("Gauge", metric_name(prefix, name), doc, names,
                          multiprocess_mode="mostrecent").labels(**labels)

        def counter(name: str, doc: str) -> object:
            return metric("Counter", metric_name(prefix, name), doc, names).labels(**labels)

        self.num_running_reqs = gauge("num_running_reqs", "The number of running requests.")
        self.num_queue_reqs = gauge("num_queue_reqs",
                                    "The number of requests in the waiting queue.")
        self.num_used_tokens = gauge("num_used_tokens", "The number of used tokens.")
        self.token_usage = gauge("token_usage", "The token usage.")
        self.cache_hit_rate = gauge("cache_hit_rate", "The prefix cache hit rate.")
        self.gen_throughput = gauge("gen_throughput", "The generation throughput (token/s).")
        self.max_total_num_tokens = gauge(
            "max_total_num_tokens", "Maximum total number of tokens in the KV cache pool.")
        self.new_token_ratio = gauge("new_token_ratio", "The new token ratio.")
        self.num_retracted_reqs_total = counter(
            "num_retracted_requests_total", "Total number of retracted requests.")
        self.queue_time = metric(
            "Histogram", metric_name(prefix, "queue_time_seconds"),
            "Histogram of queueing time in seconds.", names,
            buckets=QUEUE_TIME_BUCKETS).labels(**labels)

    def log_stats(self, g: SchedulerGauges) -> None:
        self.num_running_reqs.set(g.num_running_reqs)
        self.num_queue_reqs.set(g.num_queue_reqs)
        self.num_used_tokens.set(g.num_used_tokens)
        self.token_usage.set(g.token_usage)
        self.cache_hit_rate.set(g.cache_hit_rate)
        self.gen_throughput.set(g.gen_throughput)
        self.max_total_num_tokens.set(g.max_total_num_tokens)
        self.new_token_ratio.set(g.new_token_ratio)

    def observe_retractions(self, n: int) -> None:
        if n > 0:
            self.num_retracted_reqs_total.inc(n)

    def observe_queue_time(self, seconds: float) -> None:
        self.queue_time.observe(seconds)
