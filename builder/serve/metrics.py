"""The server's Prometheus metrics (``GET /metrics``): one registry per server, every name
``olive_server_*``."""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """Every metric the server exports, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("olive_server_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("olive_server_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_tokens = Counter("olive_server_cached_prompt_tokens", "Prompt tokens the engine reused",
                                     registry=r)
        self.completion_tokens = Counter("olive_server_completion_tokens", "Tokens generated", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("olive_server_time_to_first_token_seconds", "Time to first token", buckets=buckets, registry=r)
        self.latency = Histogram("olive_server_request_duration_seconds", "Request latency", ["endpoint"],
                                 buckets=buckets, registry=r)
        self.cancelled = Counter("olive_server_cancelled_generations", "Generations stopped early (client gone, "
                                 "stop sequence or shutdown)", registry=r)
        self.in_flight = Gauge("olive_server_requests_generating", "Requests generating now", registry=r)
        self.waiting = Gauge("olive_server_requests_waiting", "Requests waiting for a generation slot", registry=r)
        self.paths = Counter("olive_server_generations", "Generations by path (engine: batched; generator: "
                             "what the engine cannot serve, adapters included)", ["path"], registry=r)
        self.adapter_generations = Counter("olive_server_adapter_generations", "Generations with a LoRA adapter "
                                           "active (on the generator path: og.Engine has no adapter API)",
                                           ["adapter"], registry=r)
        self.loop_lag = Histogram("olive_server_event_loop_lag_seconds", "How late the event loop woke up (sampled "
                                  "every 20 ms)", buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02,
                                                           0.05, 0.1, 0.25, 1), registry=r)
        self.batch_occupancy = Gauge("olive_server_batch_occupancy", "Requests in the engine's last step", registry=r)
        self.rebatches = Counter("olive_server_engine_rebatches", "Running turns paused so that waiting requests "
                                 "join the batch", registry=r)
        self.engine_step_batch = Histogram("olive_server_engine_step_requests", "Requests that got a token in one "
                                           "engine step", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)

    async def watch_loop_lag(self, interval: float = 0.02) -> None:
        """How late the event loop wakes up: what any blocking work on it costs every client."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag.observe(max(0.0, loop.time() - due))

    def exposition(self) -> tuple[bytes, str]:
        """The text format Prometheus scrapes, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
