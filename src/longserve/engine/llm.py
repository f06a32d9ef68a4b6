"""LLM: the offline Python API, batch in, one RequestOutput per prompt out (vLLM-style)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceOf

from longserve.config import EngineConfig
from longserve.engine.engine import LLMEngine
from longserve.engine.outputs import OutputBuilder, RequestOutput
from longserve.engine.protocol import EngineRequest
from longserve.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """``LLM(model=None)`` loads the default model; keyword arguments are EngineConfig fields."""

    def __init__(self, model: str | None = None, **engine_options) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (``tensor_parallel_size > 1``); a no-op on one device."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | SequenceOf[Prompt],
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
        *,
        add_special_tokens: bool = True,
        lora: str | SequenceOf[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs come back in prompt order. ``lora``: the
        adapter (a ``lora_modules`` name) every prompt runs with, or one per prompt (None: the base model)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
        loras = [lora] * len(prompts) if lora is None or isinstance(lora, str) else list(lora)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} LoRA adapters for {len(prompts)} prompts")
        engine, tokenizer = self.engine, self.tokenizer
        unknown = sorted({name for name in loras if name is not None} - set(engine.lora_names))
        if unknown:
            raise ValueError(f"LoRA adapters {unknown} are not loaded (loaded: {engine.lora_names})")
        # Validate everything before queuing anything, so a bad prompt leaves no half-run batch behind.
        builders: dict[str, OutputBuilder] = {}
        for prompt, params, adapter in zip(prompts, sampling_params, loras, strict=True):
            if isinstance(prompt, str):
                ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            else:
                ids = list(prompt)
            engine.limits.check_prompt(ids, params)
            request = EngineRequest(f"llm-{next(self._ids)}", ids, params, adapter)
            text = prompt if isinstance(prompt, str) else None
            builders[request.request_id] = OutputBuilder(tokenizer, request, text)
        for builder in builders.values():
            engine.add_request(builder.request)
        while engine.has_unfinished():
            for delta in engine.step():
                builder = builders[delta.request_id]
                for index in builder.add(delta):
                    engine.abort(delta.request_id, index)  # a stop string ended it
        return [builder.output() for builder in builders.values()]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        return self.generate(prompts, sampling_params, add_special_tokens=False)
