"""/v1/chat/completions: render the messages with the model's own chat template (``frontend``), generate, and
answer as one ``chat.completion`` or as a stream of ``chat.completion.chunk`` events.

Stream shape (as OpenAI's): a first chunk per choice with ``delta.role = "assistant"``, then content chunks;
a choice's ``finish_reason`` rides on the chunk with its last text, or on an empty-delta chunk when the last
token adds no text (EOS). With ``stream_options.include_usage`` a final chunk has the usage and no choices.
With tools, ``openai_tools.ToolOutput`` turns each choice's text into content and ``tool_calls`` deltas, and a
choice that called a tool finishes with ``tool_calls``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from longserve.serve.errors import APIError
from longserve.serve.frontend import ModelFrontend
from longserve.serve.generation import Generation, StreamBroken
from longserve.serve.generic_tools import generic_messages, generic_tool_plan
from longserve.serve.metrics import ApiMetrics, RequestRecorder
from longserve.serve.openai_common import (
    TextFrames,
    add_usage,
    json_response,
    sampling_options,
    sse,
    streaming_response,
)
from longserve.serve.openai_tools import (
    ToolOutput,
    ToolPlan,
    plan_tools,
    tool_call_delta_infos,
    tool_call_infos,
)
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
from longserve.serve.reasoning_parsers import ReasoningSplitter
from longserve.serve.structured_request import requested_structure
from longserve.serve.upstream import Upstream
from longserve.serve.worker_protocol import TokenLogprobInfo, WorkerGenerateRequest


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


@dataclass
class ChatRun:
    """A started chat generation: its worker streams, its id, and each choice's tool-call processing."""

    generation: Generation
    request_id: str
    tools: list[ToolOutput] | None  # None: plain text (no tools, or tool_choice "none")
    reasoning: list[ReasoningSplitter] | None = None  # each choice's reasoning split (a reasoning model's)


async def chat_completion(
    req: ChatCompletionRequest, request: Request, upstream: Upstream, metrics: ApiMetrics
) -> Response:
    run = await start_chat(req, request, upstream, metrics)
    if req.stream:
        return streaming_response(run.generation, chat_events(run, req))
    async with run.generation:
        return json_response(await whole_chat(run, req))


async def start_chat(
    req: ChatCompletionRequest,
    request: Request,
    upstream: Upstream,
    metrics: ApiMetrics,
    request_id: str | None = None,
) -> ChatRun:
    """Check the request, render its template and start generating (the Responses API too)."""
    req.check()
    frontend = await upstream.frontend(req.model)
    tools, messages = plan_chat_tools(req, frontend)
    structure = tools.structure or requested_structure(req)
    prompt = await frontend.render_chat(
        messages, req.add_generation_prompt, tools.template_tools, req.chat_template_kwargs
    )
    # A grammar shapes the output from its first token: there is no reasoning to split off then.
    reasoning = None
    if frontend.reasoning is not None and structure is None:
        reasoning = [ReasoningSplitter(frontend.reasoning, prompt) for _ in range(req.n)]
    outputs = [tools.output(frontend.tool_parser) for _ in range(req.n)] if tools.mode != "none" else None
    # The format's markers may be special tokens, which the text would otherwise leave out.
    keep_special = tools.mode == "auto" and outputs[0].needs_special_tokens
    top = req.top_logprobs or 0
    request_id = request_id or new_id("chatcmpl")
    payload = WorkerGenerateRequest(
        model=req.model,
        prompt=prompt,
        add_special_tokens=False,
        sampling=sampling_options(
            req,
            max_tokens=req.effective_max_tokens,
            logprobs=top if req.logprobs else None,
            structured_output=structure,
            skip_special_tokens=False if keep_special else None,
        ),
        request_id=request_id,
    )
    recorder = RequestRecorder(metrics, req.model)
    generation = Generation(upstream, request, req.model, [payload], recorder, frontend)
    await generation.start()
    return ChatRun(generation, request_id, outputs, reasoning)


def plan_chat_tools(req: ChatCompletionRequest, frontend: ModelFrontend) -> tuple[ToolPlan, list[dict]]:
    """How the request uses its tools on this model, and the messages for its template (a model without a
    tool format gets the tools described in them: ``generic_tools``)."""
    tools, messages = plan_tools(req), req.template_messages()
    if tools.mode != "none" and frontend.tool_parser is None:
        tools = generic_tool_plan(tools, req)
        messages = generic_messages(messages, tools.system_prompt)
    return tools, messages


async def whole_chat(run: ChatRun, req: ChatCompletionRequest) -> ChatCompletionResponse:
    """The whole answer (a broken worker stream raises the request's APIError)."""
    generation, request_id, tools = run.generation, run.request_id, run.tools
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
    choices = []
    for i in range(req.n):
        text, reasoning = "".join(texts[i]), None
        if run.reasoning is not None:
            reasoning, text = run.reasoning[i].parse(text)
        message = ChatResponseMessage(content=text, reasoning_content=reasoning or None)
        if tools is not None:
            parsed = tools[i].parse(text)
            message = ChatResponseMessage(
                content=parsed.content,
                reasoning_content=reasoning or None,
                tool_calls=tool_call_infos(parsed.tool_calls),
            )
        choices.append(
            ChatChoice(
                index=i,
                message=message,
                logprobs=ChatLogprobs(content=logprobs[i]) if req.logprobs else None,
                finish_reason=_finish_reason(finish[i], tools[i] if tools else None),
                stop_reason=stop_reason[i],
            )
        )
    return ChatCompletionResponse(id=request_id, model=req.model, choices=choices, usage=usage)


def _finish_reason(reason: str | None, tools: ToolOutput | None) -> str | None:
    return "tool_calls" if reason == "stop" and tools is not None and tools.called else reason


def _split_reasoning(splitter: ReasoningSplitter, text: str, finished: bool) -> tuple[str, str]:
    """(reasoning, answer) pieces of a choice's next text (its last piece when ``finished``)."""
    reasoning, content = splitter.feed(text)
    if finished:
        more_reasoning, more_content = splitter.finish()
        reasoning, content = reasoning + more_reasoning, content + more_content
    return reasoning, content


def _delta(text: str, tools: ToolOutput | None, finished: bool) -> DeltaMessage:
    """The delta for a piece of a choice's text (its last piece when ``finished``), tool calls parsed out."""
    if tools is None:
        return DeltaMessage(content=text) if text else DeltaMessage()
    parsed = tools.feed(text)
    if finished:
        rest = tools.finish()
        parsed.content = (parsed.content or "") + (rest.content or "") or None
        parsed.tool_calls += rest.tool_calls
    return DeltaMessage(content=parsed.content, tool_calls=tool_call_delta_infos(parsed.tool_calls) or None)


async def chat_chunks(run: ChatRun, req: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk | None]:
    """The answer as OpenAI's stream chunks, ``None`` when a keep-alive is due (a broken generation raises
    ``StreamBroken``)."""
    generation, request_id, tools = run.generation, run.request_id, run.tools
    created = now()

    def event(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=request_id, created=created, model=req.model, choices=choices, usage=usage
        )

    for i in range(req.n):
        yield event([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    usage = UsageInfo()
    async for item in generation.events(keepalive=True):
        if item is None:
            yield None  # nothing for a while: the writer sends a keep-alive
            continue
        for out in item[1].outputs:
            logprobs = None
            if req.logprobs and out.logprobs:
                logprobs = ChatLogprobs(content=chat_logprobs(out.logprobs, req.top_logprobs or 0))
            if not out.text and out.finish_reason is None and logprobs is None:
                continue  # tokens that add no text yet (half a UTF-8 character): nothing to say
            choice_tools = tools[out.index] if tools is not None else None
            text, reasoning = out.text, ""
            if run.reasoning is not None:  # the reasoning first; the answer goes on to the tool parser
                reasoning, text = _split_reasoning(
                    run.reasoning[out.index], text, out.finish_reason is not None
                )
            delta = _delta(text, choice_tools, out.finish_reason is not None)
            delta.reasoning_content = reasoning or None
            if (
                delta.content is None
                and not delta.tool_calls
                and delta.reasoning_content is None
                and out.finish_reason is None
                and logprobs is None
            ):
                continue  # text the tool parser holds back until it knows what it is
            choice = ChatChunkChoice(
                index=out.index,
                delta=delta,
                logprobs=logprobs,
                finish_reason=_finish_reason(out.finish_reason, choice_tools),
                stop_reason=out.stop_reason,
            )
            yield event([choice])
        add_usage(usage, item[1].usage)
    if req.include_usage:
        yield event([], usage)


async def chat_events(run: ChatRun, req: ChatCompletionRequest) -> AsyncIterator[str | None]:
    """The stream's SSE frames; a chunk with only some text (most of them) is spliced into a pre-encoded one."""
    frames: TextFrames | None = None
    async for chunk in chat_chunks(run, req):
        if chunk is None:
            yield None
            continue
        choice = chunk.choices[0] if len(chunk.choices) == 1 and chunk.usage is None else None
        if choice is not None and _text_only(choice):
            if frames is None:
                frames = TextFrames(
                    lambda index, text, like=chunk: like.model_copy(
                        update={"choices": [ChatChunkChoice(index=index, delta=DeltaMessage(content=text))]}
                    )
                )
            yield frames.frame(choice.index, choice.delta.content)
        else:
            yield sse(chunk)


def _text_only(choice: ChatChunkChoice) -> bool:
    delta = choice.delta
    return (
        bool(delta.content)
        and delta.role is None
        and delta.reasoning_content is None
        and not delta.tool_calls
        and choice.logprobs is None
        and choice.finish_reason is None
        and choice.stop_reason is None
    )
