"""/v1/completions: one worker stream per prompt (a batch runs concurrently), answered as one
``text_completion`` or as a stream of them. Choice ``prompt_index * n + i`` is completion i of prompt prompt_index.

``echo`` prepends the prompt to each choice; with ``logprobs`` the prompt's tokens come with their logprobs,
the first one's None (nothing predicts it). ``max_tokens=0`` scores the prompt without generating: the worker
is asked for one token, which is dropped from text, logprobs and usage (finish_reason "length"). Together
that is the lm-eval-harness loglikelihood request: ``echo=True, max_tokens=0 (or 1), logprobs=0``.

Prompt token texts come with the worker's prompt logprobs (for a token-id prompt with echo they are asked for
just to spell the prompt): ``prompt_token_texts`` on the worker's first line spells every prompt token,
including the first, which no logprob entry covers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from longserve.serve.errors import APIError
from longserve.serve.generation import Generation, StreamBroken
from longserve.serve.metrics import ApiMetrics, RequestRecorder
from longserve.serve.openai_common import (
    TextFrames,
    add_usage,
    json_response,
    sampling_options,
    sse,
    streaming_response,
)
from longserve.serve.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    new_id,
    now,
)
from longserve.serve.structured_request import requested_structure
from longserve.serve.upstream import Upstream
from longserve.serve.worker_protocol import TokenLogprobInfo, WorkerGenerateRequest, WorkerStreamChunk


async def completion(
    req: CompletionRequest, request: Request, upstream: Upstream, metrics: ApiMetrics
) -> Response:
    req.check()
    prompts = req.prompts()
    request_id = new_id("cmpl")
    max_tokens = 1 if req.max_tokens == 0 else req.max_tokens
    structure = requested_structure(req)
    payloads = []
    for i, prompt in enumerate(prompts):
        prompt_logprobs = None
        if req.echo and req.logprobs is not None:
            prompt_logprobs = req.logprobs
        elif req.echo and isinstance(prompt, list):
            prompt_logprobs = 0  # only for the token texts that spell the prompt
        sampling = sampling_options(
            req,
            max_tokens=max_tokens,
            logprobs=req.logprobs,
            prompt_logprobs=prompt_logprobs,
            structured_output=structure,
        )
        payloads.append(
            WorkerGenerateRequest(
                model=req.model, prompt=prompt, sampling=sampling, request_id=f"{request_id}-{i}"
            )
        )
    generation = Generation(upstream, request, req.model, payloads, RequestRecorder(metrics, req.model))
    await generation.start()
    builder = _Builder(req, prompts)
    if req.stream:
        return streaming_response(generation, _chunks(generation, builder, req, request_id))
    async with generation:
        try:
            async for prompt_index, chunk in generation.events():
                builder.update(prompt_index, chunk)
        except StreamBroken as exc:  # nothing was sent yet: the broken stream is this request's error
            raise APIError.from_info(exc.info) from exc
    response = CompletionResponse(
        id=request_id, model=req.model, choices=builder.whole(), usage=builder.usage
    )
    return json_response(response)


async def _chunks(
    generation: Generation, builder: _Builder, req: CompletionRequest, request_id: str
) -> AsyncIterator[str | None]:
    created = now()

    def response(choices: list[CompletionChoice]) -> CompletionResponse:
        return CompletionResponse(id=request_id, created=created, model=req.model, choices=choices)

    # A choice with only some text (most of them) is spliced into a pre-encoded frame.
    frames = TextFrames(lambda index, text: response([CompletionChoice(index=index, text=text)]))
    async for item in generation.events(keepalive=True):
        if item is None:
            yield None  # nothing for a while: the writer sends a keep-alive
            continue
        for choice in builder.update(*item):
            if choice.logprobs is None and choice.finish_reason is None and choice.stop_reason is None:
                yield frames.frame(choice.index, choice.text)
            else:
                yield sse(response([choice]))
    if req.include_usage:
        yield sse(
            CompletionResponse(
                id=request_id, created=created, model=req.model, choices=[], usage=builder.usage
            )
        )


@dataclass
class _Piece:
    """Some text of a choice and, when logprobs are asked for, its tokens."""

    text: str = ""
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)
    offset: int = 0  # characters so far: where the next token's text_offset starts
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class _Builder:
    """Turns worker chunks into choice deltas and keeps every choice whole for the non-streamed answer."""

    def __init__(self, req: CompletionRequest, prompts: list[str | list[int]]) -> None:
        self.req = req
        self.prompts = prompts
        self.n = req.n
        self.zero_tokens = req.max_tokens == 0
        self.choices = [_Choice() for _ in range(len(prompts) * req.n)]
        self.usage = UsageInfo()

    def update(self, prompt_index: int, chunk: WorkerStreamChunk) -> list[CompletionChoice]:
        """This chunk's news as stream choices (text and logprobs of this chunk only)."""
        deltas = []
        if chunk.prompt_token_ids is not None and self.req.echo:
            piece = self._prompt_piece(self.prompts[prompt_index], chunk)
            for i in range(self.n):
                deltas.append(self._add(prompt_index * self.n + i, piece))
        for out in chunk.outputs:
            index = prompt_index * self.n + out.index
            finish, stop_reason = out.finish_reason, out.stop_reason
            if self.zero_tokens:  # the one token asked for only to make the worker run: drop it
                piece = _Piece()
                if finish is not None:
                    finish, stop_reason = "length", None
            else:
                piece = self._output_piece(out.text, out.logprobs)
            if piece.text or piece.tokens or finish is not None:
                deltas.append(self._add(index, piece, finish, stop_reason))
        if chunk.usage is not None:
            usage = chunk.usage
            if self.zero_tokens:
                usage = usage.model_copy(update={"completion_tokens": 0, "total_tokens": usage.prompt_tokens})
            add_usage(self.usage, usage)
        return deltas

    def whole(self) -> list[CompletionChoice]:
        return [
            CompletionChoice(
                index=i,
                text="".join(c.text),
                logprobs=c.logprobs if self.req.logprobs is not None else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for i, c in enumerate(self.choices)
        ]

    def _add(
        self, index: int, piece: _Piece, finish: str | None = None, stop_reason: int | str | None = None
    ) -> CompletionChoice:
        choice = self.choices[index]
        choice.text.append(piece.text)
        offsets = []
        for token in piece.tokens:
            offsets.append(choice.offset)
            choice.offset += len(token)
        delta = CompletionLogprobs(
            tokens=piece.tokens,
            token_logprobs=piece.token_logprobs,
            top_logprobs=piece.top_logprobs,
            text_offset=offsets,
        )
        whole = choice.logprobs
        whole.tokens += delta.tokens
        whole.token_logprobs += delta.token_logprobs
        whole.top_logprobs += delta.top_logprobs
        whole.text_offset += delta.text_offset
        if finish is not None:
            choice.finish_reason, choice.stop_reason = finish, stop_reason
        return CompletionChoice(
            index=index,
            text=piece.text,
            logprobs=delta if self.req.logprobs is not None else None,
            finish_reason=finish,
            stop_reason=stop_reason,
        )

    def _output_piece(self, text: str, infos: list[TokenLogprobInfo] | None) -> _Piece:
        piece = _Piece(text=text)
        if self.req.logprobs is not None and infos:
            piece.tokens = [info.token for info in infos]
            piece.token_logprobs = [info.logprob for info in infos]
            piece.top_logprobs = [self._top(info) for info in infos]
        return piece

    def _prompt_piece(self, prompt: str | list[int], chunk: WorkerStreamChunk) -> _Piece:
        entries = chunk.prompt_logprobs or []
        if len(entries) == len(chunk.prompt_token_ids or []):
            entries = entries[1:]  # the first token's entry is None: nothing predicts it
        known = [e for e in entries if e is not None]
        rest = "".join(e.token for e in known)
        first = ""
        if chunk.prompt_token_texts:
            first = chunk.prompt_token_texts[0]
        elif isinstance(prompt, str) and prompt.endswith(rest):
            first = prompt[: len(prompt) - len(rest)]  # whatever the other tokens do not spell
        piece = _Piece(text=prompt if isinstance(prompt, str) else first + rest)
        if self.req.logprobs is not None and chunk.prompt_token_ids:
            piece.tokens = [first] + [e.token for e in known]
            piece.token_logprobs = [None] + [e.logprob for e in known]
            piece.top_logprobs = [None] + [self._top(e) for e in known]
        return piece

    def _top(self, info: TokenLogprobInfo) -> dict[str, float]:
        """The ``logprobs`` best alternatives, plus the chosen token (as vLLM: so logprobs=0 still says it)."""
        top = {t.token: t.logprob for t in info.top[: self.req.logprobs]}
        top.setdefault(info.token, info.logprob)
        return top
