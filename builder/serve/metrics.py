"""The server's Prometheus metrics (``GET /metrics``): one registry per server, its own names
``olive_server_*``, and beside them the signals routers and autoscalers read, under the names of
the Gateway API Inference Extension's model-server protocol (docs/proposals/003-model-server-
protocol: the vLLM column, which its endpoint picker reads by default):

- ``vllm:num_requests_waiting`` (TotalQueuedRequests) and ``vllm:num_requests_running``
  (TotalRunningRequests), gauges labelled ``model_name``: requests waiting for a generation slot,
  and requests holding one;
- ``vllm:kv_cache_usage_perc`` (KVCacheUtilization), a gauge from 0 to 1 labelled ``model_name``.
  onnxruntime-genai 0.18 reports no cache use (``og.Engine`` has only its capabilities), and its
  cache is not paged: each request's cache holds its prompt and the tokens generated so far, up
  to the model's ``search.max_length``. So the figure is the tokens the running requests' caches
  hold (prompt + generated) over what the generation slots can hold (slots x context length);
- ``vllm:lora_requests_info``, the LoRA info gauge: its value is the time of the scrape (the
  endpoint picker keeps the latest), its labels ``max_lora`` (adapters that can be resident at
  once: every adapter is loaded at start and none can be added, so their number),
  ``running_lora_adapters`` (the adapters loaded and ready: all of them, as the ids requests name
  them, ``<base>:<adapter>``) and ``waiting_lora_adapters`` (those of requests waiting for a slot),
  comma-separated. Exported with ``max_lora="0"`` and empty lists for a model without adapters.

No ``vllm:cache_config_info``: the protocol's block size and block count describe a paged cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class Load:
    """What the scheduler reports at a scrape (the event loop's own state)."""

    running: int
    waiting: int
    kv_tokens: int  # tokens the running requests' KV caches hold
    waiting_adapters: tuple[str, ...]  # the adapters of the waiting requests


@dataclass(frozen=True)
class Capacity:
    """What the loaded model can hold: set once it has loaded."""

    kv_tokens: int  # generation slots x context length
    adapters: tuple[str, ...]  # every adapter loaded


class RouterSignals(Collector):
    """The model-server protocol's metrics, read from the scheduler at each scrape (nothing to keep in step)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.load: Callable[[], Load] | None = None
        self.capacity = Capacity(0, ())

    def collect(self) -> Iterator[Metric]:
        load = self.load() if self.load is not None else Load(0, 0, 0, ())
        labels = [self.model_name]
        for name, doc, value in (
            ("vllm:num_requests_running", "Requests holding a generation slot (TotalRunningRequests)", load.running),
            ("vllm:num_requests_waiting", "Requests waiting for a generation slot (TotalQueuedRequests)", load.waiting),
            ("vllm:kv_cache_usage_perc", "Tokens the running requests' KV caches hold over what the generation slots "
             "can hold (slots x context length), from 0 to 1 (KVCacheUtilization)",
             min(1.0, load.kv_tokens / self.capacity.kv_tokens) if self.capacity.kv_tokens else 0.0),
        ):
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            yield family
        lora = GaugeMetricFamily("vllm:lora_requests_info", "LoRA adapters: max_lora resident at once, "
                                 "running_lora_adapters loaded and ready, waiting_lora_adapters of waiting requests; "
                                 "the value is the time of the scrape",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        # As requests name them (`model: "<base>:<adapter>"`): the endpoint picker matches these to requests.
        def served(names: tuple[str, ...]) -> str:
            return ",".join(f"{self.model_name}:{name}" for name in names)

        lora.add_metric([str(len(self.capacity.adapters)), served(self.capacity.adapters),
                         served(load.waiting_adapters)], time.time())
        yield lora


class Metrics:
    """Every metric the server exports, in its own registry."""

    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.router = RouterSignals(model_name)
        r.register(self.router)
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
        self.stalled_dropped = Counter("olive_server_stalled_clients_dropped", "Connections dropped because their "
                                       "client read nothing for --write-timeout", registry=r)
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
