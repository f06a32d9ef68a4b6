"""The whole serving stack on loopback: controller, real workers with a tiny model, the API server, the openai
client. Failover when a worker dies, interleaving of concurrent streams, cleanup after client disconnects."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from servers import unused_port, wait_until
from stack import MODEL, Stack, all_blocks_free


@pytest.fixture(scope="module")
def failover_stack(tiny_llama_dir):
    with Stack(tiny_llama_dir, 2, heart_beat_interval_s=0.3, heart_beat_expiration_s=1.5) as stack:
        yield stack


def test_requests_spread_over_two_workers_and_survive_one_dying(failover_stack):
    stack = failover_stack
    for _ in range(8):
        out = stack.client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=4)
        assert out.choices[0].text is not None
    assert all(count > 0 for count in stack.added), stack.added

    stack.kill_worker(0)
    for _ in range(6):  # the controller still lists the dead worker: the API server must fail over
        out = stack.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert out.choices[0].finish_reason in ("stop", "length")
    wait_until(lambda: stack.worker_urls[0] not in stack.live_workers(), timeout=10, what="expiry")
    assert stack.live_workers() == [stack.worker_urls[1]]


@pytest.fixture(scope="module")
def single_stack(tiny_llama_dir):
    with Stack(tiny_llama_dir, 1) as stack:
        yield stack


def test_32_concurrent_streams_complete_and_interleave(single_stack):
    stack = single_stack
    client = openai.AsyncOpenAI(base_url=f"{stack.api_url}/v1", api_key="unused", max_retries=0)
    events: list[tuple[int, float]] = []
    engine = stack.engines[0].engine
    peak_running = 0
    original_step = engine.step

    def observed_step():
        nonlocal peak_running
        peak_running = max(peak_running, len(engine.scheduler.running))
        return original_step()

    engine.step = observed_step

    async def one(i: int) -> str:
        stream = await client.completions.create(
            model=MODEL,
            prompt=f"Request {i}:",
            max_tokens=48,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        text = ""
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                events.append((i, time.monotonic()))
                text += chunk.choices[0].text
        return text

    async def main():
        return await asyncio.gather(*(one(i) for i in range(32)))

    try:
        texts = asyncio.run(main())
    finally:
        engine.step = original_step
    assert len(texts) == 32 and all(texts)
    # Interleaved, not one by one: the engine ran many of these sequences in the same steps.
    assert peak_running >= 16, peak_running
    wait_until(lambda: all_blocks_free(stack.engines[0]), what="KV blocks to be freed")


def test_client_disconnect_mid_stream_frees_the_request(single_stack):
    stack = single_stack
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 500,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{stack.api_url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # read one event, then hang up
    wait_until(lambda: all_blocks_free(stack.engines[0]), what="the aborted request's blocks")


def _listed_models(client: openai.OpenAI) -> list[str] | None:
    try:
        return [m.id for m in client.models.list().data]
    except openai.APIError:
        return None


@pytest.mark.parametrize("model", ["llama", "deepseek_v3"], ids=["llama", "moe+mla"])
def test_longserve_serve_starts_answers_and_stops_on_ctrl_c(tiny_model_cache, model):
    """`longserve serve --model <directory>`, for a dense model and a MoE model with MLA (DeepSeek-V3)."""
    model_dir = tiny_model_cache.path(model)
    ports = {name: unused_port() for name in ("port", "controller-port", "worker-port")}
    args = [f"--{name}={port}" for name, port in ports.items()]
    command = [
        sys.executable,
        "-m",
        "longserve.cli",
        "serve",
        "--model",
        model_dir,
        "--model-name",
        MODEL,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        command + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        banner = process.stdout.readline()
        assert f"http://127.0.0.1:{ports['port']}/v1" in banner and MODEL in banner
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['port']}/v1", api_key="x", max_retries=0)
        wait_until(lambda: _listed_models(client) == [MODEL], what="the model to be listed")
        out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5)
        assert out.usage.completion_tokens >= 1
        # The engine core process caches full prompt blocks: the same prompt again reads all but the last
        # (partial) block from the cache, and usage says so in OpenAI's shape.
        prompt = "one two three four five six seven eight nine ten " * 6
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        full_blocks = (again.usage.prompt_tokens - 1) // 16 * 16
        assert full_blocks >= 32 and again.usage.prompt_tokens_details.cached_tokens == full_blocks
        chat = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(chat)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].usage.completion_tokens >= 1
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, process.stderr.read()


def test_seeded_sampling_n_and_stop_through_the_real_engine(single_stack):
    client = single_stack.client
    messages = [{"role": "user", "content": "Tell me a story."}]

    def sample(seed):
        out = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=1.0, seed=seed, n=2
        )
        return [choice.message.content for choice in out.choices]

    first = sample(7)
    assert len(first) == 2 and first[0] != first[1]  # n=2: two independent samples
    assert sample(7) == first  # the same seed reproduces
    assert sample(8) != first

    greedy = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=20, temperature=0)
    text = greedy.choices[0].text
    stop = text[6:9]
    assert stop.strip()
    stopped = client.completions.create(
        model=MODEL, prompt="The quick brown", max_tokens=20, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_stream_usage_counts_every_token(single_stack):
    chunks = list(
        single_stack.client.completions.create(
            model=MODEL,
            prompt="Hello",
            max_tokens=9,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 9 and usage.prompt_tokens >= 1
    assert chunks[-1].choices == []


def test_echo_spells_a_token_id_prompt_including_its_first_token(single_stack):
    engine = single_stack.engines[0].engine
    ids = engine.tokenizer.encode("The quick brown fox")
    out = single_stack.client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    choice = out.choices[0]
    assert choice.text == engine.tokenizer.decode(ids)
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.tokens) == len(ids)
