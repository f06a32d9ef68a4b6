"""The API server as each model's front end: the model's tokenizer, chat template and limits, fetched once from
a worker (``/frontend_info``), so that rendering, tokenizing and validating a request happen here, and the
worker only ever sees token ids (``EngineRequest``).

``FrontendDirectory`` keeps one ``ModelFrontend`` per model name and one ``EngineChannel`` per worker, and
fetches each only once however many requests ask for it at the same moment.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import zmq.asyncio

from longserve.engine.protocol import EngineRequest, RequestLimits
from longserve.loading.tokenizer import Tokenizer, TokenizerSpec
from longserve.serve.engine_channel import EngineChannel
from longserve.serve.errors import APIError
from longserve.serve.reasoning_parsers import get_reasoning_parser
from longserve.serve.stream_chunks import TokenTexts, rejection_info, sampling_params
from longserve.serve.worker_protocol import FrontendInfo, WorkerGenerateRequest

T = TypeVar("T")
# Text longer than this is tokenized or rendered on a thread: the event loop serves every other stream.
_INLINE_CHARS = 4096


class ModelFrontend:
    """One model's tokenizer, template and limits, as its workers reported them."""

    def __init__(self, name: str, info: FrontendInfo) -> None:
        self.name = name
        self.lora_name = name if name in info.lora_parents else None  # the engine runs it with this adapter
        spec = TokenizerSpec(
            info.tokenizer_json,
            info.bos_token_id,
            info.eos_token_id,
            info.pad_token_id,
            info.unk_token_id,
            info.eos_token_ids,
            info.chat_template,
        )
        self.tokenizer = Tokenizer.from_spec(spec)
        self.token_texts = TokenTexts(self.tokenizer)
        self.tool_parser = info.tool_parser
        self.reasoning = get_reasoning_parser(info.reasoning_parser) if info.reasoning_parser else None
        self.limits = RequestLimits(
            vocab_size=info.vocab_size,
            max_model_len=info.max_model_len,
            cache_capacity=info.cache_capacity,
            eos_token_ids=info.eos_token_ids,
            can_generate=info.can_generate,
        )

    @property
    def context_length(self) -> int:
        return self.limits.context_length

    async def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool,
        tools: list[dict] | None = None,
        template_kwargs: dict | None = None,  # more variables for the template (enable_thinking, ...)
    ) -> str:
        """The prompt text of a conversation; a template that rejects the messages is the client's 400."""
        extra = dict(template_kwargs or {})
        if tools:
            extra["tools"] = tools
        try:
            if sum(len(str(m.get("content") or "")) for m in messages) < _INLINE_CHARS:
                return self.tokenizer.apply_chat_template(messages, add_generation_prompt, **extra)
            return await asyncio.to_thread(
                self.tokenizer.apply_chat_template, messages, add_generation_prompt, **extra
            )
        except ValueError as exc:  # no template, or the template raised on these messages
            raise APIError.from_info(rejection_info(exc, default_param="messages")) from exc

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) < _INLINE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens)
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)

    async def prepare(self, request: WorkerGenerateRequest) -> EngineRequest:
        """Tokenize and validate: a bad value raises a 400 ``APIError`` naming the field."""
        try:
            params = sampling_params(request.sampling)
            prompt = request.prompt
            if isinstance(prompt, str):
                ids = await self.encode(prompt, request.add_special_tokens)
            else:
                ids = list(prompt)
            self.limits.check_prompt(ids, params)
        except ValueError as exc:
            raise APIError.from_info(rejection_info(exc)) from exc
        return EngineRequest(request.request_id or f"api-{uuid.uuid4().hex}", ids, params, self.lora_name)


class FrontendDirectory:
    """The models this API server fronts and its channel to each worker (``close()`` closes them all)."""

    def __init__(self, timeout_s: float, keepalive_s: float, on_frozen: Callable[[str, str], None]) -> None:
        self.timeout_s = timeout_s
        self.keepalive_s = keepalive_s
        self._on_frozen = on_frozen  # (worker address, why): a worker stopped answering its stream
        self._context = zmq.asyncio.Context()
        self._models: dict[str, asyncio.Future[ModelFrontend]] = {}
        self._channels: dict[str, asyncio.Future[EngineChannel]] = {}

    async def model(self, name: str, fetch: Callable[[], Awaitable[FrontendInfo]]) -> ModelFrontend:
        """``name``'s front end, built from ``fetch()``'s answer the first time it is asked for."""

        async def build() -> ModelFrontend:
            info = await fetch()
            return await asyncio.to_thread(ModelFrontend, name, info)  # a big tokenizer takes a while

        return await _once(self._models, name, build)

    def forget(self, name: str) -> None:
        """Drop ``name``'s front end (an adapter was unloaded: a later one of that name may differ)."""
        self._models.pop(name, None)

    async def channel(
        self, worker_address: str, fetch: Callable[[], Awaitable[FrontendInfo]]
    ) -> EngineChannel:
        """The open channel to ``worker_address``, connected to where ``fetch()`` says its stream listens (a
        closed channel forgets itself, so the next call asks the worker again)."""

        async def connect() -> EngineChannel:
            info = await fetch()
            return EngineChannel(
                self._context,
                worker_address,
                info.stream_address,
                self.timeout_s,
                self.keepalive_s,
                self._forget,
            )

        return await _once(self._channels, worker_address, connect)

    def _forget(self, channel: EngineChannel, reason: str, frozen: bool) -> None:
        future = self._channels.get(channel.worker_address)
        if future is not None and future.done() and future.exception() is None and future.result() is channel:
            del self._channels[channel.worker_address]
        if frozen:
            self._on_frozen(channel.worker_address, reason)

    def close(self) -> None:
        for future in list(self._channels.values()):
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().close()
        self._channels.clear()
        self._context.term()


async def _once(cache: dict[str, asyncio.Future[T]], key: str, make: Callable[[], Awaitable[T]]) -> T:
    """``make()``'s result, cached under ``key``; concurrent callers share one call, and a failure is not
    cached (the next caller tries again)."""
    future = cache.get(key)
    if future is None:
        future = cache[key] = asyncio.ensure_future(make())

        def drop_failure(done: asyncio.Future[T]) -> None:
            if (done.cancelled() or done.exception() is not None) and cache.get(key) is done:
                del cache[key]

        future.add_done_callback(drop_failure)
    return await asyncio.shield(future)
