"""Load generator: concurrent streaming requests against any OpenAI-compatible server; TTFT, ITL, throughput.

    result = asyncio.run(run_load(BenchConfig("http://127.0.0.1:8000/v1", num_requests=16, concurrency=8)))
    print(result.summary.output_tokens_per_s, result.summary.ttft.p50)

    python -m longserve.clients.bench --base-url http://127.0.0.1:8000/v1 -n 16 -c 8 --max-tokens 128

At most ``concurrency`` requests are open at once (an ``asyncio.Semaphore``); all ``num_requests`` are queued at
the start, so the server sees a steady ``concurrency`` until the queue drains. Each request streams (SSE) and is
timed client-side: TTFT is send -> first non-empty content chunk, ITL the gaps between content chunks, e2e send
-> end of stream. Output tokens come from the server's ``usage`` (``stream_options.include_usage``) when it sends
one, else from the number of content chunks (exact for servers that send one token per chunk, llama.cpp's
included; an undercount where a chunk carries several tokens). Prompts are a fixed list, so runs repeat exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import aiohttp

from longserve.clients.bench_results import (
    BenchResult,
    BenchSummary,
    LatencyStats,
    RequestResult,
    format_summary,
    make_result,
    run_requests,
    summarize,
)

__all__ = [
    "BenchConfig",
    "BenchResult",
    "BenchSummary",
    "LatencyStats",
    "RequestResult",
    "default_prompts",
    "format_summary",
    "main",
    "run_load",
]

_TOPICS = (
    "the history of the printing press and how it changed Europe",
    "how a steam engine works, part by part",
    "the water cycle, from the ocean to the clouds and back",
    "why the Roman Empire fell",
    "how to plan a vegetable garden for a whole year",
    "the life cycle of a star",
    "how computers store numbers and text",
    "the causes and effects of the industrial revolution",
)
_PADDING = (
    "Please be thorough: cover the background, the main ideas, several concrete examples, common "
    "misconceptions and a summary at the end. Use plain language that a curious student can follow. "
)


def default_prompts() -> tuple[str, ...]:
    """Sixteen deterministic prompts of different lengths (~15 to ~130 words) that ask for long answers."""
    prompts = []
    for i in range(16):
        topic = _TOPICS[i % len(_TOPICS)]
        # i // 2 repetitions of the padding vary the prompt length while keeping every prompt distinct.
        prompts.append(f"Write a long, detailed essay about {topic}. " + _PADDING * (i // 2))
    return tuple(prompts)


@dataclass(frozen=True)
class BenchConfig:
    """One load run: which server, how many requests, how many at once, what each asks for."""

    base_url: str  # OpenAI base URL, e.g. "http://127.0.0.1:8000/v1"
    num_requests: int = 16
    concurrency: int = 8  # requests open at once
    model: str | None = None  # None: the first model /models lists
    endpoint: Literal["chat", "completion"] = "chat"
    max_tokens: int = 128
    temperature: float = 0.0
    ignore_eos: bool = False  # vLLM/longserve extension; servers that ignore unknown fields are unaffected
    include_usage: bool = True  # ask for stream_options.include_usage (token counts from the server)
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body
    # Request i uses prompts[i % len]; a prompt may be token ids (completions only).
    prompts: tuple[str | list[int], ...] = field(default_factory=default_prompts)
    api_key: str | None = None
    timeout_s: float = 600.0  # per request, connect to last byte
    warmup_requests: int = 0  # sent one at a time before the measurement, not counted
    ready_timeout_s: float = 60.0  # wait this long for the server's /health to answer 200 before sending
    # Client processes sharing the load (requests and concurrency split evenly): one Python process parses
    # some tens of thousands of SSE events a second, less than a GPU server can stream.
    processes: int = 1

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.concurrency < 1 or self.max_tokens < 1 or self.processes < 1:
            raise ValueError("num_requests, concurrency, max_tokens and processes must be >= 1")
        if not self.prompts:
            raise ValueError("prompts must not be empty")


async def sse_data(stream: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The ``data`` payload of each server-sent event (multi-line data joined by newlines, as the spec says)."""
    lines: list[str] = []
    async for raw in stream:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:  # a blank line ends an event
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(" ") else value)
        # comments (": ping"), "event:", "id:" and "retry:" lines carry nothing we time
    if lines:
        yield "\n".join(lines)


# Idle pooled connections the server closed fail one by one; several may sit in the pool after a pause.
_STALE_RETRIES = 3


class _Client:
    """Builds request bodies for one BenchConfig and streams them over a shared aiohttp session."""

    def __init__(self, config: BenchConfig, session: aiohttp.ClientSession, model: str) -> None:
        self.config, self.session, self.model = config, session, model
        path = "chat/completions" if config.endpoint == "chat" else "completions"
        self.url = f"{config.base_url.rstrip('/')}/{path}"

    def body(self, index: int, max_tokens: int | None = None) -> dict[str, Any]:
        cfg = self.config
        prompt = cfg.prompts[index % len(cfg.prompts)]
        body: dict[str, Any] = {"model": self.model, "stream": True, "temperature": cfg.temperature}
        body["max_tokens"] = max_tokens or cfg.max_tokens
        if cfg.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if cfg.include_usage:
            body["stream_options"] = {"include_usage": True}
        if cfg.ignore_eos:
            body["ignore_eos"] = True
        body |= cfg.extra_body
        if "min_tokens" in body:  # a shortened request (the warm-up) keeps min_tokens <= max_tokens
            body["min_tokens"] = min(body["min_tokens"], body["max_tokens"])
        return body

    async def request(self, index: int, run_start: float, max_tokens: int | None = None) -> RequestResult:
        sent = time.perf_counter()
        arrivals: list[float] = []
        usage: dict[str, Any] = {}
        info: dict[str, Any] = {"finish_reason": None, "status": None}
        error: str | None = None
        for attempt in range(_STALE_RETRIES + 1):
            try:
                async with self.session.post(self.url, json=self.body(index, max_tokens)) as resp:
                    info["status"] = resp.status
                    if resp.status != 200:
                        error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                    else:
                        error = await self._consume(resp, arrivals, usage, info)
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                # A pooled keep-alive connection the server had already closed fails before any answer
                # (llama-server closes idle ones): the request never reached it, so send it once more.
                if info["status"] is None and not arrivals and attempt < _STALE_RETRIES:
                    sent = time.perf_counter()
                    continue
            except (
                aiohttp.ClientError,
                TimeoutError,
                ValueError,
            ) as exc:  # ValueError: undecodable/oversized line
                error = f"{type(exc).__name__}: {exc}"
            break
        ended = time.perf_counter()
        return make_result(
            index,
            sent - run_start,
            sent,
            arrivals,
            ended,
            usage_tokens=usage.get("completion_tokens"),
            prompt_tokens=usage.get("prompt_tokens"),
            error=error,
            **info,
        )

    async def _consume(
        self, resp: aiohttp.ClientResponse, arrivals: list[float], usage: dict, info: dict
    ) -> str | None:
        """Read one SSE stream; returns an error message, or None when it ended properly with [DONE]."""
        async for data in sse_data(resp.content):
            if data.strip() == "[DONE]":
                return None
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                return f"bad SSE data: {data[:200]!r}"
            if "error" in chunk:
                return f"error event: {json.dumps(chunk['error'])[:300]}"
            if chunk.get("usage"):
                usage.update(chunk["usage"])
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                text = delta.get("content") if self.config.endpoint == "chat" else choice.get("text")
                if text:
                    arrivals.append(time.perf_counter())
                info["finish_reason"] = choice.get("finish_reason") or info["finish_reason"]
        return "stream ended without [DONE]"


async def wait_until_ready(session: aiohttp.ClientSession, base_url: str, timeout_s: float) -> None:
    """Wait for ``GET /health`` (beside ``/v1``) to answer 200, as longserve, vLLM and llama-server do once they
    can serve; a server without that route (404) counts as ready. RuntimeError after ``timeout_s``."""
    url = base_url.rstrip("/").removesuffix("/v1") + "/health"
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status in (200, 404):
                    return
                last = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s ({last})")
        await asyncio.sleep(0.1)


async def first_model(session: aiohttp.ClientSession, base_url: str) -> str:
    async with session.get(f"{base_url.rstrip('/')}/models") as resp:
        resp.raise_for_status()
        models = (await resp.json())["data"]
    if not models:
        raise RuntimeError(f"{base_url}/models lists no model")
    return models[0]["id"]


async def run_load(config: BenchConfig) -> BenchResult:
    """Send ``config.num_requests`` streaming requests, ``config.concurrency`` at a time; time every one."""
    async with _session(config) as session:
        await wait_until_ready(session, config.base_url, config.ready_timeout_s)
        model = config.model or await first_model(session, config.base_url)
        client = _Client(config, session, model)
        for i in range(config.warmup_requests):
            warm = await client.request(i, time.perf_counter(), max_tokens=min(8, config.max_tokens))
            if not warm.ok:
                raise RuntimeError(f"warm-up request failed: {warm.error}")
        if config.processes == 1:
            results, duration, peak = await run_requests(
                client.request, range(config.num_requests), config.concurrency
            )
        else:
            results, duration, peak = await _run_in_processes(config, model)
    conf = asdict(config) | {"model": model, "prompts": len(config.prompts)}
    conf.pop("api_key")
    return BenchResult(summarize(results, config.concurrency, duration, peak), results, conf)


def _session(config: BenchConfig) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    # One connection per concurrent request, so the semaphore, not the connection pool, sets the load.
    connector = aiohttp.TCPConnector(limit=config.concurrency)
    return aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector)


async def _run_in_processes(config: BenchConfig, model: str) -> tuple[list[RequestResult], float, int]:
    """The run split over ``config.processes`` processes that start together; results merged in order."""
    count = min(config.processes, config.concurrency, config.num_requests)
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(count, mp_context=context) as pool:
        # Every process up and its imports done before the clock starts.
        await asyncio.gather(*(loop.run_in_executor(pool, time.sleep, 0.3) for _ in range(count)))
        start_at = time.perf_counter() + 0.2  # CLOCK_MONOTONIC: one clock for every process of this host
        shares = [
            loop.run_in_executor(
                pool,
                _run_share,
                config,
                model,
                list(range(i, config.num_requests, count)),
                config.concurrency // count + (i < config.concurrency % count),
                start_at,
            )
            for i in range(count)
        ]
        done = await asyncio.gather(*shares)
    results = sorted((r for share, _, _ in done for r in share), key=lambda r: r.index)
    return results, max(end for _, end, _ in done) - start_at, sum(peak for _, _, peak in done)


def _run_share(
    config: BenchConfig, model: str, indices: list[int], concurrency: int, start_at: float
) -> tuple[list[RequestResult], float, int]:
    """One client process's part of the run (the target of ``_run_in_processes``)."""

    async def share() -> tuple[list[RequestResult], float, int]:
        async with _session(replace(config, concurrency=concurrency)) as session:
            client = _Client(config, session, model)
            results, _, peak = await run_requests(client.request, indices, concurrency, start_at)
            return results, time.perf_counter(), peak

    return asyncio.run(share())


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="model name (default: the first one the server lists)")
    p.add_argument("-n", "--requests", type=int, default=16, help="total requests")
    p.add_argument("-c", "--concurrency", type=int, default=8, help="requests open at once")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--endpoint", choices=["chat", "completion"], default="chat")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM/longserve extension)")
    p.add_argument("--no-usage", action="store_true", help="do not ask for stream_options.include_usage")
    p.add_argument("--extra-body", default="{}", help="JSON object merged into every request body")
    p.add_argument("--api-key")
    p.add_argument("--warmup", type=int, default=1, help="short requests sent before measuring")
    p.add_argument(
        "--ready-timeout", type=float, default=60.0, help="seconds to wait for /health 200 before sending"
    )
    p.add_argument("--processes", type=int, default=1, help="client processes sharing the load")
    p.add_argument("--json", dest="json_path", help="write the summary and per-request results here")
    args = p.parse_args(argv)
    try:
        config = BenchConfig(
            base_url=args.base_url,
            num_requests=args.requests,
            concurrency=args.concurrency,
            model=args.model,
            endpoint=args.endpoint,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            ignore_eos=args.ignore_eos,
            include_usage=not args.no_usage,
            extra_body=json.loads(args.extra_body),
            api_key=args.api_key,
            warmup_requests=args.warmup,
            ready_timeout_s=args.ready_timeout,
            processes=args.processes,
        )
        result = asyncio.run(run_load(config))
    except (ValueError, RuntimeError, aiohttp.ClientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(result.summary))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result.to_dict(with_requests=True), f, indent=2)
    return 0 if result.summary.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
