"""Every Prometheus object of the service, prefix `rmserve_`, in one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

POW2 = tuple(float(2**i) for i in range(0, 11))  # 1 .. 1024
TOKENS = tuple(float(2**i) for i in range(5, 18))  # 32 .. 131072
CONNECTION_ROUTE = "connection"  # the route label of answers given before a request was parsed
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "rmserve_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.failures = Counter("rmserve_failures", "Failed requests by cause", ["cause"], registry=r)
        self.latency = Histogram(
            "rmserve_request_seconds", "Total request latency", ["route"], buckets=LATENCY, registry=r
        )
        self.queue_seconds = Histogram(
            "rmserve_queue_seconds", "Time a sequence waited for its batch", buckets=LATENCY, registry=r
        )
        self.inference_seconds = Histogram(
            "rmserve_inference_seconds", "Forward pass time per batch", buckets=LATENCY, registry=r
        )
        self.batch_size = Histogram("rmserve_batch_size", "Sequences per forward pass", buckets=POW2, registry=r)
        self.batch_tokens = Histogram(
            "rmserve_batch_tokens", "Padded tokens per forward pass", buckets=TOKENS, registry=r
        )
        self.padding = Histogram(
            "rmserve_padding_fraction",
            "Share of padded tokens per forward pass",
            buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
            registry=r,
        )
        self.queue_depth = Gauge("rmserve_queue_depth", "Sequences waiting for a forward pass", registry=r)
        self.tokens = Counter("rmserve_tokens_scored", "Real tokens scored", registry=r)
        self.sequences = Counter("rmserve_sequences_scored", "Sequences scored", registry=r)
        self.rewards = Histogram(
            "rmserve_reward",
            "Rewards served (raw, before normalization)",
            buckets=tuple(x / 2 for x in range(-20, 21)),
            registry=r,
        )
        self.truncated = Counter("rmserve_truncated", "Sequences truncated to max_length", registry=r)
        self.model_info = Info("rmserve_model", "The model being served", registry=r)
        self.evicted = Counter(
            "rmserve_connections_evicted", "Idle connections closed to make room at the connection cap", registry=r
        )

    def connection_refusal(self, cause: str, status: int | None) -> None:
        """What the connection layer (service/protocol.py) refused before any request reached the edge:
        counted in failures by cause and, when it answered, in requests under route="connection". An
        idle connection evicted at the cap is not a failure; it has its own counter."""
        if cause == "evicted_idle":
            self.evicted.inc()
            return
        self.failures.labels(cause).inc()
        if status is not None:
            self.requests.labels(CONNECTION_ROUTE, str(status)).inc()

    # BatchObserver
    def batch(self, size: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(padded_tokens)
        self.padding.observe(1 - real_tokens / padded_tokens if padded_tokens else 0.0)
        self.inference_seconds.observe(seconds)
        self.tokens.inc(real_tokens)
        self.sequences.inc(size)

    def queue(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def waited(self, seconds: float) -> None:
        self.queue_seconds.observe(seconds)
