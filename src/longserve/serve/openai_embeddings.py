"""/v1/embeddings: inputs (text or token ids, one or a batch) and ``dimensions`` to a worker, vectors back as
floats or base64. The worker pools as its model says (see /v1/models: ``pooling``, ``embedding_only``)."""

from __future__ import annotations

import base64
import struct

from fastapi.responses import Response

from longserve.serve.openai_common import json_response
from longserve.serve.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, UsageInfo
from longserve.serve.upstream import Upstream
from longserve.serve.worker_protocol import EmbeddingsRequest, EmbeddingsResponse


def encode_base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the little-endian float32 array (what its Python client decodes)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def embeddings(req: EmbeddingRequest, upstream: Upstream) -> Response:
    inputs = req.inputs()
    result = await upstream.call_worker(
        req.model,
        "/worker_get_embeddings",
        EmbeddingsRequest(model=req.model, inputs=inputs, dimensions=req.dimensions),
        EmbeddingsResponse,
    )
    data = [
        EmbeddingData(embedding=encode_base64(v) if req.encoding_format == "base64" else v, index=i)
        for i, v in enumerate(result.embeddings)
    ]
    usage = UsageInfo(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return json_response(EmbeddingResponse(data=data, model=req.model, usage=usage))
