"""Driving an LLMEngine step by step in tests: requests as the core takes them, and their outputs as text."""

from __future__ import annotations

from longserve.engine.outputs import OutputBuilder, RequestOutput
from longserve.engine.protocol import EngineRequest
from longserve.engine.sampling_params import SamplingParams


def engine_request(engine, request_id: str, prompt: str | list[int], params: SamplingParams | None = None):
    """An ``EngineRequest`` (validated as the front end does); a text prompt is tokenized first."""
    ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    params = params or SamplingParams()
    engine.limits.check_prompt(ids, params)
    return EngineRequest(request_id, ids, params)


def run_to_end(engine, requests: list[EngineRequest]) -> tuple[dict[str, RequestOutput], list]:
    """Add every request, step until done; each request's output, and the engine's own requests (their
    sequences say how often they were preempted)."""
    builders = {r.request_id: OutputBuilder(engine.tokenizer, r) for r in requests}
    internal = []
    for request in requests:
        engine.add_request(request)
        internal.append(engine.requests[request.request_id])
    while engine.has_unfinished():
        for delta in engine.step():
            for index in builders[delta.request_id].add(delta):
                engine.abort(delta.request_id, index)
    return {rid: b.output() for rid, b in builders.items()}, internal
