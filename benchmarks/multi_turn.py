"""Multi-turn chat benchmark: several conversations at once, each sharing one long system prompt and sending
its growing history every turn; time to first token per turn, with and without prefix caching, against
llama.cpp's `llama-server` (its per-slot prompt cache is on by default), in one run.

A turn's prompt is the system prompt (~1,500 tokens), every earlier question and answer, and a new question;
answers are `--max-tokens` long (greedy). Turn 1 of the first conversation computes the system prompt; every
later prompt repeats a prefix a cache can serve. llama-server runs `-np <conversations>` slots of
`--context / conversations` tokens each, so every conversation fits its slot.

Usage:  python benchmarks/multi_turn.py [--systems longserve,longserve-nocache,llama-server]
            [--conversations 4] [--turns 4] [--max-tokens 32] [--distinct-system]
        --systems longserve-2w,longserve-2w-cache compares dispatch over two workers (`_multi_worker.py`).
Results: benchmarks/results/multi_turn-<timestamp>.json and multi_turn-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from _bench_util import default_model, machine_info
from _serve_systems import LABELS, start_server

HERE = Path(__file__).resolve().parent
TOPICS = ["rivers", "bridges", "volcanoes", "libraries", "bicycles", "glaciers", "markets", "lighthouses"]


def system_prompt(reader: int | None = None) -> str:
    """A fixed ~1,500-token system prompt (varied sentences, so tokenizers cannot compress it); with a reader,
    one that differs from every other reader's from its first token (a per-user document)."""
    rules = [
        f"Rule {i}: when the user asks about {TOPICS[i % len(TOPICS)]}, answer in plain words, give one concrete "
        f"example from region {i * 7 % 13}, and never mention item number {i * 31 % 97}."
        for i in range(48)
    ]
    opening = "" if reader is None else f"Reader {reader} of the guide asks the questions below. "
    return opening + "You are a careful assistant for a travel guide. " + " ".join(rules)


def question(conversation: int, turn: int) -> str:
    return f"Conversation {conversation}, question {turn}: tell me one fact about {TOPICS[(conversation + turn) % 8]}."


async def chat_turn(
    session: aiohttp.ClientSession, base_url: str, model: str, messages: list, max_tokens: int
):
    """One streamed turn: (TTFT s, answer text, cached prompt tokens or None, prompt tokens or None)."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "repeat_penalty": 1.0,
    }
    sent = time.perf_counter()
    ttft, text, usage, timings = None, "", None, None
    async with session.post(f"{base_url}/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {}).get("content")
                if delta:
                    ttft = ttft if ttft is not None else time.perf_counter() - sent
                    text += delta
            usage = chunk.get("usage") or usage
            timings = (
                chunk.get("timings") or timings
            )  # llama-server: cache_n prompt tokens came from its cache
    if timings is not None and "cache_n" in timings:
        cached = timings["cache_n"]
    elif usage is not None:  # OpenAI's field; longserve sends it when some tokens were cached
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    else:
        cached = None
    ttft = ttft if ttft is not None else time.perf_counter() - sent
    return ttft, text, cached, (usage or {}).get("prompt_tokens")


async def run_workload(
    base_url: str, model: str, conversations: int, turns: int, max_tokens: int, distinct: bool = False
) -> dict:
    timeout = aiohttp.ClientTimeout(total=900)
    # A fresh connection per turn: llama-server closes idle keep-alive connections, and a reused one that it
    # closed fails the request.
    connector = aiohttp.TCPConnector(limit=conversations, force_close=True)
    records: list[dict] = []

    async def conversation(index: int) -> None:
        messages = [{"role": "system", "content": system_prompt(index if distinct else None)}]
        for turn in range(1, turns + 1):
            messages.append({"role": "user", "content": question(index, turn)})
            ttft, answer, cached, prompt = await chat_turn(session, base_url, model, messages, max_tokens)
            messages.append({"role": "assistant", "content": answer})
            records.append(
                {"conversation": index, "turn": turn, "ttft_s": ttft, "cached": cached, "prompt": prompt}
            )

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        # warm-up: one short request, so start-up costs stay out of the first turn
        await chat_turn(session, base_url, model, [{"role": "user", "content": "hi"}], 4)
        started = time.perf_counter()
        await asyncio.gather(*(conversation(i) for i in range(conversations)))
        wall = time.perf_counter() - started
    return {"wall_s": wall, "turns": records}


def summarize(records: list[dict]) -> dict:
    first = [r["ttft_s"] for r in records if r["turn"] == 1]
    later = sorted(r["ttft_s"] for r in records if r["turn"] > 1)
    prompts = [r["prompt"] for r in records if r["prompt"]]
    cached = [r["cached"] for r in records if r["cached"] is not None]
    p99 = later[min(len(later) - 1, round(0.99 * (len(later) - 1)))] if later else None
    return {
        "ttft_turn1_p50_ms": 1000 * statistics.median(first),
        "ttft_later_p50_ms": 1000 * statistics.median(later) if later else None,
        "ttft_later_p99_ms": 1000 * p99 if p99 is not None else None,
        "prompt_tokens": sum(prompts) if prompts else None,
        "cache_hit_rate": sum(cached) / sum(prompts)
        if cached and prompts and len(cached) == len(records)
        else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default="longserve,longserve-nocache,llama-server")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--context", type=int, default=16384, help="llama-server's total context")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--distinct-system",
        action="store_true",
        help="each conversation its own system prompt (nothing shared across conversations)",
    )
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    results = {"machine": machine_info(), "args": vars(args), "systems": {}}
    for system in args.systems.split(","):
        print(f"[multi_turn] {LABELS[system]}: starting ...", flush=True)
        with tempfile.TemporaryDirectory() as logs:
            server = start_server(
                system, default_model(), args.threads, Path(logs),
                llama_slots=args.conversations, llama_context=args.context,
            )  # fmt: skip
            try:
                run = asyncio.run(
                    run_workload(
                        server.base_url,
                        server.model,
                        args.conversations,
                        args.turns,
                        args.max_tokens,
                        args.distinct_system,
                    )
                )
            finally:
                server.stop()
        run["summary"] = summarize(run["turns"])
        results["systems"][system] = run
        print(f"[multi_turn] {system}: {run['summary']} ({run['wall_s']:.1f} s)", flush=True)
    print(
        f"\nmulti_turn: {args.conversations} conversations x {args.turns} turns, {args.max_tokens} tokens per answer"
    )
    print(
        f"{'system':<20} {'turn-1 TTFT p50':>16} {'later TTFT p50':>15} {'later p99':>10} {'hit rate':>9} {'wall s':>7}"
    )
    for system, run in results["systems"].items():
        s = run["summary"]
        hit = f"{s['cache_hit_rate']:.0%}" if s["cache_hit_rate"] is not None else "n/a"
        print(
            f"{system:<20} {s['ttft_turn1_p50_ms']:>13.0f} ms {s['ttft_later_p50_ms']:>12.0f} ms "
            f"{s['ttft_later_p99_ms']:>7.0f} ms {hit:>9} {run['wall_s']:>7.1f}"
        )
    if not args.no_save:
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in (f"multi_turn-{stamp}.json", "multi_turn-latest.json"):
            (out / name).write_text(json.dumps(results, indent=1))
        print(f"wrote benchmarks/results/multi_turn-{stamp}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
