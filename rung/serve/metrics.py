"""Prometheus metrics, named as vLLM names them with a ``rung:`` prefix (``vllm:num_requests_running``
→ ``rung:num_requests_running``), so a vLLM dashboard works after a search and replace.

Counters and histograms are updated as requests finish; the engine gauges (running, waiting, KV
cache usage, prefix-cache hits) are read from the engine when /metrics is scraped. Each server
has its own registry, so several in one process (tests) do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        m = ["model_name"]
        self.http_requests = Counter("rung:http_requests", "HTTP requests by endpoint and status",
                                     ["model_name", "handler", "method", "status"], registry=r)
        self.request_success = Counter("rung:request_success", "Finished requests by finish reason",
                                       ["model_name", "finished_reason"], registry=r)
        self.prompt_tokens = Counter("rung:prompt_tokens", "Prompt tokens processed", m, registry=r)
        self.generation_tokens = Counter("rung:generation_tokens", "Tokens generated", m, registry=r)
        self.ttft = Histogram("rung:time_to_first_token_seconds", "Time to first token", m, buckets=TTFT_BUCKETS,
                              registry=r)
        self.tpot = Histogram("rung:time_per_output_token_seconds", "Time per output token after the first", m,
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("rung:e2e_request_latency_seconds", "End-to-end request latency", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram("rung:request_prompt_tokens", "Prompt tokens per request", m,
                                               buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("rung:request_generation_tokens", "Generated tokens per request",
                                                   m, buckets=TOKEN_BUCKETS, registry=r)
        self.running = Gauge("rung:num_requests_running", "Sequences in the engine's running batch", m, registry=r)
        self.waiting = Gauge("rung:num_requests_waiting", "Sequences waiting (or swapped out) for the engine", m,
                             registry=r)
        self.in_flight = Gauge("rung:num_requests_in_flight", "HTTP requests being served (the --max-concurrent pool)",
                               m, registry=r)
        self.kv_usage = Gauge("rung:kv_cache_usage_perc", "KV-cache usage (1 = every block in use)", m, registry=r)
        self.kv_blocks_free = Gauge("rung:kv_cache_free_blocks", "KV blocks free or evictable, all groups", m,
                                    registry=r)
        self.prefix_queries = Gauge("rung:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", m,
                                    registry=r)
        self.prefix_hits = Gauge("rung:prefix_cache_hits", "Prompt tokens found in the prefix cache", m, registry=r)
        self.prefix_hit_rate = Gauge("rung:prefix_cache_hit_rate", "Prefix-cache hits / queries (tokens)", m,
                                     registry=r)
        self.loading = Gauge("rung:model_loading", "1 while the model loads", m, registry=r)
        self.healthy = Gauge("rung:healthy", "1 while /health answers 200 (loaded, engine running)", m, registry=r)
        self.redacted_entities = Counter("rung:redacted_entities", "PII entities redacted from requests, by type",
                                         ["model_name", "entity_type"], registry=r)
        # governance (rung/serve/governance.py): labelled by the key's name in the policy file, never the key
        self.policy_denied_calls = Counter("rung:policy_denied_calls", "Tool calls the policy denied",
                                           ["model_name", "key", "kind"], registry=r)
        self.policy_refusals = Counter("rung:policy_refusals", "Replies ended with a refusal after denied calls",
                                       ["model_name", "key"], registry=r)
        self.policy_removed_tools = Counter("rung:policy_removed_tools", "Declared tools removed by the policy",
                                            ["model_name", "key"], registry=r)
        self.verifier_verdicts = Counter("rung:verifier_verdicts", "Answers scored by the verifier, by verdict",
                                         ["model_name", "verdict"], registry=r)
        self.verifier_score = Histogram("rung:verifier_score", "Verifier scores", m,
                                        buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.verifier_seconds = Histogram("rung:verifier_seconds", "Time to verify one answer", m,
                                          buckets=TTFT_BUCKETS, registry=r)

    def redacted(self, counts: dict[str, int]) -> None:
        for kind, count in counts.items():
            self.redacted_entities.labels(self.model_name, kind).inc(count)

    def http(self, handler: str, method: str, status: int) -> None:
        self.http_requests.labels(self.model_name, handler, method, str(status)).inc()

    def finished(self, finish_reason: str, prompt_tokens: int, generated: int, ttft: float | None,
                 latency: float) -> None:
        n = self.model_name
        self.request_success.labels(n, finish_reason).inc()
        self.prompt_tokens.labels(n).inc(prompt_tokens)
        self.generation_tokens.labels(n).inc(generated)
        self.request_prompt_tokens.labels(n).observe(prompt_tokens)
        self.request_generation_tokens.labels(n).observe(generated)
        self.e2e.labels(n).observe(latency)
        if ttft is not None:
            self.ttft.labels(n).observe(ttft)
            if generated > 1:
                self.tpot.labels(n).observe((latency - ttft) / (generated - 1))

    def policy_denied(self, key: str, kind: str) -> None:
        self.policy_denied_calls.labels(self.model_name, key, kind).inc()

    def policy_refused(self, key: str) -> None:
        self.policy_refusals.labels(self.model_name, key).inc()

    def tools_removed(self, key: str, count: int) -> None:
        self.policy_removed_tools.labels(self.model_name, key).inc(count)

    def verified(self, verdict: str, score: float | None, seconds: float) -> None:
        self.verifier_verdicts.labels(self.model_name, verdict).inc()
        if score is not None:
            self.verifier_score.labels(self.model_name).observe(score)
        self.verifier_seconds.labels(self.model_name).observe(seconds)

    def render(self, stats: dict, in_flight: int, loading: bool, total_blocks: int | None,
               healthy: bool | None = None) -> bytes:
        """The exposition text, engine gauges read now."""
        n = self.model_name
        self.loading.labels(n).set(1 if loading else 0)
        if healthy is not None:
            self.healthy.labels(n).set(1 if healthy else 0)
        self.in_flight.labels(n).set(in_flight)
        if stats:
            self.running.labels(n).set(stats["running"])
            self.waiting.labels(n).set(stats["waiting"] + stats["swapped"])
            self.kv_blocks_free.labels(n).set(stats["free_blocks"])
            if total_blocks:
                self.kv_usage.labels(n).set(1 - stats["free_blocks"] / total_blocks)
            queries, hits = stats["prompt_tokens"], stats["cached_prompt_tokens"]
            self.prefix_queries.labels(n).set(queries)
            self.prefix_hits.labels(n).set(hits)
            self.prefix_hit_rate.labels(n).set(hits / queries if queries else 0.0)
        return generate_latest(self.registry)
