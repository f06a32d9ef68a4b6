"""Where `longserve chat` gets its replies: an OpenAI-compatible server (SSE) or an engine in this process.

Both stream one reply as text deltas and fill a :class:`Reply` with what the end of the stream says (token
counts, finish reason). Stopping a reply is cancelling the task that iterates the stream: the server backend
then closes the HTTP connection (the server aborts the request when its client goes), the local one closes the
engine stream (which aborts the engine request and frees its KV blocks).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from longserve.clients.bench import sse_data

if TYPE_CHECKING:
    from longserve.config import EngineConfig

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}

# No total limit (a long reply may stream for minutes); a server silent this long between lines is stuck.
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)


class ChatError(RuntimeError):
    """A reply failed (bad request, refused credentials, unreachable server, engine error): one line to show."""


@dataclass
class Settings:
    """Sampling settings sent with every request; ``/set`` changes them between turns."""

    temperature: float = 0.7
    max_tokens: int | None = None  # None: until the model stops or the context is full


class Thought(str):
    """A piece of a reasoning model's thinking (``delta.reasoning_content``), streamed apart from the answer."""


@dataclass
class Reply:
    """One assistant reply: the text streamed so far, and at the end the token counts and finish reason."""

    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


class ChatBackend(Protocol):
    label: str  # what the banner names: model and where it runs

    async def open(self) -> None: ...

    def stream(self, messages: list[Message], settings: Settings, reply: Reply) -> AsyncIterator[str]: ...

    async def close(self) -> None: ...


@contextlib.contextmanager
def _transport_errors(base_url: str) -> Iterator[None]:
    """Turn aiohttp's failures into one readable line each."""
    try:
        yield
    except aiohttp.ClientConnectorError as exc:
        errno = exc.os_error.errno
        reason = os.strerror(errno) if errno else str(exc.os_error)
        raise ChatError(f"cannot connect to {base_url} ({reason}); is the server running?") from None
    except TimeoutError:
        raise ChatError(f"{base_url} stopped answering (no data for {_TIMEOUT.sock_read:.0f} s)") from None
    except aiohttp.ClientError as exc:
        raise ChatError(f"connection to {base_url} failed: {type(exc).__name__}: {exc}") from None


async def _http_error(resp: aiohttp.ClientResponse) -> str:
    """``HTTP 401: <the server's message>`` from an OpenAI-shaped error body, or the start of any other body."""
    raw = await resp.read()
    try:
        error = json.loads(raw).get("error")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        return f"HTTP {resp.status}: {error['message']}"
    text = raw.decode("utf-8", "replace").strip().replace("\n", " ")[:200]
    return f"HTTP {resp.status} {resp.reason or ''}: {text}".rstrip(": ")


class ServerChat:
    """Streams ``/chat/completions`` from an OpenAI-compatible server (longserve, vLLM, llama-server, ...)."""

    def __init__(self, base_url: str, api_key: str | None, model: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model  # None until the first GET /models answers
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def label(self) -> str:
        return f"{self.model or '(model not known yet)'} at {self.base_url}"

    async def open(self) -> None:
        """Start the HTTP session and name the model; a server that is not up yet raises ChatError, and the
        model is asked for again with the first message."""
        self._session = aiohttp.ClientSession(headers=self._headers, timeout=_TIMEOUT)
        await self._resolve_model()

    async def _resolve_model(self) -> str:
        if self.model is None:
            assert self._session is not None, "open() first"
            with _transport_errors(self.base_url):
                async with self._session.get(f"{self.base_url}/models") as resp:
                    if resp.status != 200:
                        raise ChatError(f"GET {self.base_url}/models: {await _http_error(resp)}")
                    models = (await resp.json()).get("data") or []
            if not models:
                raise ChatError(f"{self.base_url}/models lists no model; pass --model")
            self.model = models[0]["id"]
        return self.model

    async def stream(self, messages: list[Message], settings: Settings, reply: Reply) -> AsyncIterator[str]:
        model = await self._resolve_model()
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": settings.temperature,
        }
        if settings.max_tokens is not None:
            body["max_tokens"] = settings.max_tokens
        assert self._session is not None, "open() first"
        with _transport_errors(self.base_url):
            async with self._session.post(f"{self.base_url}/chat/completions", json=body) as resp:
                if resp.status != 200:
                    raise ChatError(await _http_error(resp))
                complete = False
                try:
                    async for data in sse_data(resp.content):
                        if data.strip() == "[DONE]":
                            complete = True
                            return
                        for text in _chunk_text(data, reply):
                            yield text
                finally:
                    if not complete:
                        # Not back to the pool: closing the socket is what tells the server to stop generating.
                        resp.close()
        raise ChatError("the server ended the stream early (no [DONE])")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _chunk_text(data: str, reply: Reply) -> list[str]:
    """The content deltas of one SSE chunk (reasoning as ``Thought``); its usage and finish reason go into
    ``reply``."""
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        raise ChatError(f"the server sent something that is not JSON: {data[:200]!r}") from None
    error = chunk.get("error")
    if error:
        raise ChatError(str(error.get("message") if isinstance(error, dict) else error))
    usage = chunk.get("usage")
    if usage:
        reply.prompt_tokens = usage.get("prompt_tokens")
        reply.completion_tokens = usage.get("completion_tokens")
    texts = []
    for choice in chunk.get("choices") or []:
        reply.finish_reason = choice.get("finish_reason") or reply.finish_reason
        delta = choice.get("delta") or {}
        if delta.get("reasoning_content"):
            texts.append(Thought(delta["reasoning_content"]))
        if delta.get("content"):
            texts.append(delta["content"])
    return texts


class LocalChat:
    """Runs the engine in this process (on its own thread, as the worker does) and applies the chat template."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.label = f"{config.model or 'the default model'} (local, {config.device})"
        self._engine = None

    async def open(self) -> None:
        """Load the model (minutes for a large one); ValueError if it cannot be loaded."""
        from longserve.engine.core_client import EngineCoreClient  # torch and the model code: local mode only

        self._engine = await EngineCoreClient.create(self.config, in_process=True)
        name = self.config.model or "SmolLM2-135M-Instruct"
        self.label = f"{name} (local, {self.config.device})"
        if self._engine.tokenizer.chat_template is None:
            raise ChatError(f"{name} has no chat template; chat needs one")

    async def stream(self, messages: list[Message], settings: Settings, reply: Reply) -> AsyncIterator[str]:
        from longserve.engine.protocol import RequestFailed
        from longserve.engine.sampling_params import SamplingParams

        engine = self._engine
        assert engine is not None, "open() first"
        try:
            params = SamplingParams(temperature=settings.temperature, max_tokens=settings.max_tokens)
            prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as exc:  # a bad setting, or a template that rejects the conversation
            raise ChatError(str(exc)) from None
        sent = 0
        try:
            # The template already wrote the special tokens (BOS included) the model expects.
            async for output in engine.generate(prompt, params, add_special_tokens=False):
                completion = output.outputs[0]
                reply.finish_reason = completion.finish_reason
                if output.finished:
                    reply.prompt_tokens = output.num_prompt_tokens
                    reply.completion_tokens = len(completion.token_ids)
                if len(completion.text) > sent:
                    yield completion.text[sent:]
                    sent = len(completion.text)
        except ValueError as exc:  # a conversation longer than the context
            raise ChatError(str(exc)) from None
        except RequestFailed as exc:
            raise ChatError(f"the engine failed this reply: {exc}") from None

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.ashutdown()
