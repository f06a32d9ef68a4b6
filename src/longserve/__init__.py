"""longserve: an LLM serving system with its own PyTorch engine (paged KV cache, continuous batching)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "longserve.engine.llm",
    "EngineCoreClient": "longserve.engine.core_client",
    "EngineConfig": "longserve.config",
    "SamplingParams": "longserve.engine.sampling_params",
    "RequestOutput": "longserve.engine.outputs",
    "CompletionOutput": "longserve.engine.outputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so importing one submodule (or running the CLI's --help) does not load the whole engine.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'longserve' has no attribute {name!r}")
