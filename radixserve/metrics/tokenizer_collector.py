"""The API server's per-request Prometheus metrics, with SGLang's names and buckets."""

from __future__ import annotations

from radixserve.metrics.registry import metric, metric_name

TTFT_BUCKETS = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400]
E2E_BUCKETS = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400,
               600, 1200, 1800, 2400]
ITL_BUCKETS = [0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040,
               0.060, 0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000,
               8.000]


class TokenizerMetricsCollector:
    def __init__(self, prefix: str, labels: dict[str, str]) -> None:
        names = list(labels)

        def counter(name: str, doc: str) -> object:
            return metric("Counter", metric_name(prefix, name), doc, names).labels(**labels)

        def histogram(name: str, doc: str, buckets: list[float]) -> object:
            return metric("Histogram", metric_name(prefix, name), doc, names,
                          buckets=buckets).labels(**labels)

        self.prompt_tokens_total = counter("prompt_tokens_total",
                                           "Number of prefill tokens processed.")
        self.generation_tokens_total = counter("generation_tokens_total",
                                               "Number of generation tokens processed.")
        self.cached_tokens_total = counter("cached_tokens_total",
                                           "Number of cached prompt tokens.")
        self.num_requests_total = counter("num_requests_total", "Number of requests processed.")
        self.num_aborted_requests_total = counter("num_aborted_requests_total",
                                                  "Number of requests aborted.")
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            TTFT_BUCKETS)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS)
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds",
            E2E_BUCKETS)

    def observe_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def observe_inter_token(self, interval: float, num_new_tokens: int) -> None:
        """`num_new_tokens` arrived `interval` after the previous ones: one observation
        per token, of the interval's share."""
        share = interval / num_new_tokens
        for _ in range(num_new_tokens):
            self.inter_token_latency.observe(share)

    def observe_finished(self, prompt_tokens: int, generation_tokens: int, cached_tokens: int,
                         e2e_seconds: float, aborted: bool) -> None:
        self.prompt_tokens_total.inc(prompt_tokens)
        self.generation_tokens_total.inc(generation_tokens)
        if cached_tokens > 0:
            self.cached_tokens_total.inc(cached_tokens)
        self.num_requests_total.inc()
        if aborted:
            self.num_aborted_requests_total.inc()
        self.e2e_request_latency.observe(e2e_seconds)
