"""A client that reads slower than tokens arrive: its deltas coalesce (one pending delta per prompt, however far
behind it is), and it slows no other stream."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
from api_fakes import MODEL, create_fake_controller, create_fake_worker
from servers import serve_app, wait_until

from longserve.config import ServeConfig
from longserve.engine.protocol import RequestDelta, SequenceDelta, TokenLogprob
from longserve.serve.api_server import create_api_app
from longserve.serve.generation import Generation


def test_deltas_for_a_reader_that_is_behind_merge_into_one() -> None:
    upstream = SimpleNamespace(request_timeout_s=None, sse_keepalive_s=15.0)
    generation = Generation(upstream, None, MODEL, [], None)
    for step in range(1000):
        seqs = [SequenceDelta(i, [step], [TokenLogprob(step, -1.0, 1, [])], None) for i in range(2)]
        generation._deliver(0, RequestDelta("r", seqs))
    generation._deliver(
        0, RequestDelta("r", [SequenceDelta(1, [7], [TokenLogprob(7, -1.0, 1, [])], "stop")], True)
    )
    (merged,) = generation._news.values()
    assert [len(s.token_ids) for s in merged.seqs] == [1000, 1001] and len(merged.seqs[1].logprobs) == 1001
    assert merged.finished and merged.seqs[1].finish_reason == "stop" and merged.seqs[0].finish_reason is None


def test_a_stalled_reader_slows_no_other_stream_and_is_aborted_when_it_leaves() -> None:
    worker_app = create_fake_worker()
    with (
        serve_app(worker_app) as worker_url,
        serve_app(create_fake_controller([worker_url])) as controller_url,
    ):
        with serve_app(create_api_app(ServeConfig(controller_address=controller_url))) as api_url:
            engine = worker_app.state.engine
            stalled_open = threading.Event()
            release = threading.Event()

            def stall() -> None:  # opens a long stream, reads its first bytes, then reads nothing
                body = {"model": MODEL, "prompt": "SLOW", "max_tokens": None, "stream": True}
                with httpx.stream("POST", f"{api_url}/v1/completions", json=body, timeout=60) as response:
                    chunks = response.iter_raw()  # kept: a dropped iterator closes the response at once
                    next(chunks)
                    stalled_open.set()
                    release.wait(30)
                    still_generating.append(engine.aborted == aborted_before)

            aborted_before = engine.aborted
            still_generating: list[bool] = []  # the stalled stream, checked just before its client leaves
            thread = threading.Thread(target=stall, daemon=True)
            thread.start()
            assert stalled_open.wait(20)
            start = time.monotonic()
            for _ in range(5):
                body = {"model": MODEL, "prompt": "ok", "max_tokens": 20, "stream": True}
                text = httpx.post(f"{api_url}/v1/completions", json=body, timeout=20).text
                assert text.endswith("data: [DONE]\n\n") and '"finish_reason":"length"' in text
            assert time.monotonic() - start < 5
            release.set()
            thread.join(10)
            assert still_generating == [True]
            wait_until(
                lambda: engine.aborted == aborted_before + 1, timeout=10, what="the stalled stream's abort"
            )
