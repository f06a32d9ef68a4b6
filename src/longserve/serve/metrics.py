"""Prometheus metrics of the API server, in a per-app registry, named as vLLM names them where it has a name.

Request timings (TTFT, inter-token latency, end-to-end) and token counters are measured here, on the worker
streams as they pass through. Engine state (running/waiting sequences, KV cache usage) belongs to the workers:
it is fetched at scrape time from each worker's ``/worker_get_status`` (the controller's ``/list_workers`` says
where they are, and its last known status stands in for a worker that does not answer).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from longserve.serve.worker_protocol import (
    ListWorkersResponse,
    SpecDecodeCounts,
    WorkerInfo,
    WorkerStatus,
    WorkerStreamChunk,
)

SCRAPE_TIMEOUT = aiohttp.ClientTimeout(
    total=2.0, sock_connect=1.0
)  # a scrape must not hang on one dead worker

# Buckets as vLLM's (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)


class _EngineCounters:
    """The workers' own running totals, as of the last refresh, exposed as counters: the prefix cache's
    (``vllm:prefix_cache_queries_total`` / ``_hits_total``, in tokens) and speculative decoding's
    (``vllm:spec_decode_num_drafts_total``, ``..._num_draft_tokens_total``, ``..._num_accepted_tokens_total``
    and ``..._num_accepted_tokens_per_pos_total`` by position)."""

    def __init__(self) -> None:
        self.prefix: dict[str, tuple[int, int]] = {}  # model name -> (queries, hits)
        self.spec: dict[str, SpecDecodeCounts] = {}  # model name -> summed over its workers

    def add(self, name: str, status: WorkerStatus) -> None:
        queries, hits = self.prefix.get(name, (0, 0))
        self.prefix[name] = (queries + status.prefix_cache_queries, hits + status.prefix_cache_hits)
        if status.spec_decode is None:
            return
        total, new = self.spec.setdefault(name, SpecDecodeCounts()), status.spec_decode
        total.num_drafts += new.num_drafts
        total.num_draft_tokens += new.num_draft_tokens
        total.num_accepted_tokens += new.num_accepted_tokens
        width = max(len(total.accepted_per_position), len(new.accepted_per_position))
        total.accepted_per_position = [
            sum(
                counts[i]
                for counts in (total.accepted_per_position, new.accepted_per_position)
                if i < len(counts)
            )
            for i in range(width)
        ]

    def collect(self):
        model = ["model_name"]
        queries = CounterMetricFamily(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels=model
        )
        hits = CounterMetricFamily(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels=model
        )
        for name, (q, h) in self.prefix.items():
            queries.add_metric([name], q)
            hits.add_metric([name], h)
        yield queries
        yield hits
        if not self.spec:
            return
        families = {
            field: CounterMetricFamily(f"vllm:spec_decode_{field}", help_text, labels=model)
            for field, help_text in (
                ("num_drafts", "Verifications of a sequence's drafts."),
                ("num_draft_tokens", "Draft tokens proposed."),
                ("num_accepted_tokens", "Draft tokens accepted."),
            )
        }
        per_position = CounterMetricFamily(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each position of a run.",
            labels=["model_name", "position"],
        )
        for name, counts in self.spec.items():
            for field, family in families.items():
                family.add_metric([name], getattr(counts, field))
            for position, accepted in enumerate(counts.accepted_per_position):
                per_position.add_metric([name, str(position)], accepted)
        yield from families.values()
        yield per_position


class ApiMetrics:
    """All metrics of one API server app; ``render()`` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, model = self.registry, ["model_name"]
        self.running = Gauge(
            "vllm:num_requests_running", "Sequences running in the engines.", model, registry=r
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Sequences waiting in the engines.", model, registry=r
        )
        self.kv_cache_usage = Gauge(
            "vllm:kv_cache_usage_perc",
            "KV cache usage per worker (1 = full).",
            ["model_name", "worker"],
            registry=r,
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", model, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", model, registry=r)
        self.request_success = Counter(
            "vllm:request_success",
            "Completions finished, by reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            model,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between tokens.", model, buckets=ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Request latency.", model, buckets=E2E_BUCKETS, registry=r
        )
        self.in_flight = Gauge(
            "longserve:api_requests_in_flight", "Generation requests the API server is handling.", registry=r
        )
        self.stream_errors = Counter(
            "longserve:worker_stream_errors",
            "Worker streams that failed after they started.",
            model,
            registry=r,
        )
        self.workers = Gauge(
            "longserve:workers", "Workers the controller knows, per model.", model, registry=r
        )
        self.worker_queue_length = Gauge(
            "longserve:worker_queue_length",
            "Requests in flight on each worker (running or waiting for a slot).",
            ["model_name", "worker"],
            registry=r,
        )
        self.worker_rejected = Gauge(
            "longserve:worker_rejected_requests",
            "Requests each worker turned away with 429 (its queue was full) since it started.",
            ["model_name", "worker"],
            registry=r,
        )
        self.draining = Gauge(
            "longserve:draining", "1 while this API server drains (shutting down).", registry=r
        )
        per_worker = ["model_name", "worker"]
        self.worker_draining = Gauge(
            "longserve:worker_draining", "1 while a worker drains (shutting down).", per_worker, registry=r
        )
        self.engine_stalls = Gauge(
            "longserve:engine_stalls_total",
            "Engine cores each worker restarted because no step completed within the stall timeout.",
            per_worker,
            registry=r,
        )
        self.engine_restarts = Gauge(
            "longserve:engine_restarts_total",
            "Engine cores each worker restarted (died or stalled) since it started.",
            per_worker,
            registry=r,
        )
        self.lora_info = Gauge(
            "vllm:lora_requests_info",
            "LoRA adapters with running and waiting requests, per worker (the value: when it was read).",
            ["worker", "running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            registry=r,
        )
        self.engine_counters = _EngineCounters()
        r.register(self.engine_counters)
        self.rejected = Counter(
            "longserve:api_requests_rejected",
            "Requests this API server answered with 429, by reason.",
            ["reason"],
            registry=r,
        )

    async def refresh_workers(self, session: aiohttp.ClientSession, controller_address: str) -> None:
        """Engine gauges from the workers, best effort: an unreachable controller leaves them empty."""
        try:
            content = await _post(session, f"{controller_address}/list_workers")
            workers = ListWorkersResponse.model_validate_json(content).workers
        except (aiohttp.ClientError, TimeoutError, ValueError):
            workers = []
        statuses = await asyncio.gather(*(_live_status(session, w) for w in workers))
        per_worker = (self.kv_cache_usage, self.worker_queue_length, self.worker_rejected, self.worker_draining,
                      self.engine_stalls, self.engine_restarts)  # fmt: skip
        for gauge in (self.running, self.waiting, self.workers, self.lora_info, *per_worker):
            gauge.clear()  # workers that left must not linger with their last value
        counters = _EngineCounters()
        for info, status in zip(workers, statuses, strict=True):
            # A worker serving several names counts once, under its first one.
            name = status.model_names[0] if status.model_names else "unknown"
            self.running.labels(name).inc(status.running)
            self.waiting.labels(name).inc(status.waiting)
            self.kv_cache_usage.labels(name, info.worker_address).set(status.kv_cache_usage)
            self.worker_queue_length.labels(name, info.worker_address).set(status.queue_length)
            self.worker_rejected.labels(name, info.worker_address).set(status.rejected)
            self.worker_draining.labels(name, info.worker_address).set(float(status.draining))
            self.engine_stalls.labels(name, info.worker_address).set(status.engine_stalls)
            self.engine_restarts.labels(name, info.worker_address).set(status.engine_restarts)
            if status.max_loras:
                running, waiting = ",".join(status.running_loras), ",".join(status.waiting_loras)
                self.lora_info.labels(info.worker_address, running, waiting, str(status.max_loras)).set(
                    time.time()
                )
            self.workers.labels(name).inc()
            counters.add(name, status)
        self.engine_counters.prefix, self.engine_counters.spec = counters.prefix, counters.spec

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def _post(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.post(url, data=b"{}", timeout=SCRAPE_TIMEOUT) as response:
        response.raise_for_status()
        return await response.read()


async def _live_status(session: aiohttp.ClientSession, info: WorkerInfo) -> WorkerStatus:
    try:
        return WorkerStatus.model_validate_json(
            await _post(session, f"{info.worker_address}/worker_get_status")
        )
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return info.status


class RequestRecorder:
    """Timings and token counts of one client request as its worker streams go by (one stream per prompt)."""

    def __init__(self, metrics: ApiMetrics, model: str) -> None:
        self.metrics = metrics
        self.model = model
        self.start = time.perf_counter()
        self._first_token_seen: set[int] = set()  # prompt indices
        self._last_token_at: dict[tuple[int, int], float] = {}  # (prompt, completion) -> time
        self._tokens_seen: dict[int, int] = {}  # prompt index -> generated tokens so far
        self._done: set[int] = set()
        # This model's series, looked up once: labels() costs a few µs, and these are touched every token.
        self._generated = metrics.generation_tokens.labels(model)
        self._itl = metrics.itl.labels(model)

    def on_chunk(self, prompt: int, chunk: WorkerStreamChunk) -> None:
        t = time.perf_counter()
        labels = self.metrics
        for out in chunk.outputs:
            count = len(out.token_ids)
            if count:
                # Counted as they stream (as vLLM counts per step), so rate() over a long request is live.
                self._generated.inc(count)
                self._tokens_seen[prompt] = self._tokens_seen.get(prompt, 0) + count
                key = (prompt, out.index)
                if prompt not in self._first_token_seen:
                    self._first_token_seen.add(prompt)
                    labels.ttft.labels(self.model).observe(t - self.start)
                last = self._last_token_at.get(key)  # None for a completion's first token
                if last is not None:
                    # Several tokens in one delta arrived together; spread the wait over them.
                    for _ in range(count):
                        self._itl.observe((t - last) / count)
                self._last_token_at[key] = t
            if out.finish_reason is not None:
                labels.request_success.labels(self.model, out.finish_reason).inc()
        if chunk.finished and chunk.error is None and prompt not in self._done:
            self._done.add(prompt)
            labels.e2e.labels(self.model).observe(t - self.start)
            if chunk.usage is not None:
                labels.prompt_tokens.labels(self.model).inc(chunk.usage.prompt_tokens)
                # The worker's usage is the truth; tokens that came without ids in a delta are added here.
                unseen = chunk.usage.completion_tokens - self._tokens_seen.get(prompt, 0)
                if unseen > 0:
                    labels.generation_tokens.labels(self.model).inc(unseen)

    def on_stream_error(self, prompt: int) -> None:
        self.metrics.stream_errors.labels(self.model).inc()
        self._done.add(prompt)
