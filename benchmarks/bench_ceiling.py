"""How fast the load generator (`longserve bench`) can go: it streams from a trivial OpenAI-shaped server that
answers every completion with ``--max-tokens`` one-token SSE events (pre-encoded), one event per open stream
per loop iteration as an engine step would send them, so only the client limits the rate. Run it on the machine of a serving benchmark: its tokens/s must stay well above (5x) what the
server under test reaches there, or the client, not the server, is measured.

    python benchmarks/bench_ceiling.py [--concurrency 64,256] [--processes 1,4] [--max-tokens 128]
        [--server-processes 4] [--repeats 3]

The trivial server runs ``--server-processes`` processes on one port (SO_REUSEPORT), raw asyncio + uvloop.
Results: benchmarks/results/bench_ceiling-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import time
from pathlib import Path

from _bench_util import machine_info

from longserve.clients.bench import BenchConfig, run_load

RESULTS = Path(__file__).resolve().parent / "results"
_MODELS = b'{"object":"list","data":[{"id":"trivial","object":"model"}]}'


def _frames(max_tokens: int) -> list[bytes]:
    """One request's events, each as an HTTP chunk: ``max_tokens`` one-token events, usage, [DONE]."""
    event = b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"trivial","choices":'
    token = event + b'[{"index":0,"text":" a","logprobs":null,"finish_reason":null}]}\n\n'
    last = event + b'[{"index":0,"text":" a","logprobs":null,"finish_reason":"length"}]}\n\n'
    usage = event + b'[],"usage":{"prompt_tokens":8,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (
        max_tokens,
        max_tokens + 8,
    )
    events = [token] * (max_tokens - 1) + [last, usage + b"data: [DONE]\n\n"]
    return [b"%x\r\n%s\r\n" % (len(e), e) for e in events] + [b"0\r\n\r\n"]


class _Steps:
    """Writes one event to every open stream per loop iteration, as an engine step would."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.streams: dict[asyncio.StreamWriter, list] = {}  # writer -> [next frame index, done future]
        self.wake = asyncio.Event()

    async def run(self) -> None:
        while True:
            if not self.streams:
                self.wake.clear()
                await self.wake.wait()
            for writer, state in list(self.streams.items()):
                writer.write(self.frames[state[0]])
                state[0] += 1
                if state[0] == len(self.frames):
                    del self.streams[writer]
                    state[1].set_result(None)
            await asyncio.sleep(0)

    async def stream(self, writer: asyncio.StreamWriter) -> None:
        done = asyncio.get_running_loop().create_future()
        self.streams[writer] = [0, done]
        self.wake.set()
        await done


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, steps: _Steps) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            if head.startswith(b"POST"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                )
                await steps.stream(writer)
            else:  # /health and /v1/models
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(_MODELS), _MODELS)
                )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _serve(port: int, max_tokens: int) -> None:
    import uvloop

    async def main() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        steps = _Steps(_frames(max_tokens))
        stepper = asyncio.create_task(steps.run())
        server = await asyncio.start_server(lambda r, w: _handle(r, w, steps), sock=sock, backlog=1024)
        await asyncio.gather(server.serve_forever(), stepper)

    uvloop.run(main())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="64,256")
    p.add_argument("--processes", default="1,4", help="client processes (comma-separated)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--requests-per-stream", type=int, default=4, help="requests = concurrency x this")
    p.add_argument("--server-processes", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    servers = [
        context.Process(target=_serve, args=(port, args.max_tokens), daemon=True)
        for _ in range(args.server_processes)
    ]
    for server in servers:
        server.start()
    rows = []
    try:
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            for processes in (int(c) for c in args.processes.split(",")):
                runs = []
                for _ in range(args.repeats):
                    config = BenchConfig(
                        base_url=f"http://127.0.0.1:{port}/v1",
                        num_requests=concurrency * args.requests_per_stream,
                        concurrency=concurrency,
                        endpoint="completion",
                        max_tokens=args.max_tokens,
                        processes=processes,
                        ready_timeout_s=30,
                    )
                    summary = asyncio.run(run_load(config)).summary
                    assert summary.errors == 0, summary.error_samples
                    runs.append(summary.output_tokens_per_s)
                rows.append(
                    {
                        "concurrency": concurrency,
                        "client_processes": processes,
                        "tok_s_median": statistics.median(runs),
                        "tok_s_runs": runs,
                    }
                )
                print(
                    f"c={concurrency:4d} client processes={processes}: {statistics.median(runs):9.0f} tok/s "
                    f"(runs {', '.join(f'{r:.0f}' for r in runs)})",
                    flush=True,
                )
    finally:
        for server in servers:
            server.kill()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_ceiling-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": machine_info(), "args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
