"""/v1/chat/completions: render the messages with the model's own chat template (on a worker), generate, and
answer as one ``chat.completion`` or as a stream of ``chat.completion.chunk`` events.

Stream shape (as OpenAI's): a first chunk per choice with ``delta.role = "assistant"``, then content chunks;
a choice's ``finish_reason`` rides on the chunk with its last text, or on an empty-delta chunk when the last
token adds no text (EOS). With ``stream_options.include_usage`` a final chunk has the usage and no choices.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from longserve.serve.errors import APIError
from longserve.serve.generation import Generation, StreamBroken
from longserve.serve.metrics import ApiMetrics, RequestRecorder
from longserve.serve.openai_common import add_usage, json_response, sampling_options, sse, streaming_response
from longserve.serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprobEntry,
    UsageInfo,
    new_id,
    now,
)
from longserve.serve.upstream import Upstream
from longserve.serve.worker_protocol import (
    ChatTemplateRequest,
    ChatTemplateResponse,
    TokenLogprobInfo,
    WorkerGenerateRequest,
)


def chat_logprobs(infos: list[TokenLogprobInfo], top: int) -> list[ChatTokenLogprob]:
    """Worker logprobs in chat's shape: token, logprob, UTF-8 bytes, and the ``top`` best alternatives."""
    return [
        ChatTokenLogprob(
            token=info.token,
            logprob=info.logprob,
            bytes=list(info.token.encode()),
            top_logprobs=[
                TopLogprobEntry(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()))
                for t in info.top[:top]
            ],
        )
        for info in infos
    ]


async def chat_completion(
    req: ChatCompletionRequest, request: Request, upstream: Upstream, metrics: ApiMetrics
) -> Response:
    req.check()
    template = await upstream.call_worker(
        req.model,
        "/apply_chat_template",
        ChatTemplateRequest(
            model=req.model, messages=req.template_messages(), add_generation_prompt=req.add_generation_prompt
        ),
        ChatTemplateResponse,
    )
    top = req.top_logprobs or 0
    request_id = new_id("chatcmpl")
    payload = WorkerGenerateRequest(
        model=req.model,
        prompt=template.prompt,
        add_special_tokens=False,
        sampling=sampling_options(
            req, max_tokens=req.effective_max_tokens, logprobs=top if req.logprobs else None
        ),
        request_id=request_id,
    )
    generation = Generation(upstream, request, req.model, [payload], RequestRecorder(metrics, req.model))
    await generation.start()
    if req.stream:
        return streaming_response(generation, _chunks(generation, req, request_id))
    async with generation:
        return json_response(await _whole(generation, req, request_id))


async def _whole(
    generation: Generation, req: ChatCompletionRequest, request_id: str
) -> ChatCompletionResponse:
    texts: list[list[str]] = [[] for _ in range(req.n)]
    logprobs: list[list[ChatTokenLogprob]] = [[] for _ in range(req.n)]
    finish: list[str | None] = [None] * req.n
    stop_reason: list[int | str | None] = [None] * req.n
    usage = UsageInfo()
    try:
        async for _, chunk in generation.events():
            for out in chunk.outputs:
                texts[out.index].append(out.text)
                if req.logprobs and out.logprobs:
                    logprobs[out.index].extend(chat_logprobs(out.logprobs, req.top_logprobs or 0))
                if out.finish_reason is not None:
                    finish[out.index], stop_reason[out.index] = out.finish_reason, out.stop_reason
            add_usage(usage, chunk.usage)
    except StreamBroken as exc:  # nothing was sent yet: the broken stream is this request's error
        raise APIError.from_info(exc.info) from exc
    choices = [
        ChatChoice(
            index=i,
            message=ChatResponseMessage(content="".join(texts[i])),
            logprobs=ChatLogprobs(content=logprobs[i]) if req.logprobs else None,
            finish_reason=finish[i],
            stop_reason=stop_reason[i],
        )
        for i in range(req.n)
    ]
    return ChatCompletionResponse(id=request_id, model=req.model, choices=choices, usage=usage)


async def _chunks(generation: Generation, req: ChatCompletionRequest, request_id: str) -> AsyncIterator[str]:
    created = now()

    def event(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=request_id, created=created, model=req.model, choices=choices, usage=usage
        )
        return sse(chunk)

    for i in range(req.n):
        yield event([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    usage = UsageInfo()
    async for _, chunk in generation.events():
        for out in chunk.outputs:
            logprobs = None
            if req.logprobs and out.logprobs:
                logprobs = ChatLogprobs(content=chat_logprobs(out.logprobs, req.top_logprobs or 0))
            if not out.text and out.finish_reason is None and logprobs is None:
                continue  # tokens that add no text yet (half a UTF-8 character): nothing to say
            choice = ChatChunkChoice(
                index=out.index,
                delta=DeltaMessage(content=out.text) if out.text else DeltaMessage(),
                logprobs=logprobs,
                finish_reason=out.finish_reason,
                stop_reason=out.stop_reason,
            )
            yield event([choice])
        add_usage(usage, chunk.usage)
    if req.include_usage:
        yield event([], usage)
