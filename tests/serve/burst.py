"""Test helper: ``count`` concurrent completions requests at once (every other one streamed), as a burst of
clients would send them; returns each one's status, latency, headers and body."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx


@dataclass
class Answer:
    status: int
    elapsed_s: float
    headers: httpx.Headers
    body: bytes

    @property
    def streamed(self) -> bool:
        return self.headers.get("content-type", "").startswith("text/event-stream")


def burst(api_url: str, model: str, count: int, max_tokens: int = 16) -> list[Answer]:
    async def one(client: httpx.AsyncClient, i: int) -> Answer:
        start = time.monotonic()
        body = {"model": model, "prompt": f"Request {i}", "max_tokens": max_tokens, "stream": i % 2 == 0}
        async with client.stream("POST", f"{api_url}/v1/completions", json=body) as response:
            raw = await response.aread()
        return Answer(response.status_code, time.monotonic() - start, response.headers, raw)

    async def run() -> list[Answer]:
        limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=180, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(count)))

    return asyncio.run(run())


def check_burst(answers: list[Answer], min_ok: int, max_429_s: float) -> None:
    """Only 200s and quick 429s in OpenAI's shape; streams end with [DONE] and no error event."""
    statuses = [a.status for a in answers]
    others = [(a.status, round(a.elapsed_s, 2), a.body[:300]) for a in answers if a.status not in (200, 429)]
    assert not others, (sorted(set(statuses)), others[:3])  # (what a 503 said: no worker, or one that failed)
    assert statuses.count(200) >= min_ok, statuses.count(200)
    for answer in answers:
        if answer.status == 429:
            error = json.loads(answer.body)["error"]
            assert error["code"] == "rate_limit_exceeded" and int(answer.headers["retry-after"]) > 0
            assert answer.elapsed_s < max_429_s, answer.elapsed_s
        elif answer.streamed:
            assert answer.body.rstrip().endswith(b"data: [DONE]") and b'"error"' not in answer.body
