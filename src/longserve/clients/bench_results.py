"""Load-test results: per-request timings, their aggregate (throughput, TTFT/ITL percentiles), the bounded runner.

Independent of HTTP: the load generator (``longserve.clients.bench``) and in-process measurements (an engine
driven directly, in ``benchmarks/serve_load.py``) both record content-chunk arrival times, turn them into a
``RequestResult`` with ``make_result`` and aggregate with ``summarize``, so every system is timed the same way.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class RequestResult:
    """What one request did, timed on the client; times in seconds."""

    index: int
    ok: bool
    start_s: float  # when it was sent, relative to the start of the run
    e2e_s: float  # send -> end of stream (or failure)
    ttft_s: float | None  # send -> first non-empty content chunk
    itl_s: list[float]  # gaps between consecutive content chunks
    output_tokens: int
    content_chunks: int
    tokens_from_usage: bool  # output_tokens came from the server's usage, not from counting chunks
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    status: int | None = None  # HTTP status, when there was a response

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first, (e2e - ttft) / (tokens - 1): ITL that ignores chunking."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class LatencyStats:
    count: int
    mean: float | None
    p50: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, values: list[float]) -> LatencyStats:
        if not values:
            return cls(0, None, None, None, None)
        ordered = sorted(values)
        return cls(
            len(ordered),
            sum(ordered) / len(ordered),
            percentile(ordered, 50),
            percentile(ordered, 99),
            ordered[-1],
        )


@dataclass
class BenchSummary:
    num_requests: int
    concurrency: int
    completed: int
    errors: int
    duration_s: float  # first send -> last request done
    requests_per_s: float  # completed requests / duration
    output_tokens: int  # over completed requests
    output_tokens_per_s: float
    ttft: LatencyStats
    itl: LatencyStats  # over every content-chunk gap of every completed request
    tpot: LatencyStats  # one value per completed request
    e2e: LatencyStats
    max_in_flight: int  # most requests open at once, as the client saw it
    token_count_source: str  # "usage", "chunks" or "mixed"
    error_samples: list[str]  # up to five distinct error messages


@dataclass
class BenchResult:
    summary: BenchSummary
    requests: list[RequestResult]
    config: dict[str, Any]

    def to_dict(self, with_requests: bool = False) -> dict[str, Any]:
        doc: dict[str, Any] = {"config": self.config, "summary": asdict(self.summary)}
        if with_requests:
            doc["requests"] = [asdict(r) | {"tpot_s": r.tpot_s} for r in self.requests]
        return doc


def percentile(ordered: list[float], q: float) -> float:
    """q-th percentile of sorted values, linear interpolation between closest ranks (numpy's default)."""
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def make_result(
    index: int,
    start_s: float,
    sent: float,
    arrivals: list[float],
    ended: float,
    usage_tokens: int | None = None,
    **extra: Any,
) -> RequestResult:
    """A RequestResult from raw timestamps (perf_counter): ``arrivals`` are the content chunks' arrival times.

    Shared by the HTTP client and by in-process measurements (an engine driven directly), so both are
    timed and counted the same way.
    """
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    error = extra.pop("error", None)
    return RequestResult(
        index=index,
        ok=error is None,
        start_s=start_s,
        e2e_s=ended - sent,
        ttft_s=arrivals[0] - sent if arrivals else None,
        itl_s=gaps,
        output_tokens=usage_tokens if usage_tokens is not None else len(arrivals),
        content_chunks=len(arrivals),
        tokens_from_usage=usage_tokens is not None,
        error=error,
        **extra,
    )


def summarize(
    results: list[RequestResult], concurrency: int, duration_s: float, max_in_flight: int
) -> BenchSummary:
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    tokens = sum(r.output_tokens for r in done)
    sources = {r.tokens_from_usage for r in done}
    duration = max(duration_s, 1e-9)
    return BenchSummary(
        num_requests=len(results),
        concurrency=concurrency,
        completed=len(done),
        errors=len(failed),
        duration_s=duration_s,
        requests_per_s=len(done) / duration,
        output_tokens=tokens,
        output_tokens_per_s=tokens / duration,
        ttft=LatencyStats.of([r.ttft_s for r in done if r.ttft_s is not None]),
        itl=LatencyStats.of([gap for r in done for gap in r.itl_s]),
        tpot=LatencyStats.of([t for r in done if (t := r.tpot_s) is not None]),
        e2e=LatencyStats.of([r.e2e_s for r in done]),
        max_in_flight=max_in_flight,
        token_count_source="mixed" if len(sources) > 1 else ("usage" if sources == {True} else "chunks"),
        error_samples=list(dict.fromkeys(str(r.error) for r in failed))[:5],
    )


async def run_requests(
    one_request: Callable[[int, float], Awaitable[RequestResult]],
    indices: range | list[int],
    concurrency: int,
    run_start: float | None = None,
) -> tuple[list[RequestResult], float, int]:
    """Run ``one_request(index, run_start)`` for every index, at most ``concurrency`` at once, from
    ``run_start`` (a ``time.perf_counter()`` value; default now).

    Returns the results in index order, the run's duration and the most requests seen in flight at once.
    """
    gate = asyncio.Semaphore(concurrency)
    in_flight = peak = 0
    if run_start is None:
        run_start = time.perf_counter()
    await asyncio.sleep(max(0.0, run_start - time.perf_counter()))

    async def guarded(index: int) -> RequestResult:
        nonlocal in_flight, peak
        async with gate:
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await one_request(index, run_start)
            finally:
                in_flight -= 1

    results = await asyncio.gather(*(guarded(i) for i in indices))
    return list(results), time.perf_counter() - run_start, peak


def format_summary(summary: BenchSummary) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f} ms"

    return "\n".join(
        [
            f"requests: {summary.completed}/{summary.num_requests} ok, {summary.errors} errors, "
            f"concurrency {summary.concurrency} (max in flight {summary.max_in_flight})",
            f"duration: {summary.duration_s:.2f} s, {summary.requests_per_s:.2f} req/s",
            f"output: {summary.output_tokens} tokens ({summary.token_count_source}), "
            f"{summary.output_tokens_per_s:.1f} tok/s",
            f"TTFT p50 {ms(summary.ttft.p50)}  p99 {ms(summary.ttft.p99)}",
            f"ITL  p50 {ms(summary.itl.p50)}  p99 {ms(summary.itl.p99)}  (TPOT mean {ms(summary.tpot.mean)})",
            f"e2e  p50 {ms(summary.e2e.p50)}  p99 {ms(summary.e2e.p99)}",
        ]
        + [f"error: {e}" for e in summary.error_samples]
    )
