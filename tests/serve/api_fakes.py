"""A fake engine behind the real worker app, and a fake controller, for the API server tests.

The fake engine's tokenizer has one token per ASCII character (token id = code point), its chat template
writes ``<role>content`` per message, and it "generates" the alphabet: token j of completion i is
``chr(ord("a") + (j + i + seed) % 26)``. Prompts steer it: one containing ``DIE`` makes the engine fail the
request after two deltas; ``SLOW`` makes it emit a token every 50 ms for a long time; ``SAY:text`` (up to
the next ``<``-role tag of the template, or ``SAY:`` again) makes it generate exactly ``text`` and stop. Every request is
recorded (``engine.requests``) and every one aborted before its end is counted (``engine.aborted``), so tests
can check what the API server sent and that it hung up. The worker app, its front-end stream and the API
server's whole path are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import tokenizers
from fastapi import FastAPI
from tokenizers import Regex, decoders, models, pre_tokenizers

from longserve.config import ServeConfig
from longserve.engine.protocol import (
    EngineRequest,
    EngineStats,
    RequestDelta,
    RequestFailed,
    RequestLimits,
    SequenceDelta,
    TokenLogprob,
)
from longserve.loading.pooling_config import MEAN_NORMALIZED
from longserve.loading.tokenizer import Tokenizer
from longserve.serve.worker_app import create_worker_app
from longserve.serve.worker_protocol import (
    GetWorkerAddressRequest,
    GetWorkerAddressResponse,
    ListModelsResponse,
    ListWorkersResponse,
    WorkerInfo,
    WorkerStatus,
)

MODEL = "fake-model"
CONTEXT_LENGTH = 64
EOS_AFTER = 40  # a completion with no max_tokens ends with "stop" here
TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer() -> Tokenizer:
    """One token per ASCII character, id = code point (anything else is id 0)."""
    backend = tokenizers.Tokenizer(models.WordLevel({chr(i): i for i in range(128)}, unk_token="\x00"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, eos_token_id=0, chat_template=TEMPLATE)


def logprob_entry(token_id: int, position: int, top: int) -> TokenLogprob:
    logprob = -0.5 - 0.01 * position
    alternatives = [token_id] + [ord("A") + (position + k) % 26 for k in range(max(0, top - 1))]
    return TokenLogprob(token_id, logprob, 1, [(t, logprob - k) for k, t in enumerate(alternatives[:top])])


class AlphabetEngine:
    """What ``ModelWorker`` asks of an engine core client, generating the alphabet one token per 'step'."""

    def __init__(self, context_length: int = CONTEXT_LENGTH) -> None:
        self.context_length = context_length
        self.tokenizer = char_tokenizer()
        self.limits = RequestLimits(
            vocab_size=128,
            max_model_len=context_length,
            cache_capacity=context_length,
            eos_token_ids=[0],
            embedding_size=3,
            pooling=MEAN_NORMALIZED,
        )
        self.ready = True
        self.failure: str | None = None
        self.requests: list[EngineRequest] = []  # in arrival order
        self.aborted = 0  # ended early by an abort of the whole request
        self.finished = 0
        self._running: dict[str, tuple[asyncio.Task, set[int]]] = {}  # request -> (task, aborted seqs)
        self.lora_names: list[str] = []  # no LoRA adapters
        self.num_stalls = self.num_restarts = 0

    def stats(self) -> EngineStats:
        return EngineStats(running=2, waiting=1, kv_cache_usage=0.25)

    def submit(self, request: EngineRequest, sink) -> None:
        self.requests.append(request)
        task = asyncio.get_running_loop().create_task(self._generate(request, sink))
        self._running[request.request_id] = (task, set())

    def abort(self, request_id: str, seq_index: int | None = None) -> None:
        entry = self._running.get(request_id)
        if entry is None:
            return
        if seq_index is not None:
            entry[1].add(seq_index)
        else:
            entry[0].cancel()

    async def embed(self, prompts: list[str | list[int]]) -> tuple[list[list[float]], int]:
        vectors, tokens = [], 0
        for item in prompts:
            n = len(item)
            tokens += n
            norm = math.sqrt(n * n + 1)
            vectors.append([n / norm, 1 / norm, 0.0])
        return vectors, tokens

    async def _generate(self, request: EngineRequest, sink) -> None:
        params, request_id = request.params, request.request_id
        prompt, text = request.prompt_token_ids, "".join(map(chr, request.prompt_token_ids))
        slow, die = "SLOW" in text, "DIE" in text
        limit = params.max_tokens or min(EOS_AFTER, self.context_length - len(prompt))
        script = _script(text)
        if script is not None:
            limit = min(len(script), params.max_tokens or len(script))
        if slow:
            limit = params.max_tokens or 1000
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [
                logprob_entry(t, j, params.prompt_logprobs) for j, t in enumerate(prompt[1:])
            ]
        stopped = self._running[request_id][1]
        done = [False] * params.n
        try:
            for j in range(limit):
                await asyncio.sleep(0.05 if slow else 0)
                if die and j == 2:
                    sink(RequestFailed("the engine failed this request"))
                    return
                seqs = []
                for i in range(params.n):
                    if done[i]:
                        continue
                    if i in stopped:
                        done[i] = True
                        seqs.append(SequenceDelta(i, [], None, "abort", None))
                        continue
                    token = ord("a") + (j + i + (params.seed or 0)) % 26
                    finish = None
                    if script is not None:
                        token = ord(script[j])
                        if j == limit - 1:
                            finish = "stop" if limit == len(script) else "length"
                    elif j == limit - 1:
                        finish = "length" if params.max_tokens is not None or slow else "stop"
                    done[i] = finish is not None
                    logprobs = (
                        [logprob_entry(token, j, params.logprobs)] if params.logprobs is not None else None
                    )
                    seqs.append(SequenceDelta(i, [token], logprobs, finish, None))
                sink(
                    RequestDelta(
                        request_id,
                        seqs,
                        all(done),
                        None,
                        prompt_logprobs if j == 0 else None,
                        0,
                    )
                )
                if all(done):
                    self.finished += 1
                    return
        except asyncio.CancelledError:
            self.aborted += 1
            sink(
                RequestDelta(
                    request_id,
                    [SequenceDelta(i, [], None, "abort", None) for i in range(params.n) if not done[i]],
                    True,
                    None,
                    None,
                    0,
                )
            )
        finally:
            self._running.pop(request_id, None)


def _script(prompt_text: str) -> str | None:
    """The text after ``SAY:`` in the prompt, up to the template's next turn (``<assistant>``, ``<user>``...)."""
    if "SAY:" not in prompt_text:
        return None
    said = prompt_text.split("SAY:", 1)[1]
    for end in ("<assistant>", "<user>", "<system>", "<tool>"):
        said = said.split(end, 1)[0]
    return said or None


def create_fake_worker(model: str = MODEL, context_length: int = CONTEXT_LENGTH, **config_options) -> FastAPI:
    """The real worker app over an ``AlphabetEngine`` (``app.state.engine``), its stream on loopback."""
    engine = AlphabetEngine(context_length)
    config = ServeConfig(host="127.0.0.1", worker_stream_keepalive_s=1.0, **config_options)
    app = create_worker_app(engine, config, model)
    app.state.engine = engine
    return app


def create_fake_controller(workers: list[str], models: tuple[str, ...] = (MODEL,)) -> FastAPI:
    """Dispatches to the first of ``workers`` not excluded; ``app.state.workers`` may be changed by tests."""
    app = FastAPI()
    app.state.workers = list(workers)
    app.state.models = list(models)
    app.state.address_requests = []  # GetWorkerAddressRequest, in arrival order

    @app.post("/list_models")
    async def list_models():
        return ListModelsResponse(models=app.state.models)

    @app.post("/get_worker_address")
    async def get_worker_address(body: GetWorkerAddressRequest):
        app.state.address_requests.append(body)
        if body.model not in app.state.models:
            return GetWorkerAddressResponse(address="")
        candidates = [w for w in app.state.workers if w not in body.exclude]
        return GetWorkerAddressResponse(address=candidates[0] if candidates else "")

    @app.post("/list_workers")
    async def list_workers():
        status = WorkerStatus(model_names=app.state.models[:1], running=7, kv_cache_usage=0.5)
        return ListWorkersResponse(
            workers=[
                WorkerInfo(worker_address=w, status=status, last_heart_beat=time.monotonic())
                for w in app.state.workers
            ]
        )

    return app


def sse_events(raw: str) -> list[dict | str]:
    """The ``data:`` payloads of an SSE body: parsed JSON, or the string "[DONE]"."""
    events: list[dict | str] = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
