"""Every message between the API server, the controller and the model workers, as typed pydantic models.

Controller endpoints (POST, JSON): register_worker, receive_heart_beat, list_models, list_workers,
get_worker_address, report_unresponsive_worker, worker_get_status, refresh_all_workers; GET health, live.
Worker endpoints (POST, JSON): worker_generate_stream (newline-delimited WorkerStreamChunk), worker_generate,
worker_get_embeddings, worker_get_status, count_token, tokenize, detokenize, model_details, apply_chat_template,
frontend_info;
GET health (503 while its engine cannot serve), live (the process answers).
A worker answers a request it rejects before generating with an HTTP error whose body is an ``ErrorInfo``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Prompt = str | list[int]


class ErrorInfo(BaseModel):
    """An error in the shape the OpenAI API uses, plus the HTTP status it maps to."""

    message: str
    type: str = "invalid_request_error"  # invalid_request_error | authentication_error | server_error | ...
    param: str | None = None  # the offending field, when one is to blame
    code: str | None = None
    status: int = 400


# ---- controller <-> worker ---------------------------------------------------------------------------------


class EmbeddingDetails(BaseModel):
    """What a worker's /worker_get_embeddings returns (shown in /v1/models)."""

    pooling: Literal["cls", "mean", "last"]  # hidden states pooled: the first token, the mean, the last token
    normalized: bool  # L2-normalised
    dimensions: int  # components of an embedding (the most a request's ``dimensions`` may ask for)
    embedding_only: bool  # the model cannot generate (an embedding checkpoint): generation requests get 400


class SpecDecodeCounts(BaseModel):
    """A worker's speculative decoding totals since it started (engine/protocol.py's ``SpecDecodeStats``)."""

    num_drafts: int = 0  # verifications: one sequence's drafts checked in one step
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = []  # accepted drafts at each position of a run


class WorkerStatus(BaseModel):
    model_names: list[str]  # its model's aliases, then its LoRA adapters
    lora_parents: dict[str, str] = Field(default_factory=dict)  # adapter name -> the base model's name
    speed: float = 1.0  # relative throughput weight used by dispatch
    queue_length: int = 0  # requests in flight on this worker (running + waiting for its semaphore)
    rejected: int = 0  # requests turned away with 429 (queue full) since the worker started
    running: int = 0  # sequences the engine is running
    waiting: int = 0  # sequences queued in the engine
    kv_cache_usage: float = 0.0  # fraction of KV blocks held (0..1)
    context_length: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache since the worker started
    prefix_cache_hits: int = 0  # of those, found cached
    spec_decode: SpecDecodeCounts | None = None  # None: the engine does not speculate
    ready: bool = True  # False while the engine core is down (restarting): dispatch and list_models skip it
    draining: bool = False  # shutting down: admits nothing new, finishes what runs (ready is False too)
    engine_stalls: int = 0  # engine cores restarted because no step completed within the stall timeout
    engine_restarts: int = 0  # engine cores restarted (died or stalled)
    running_loras: list[str] = Field(default_factory=list)  # LoRA adapters with running sequences
    waiting_loras: list[str] = Field(default_factory=list)
    max_loras: int = 0  # adapter slots; 0: LoRA off
    embedding: EmbeddingDetails | None = None  # None from workers that do not say


class RegisterWorkerRequest(BaseModel):
    worker_address: str  # base URL, e.g. http://127.0.0.1:21002
    worker_status: WorkerStatus
    check_heart_beat: bool = True  # False: never expired by heartbeat (for workers the controller polls)


class HeartBeatRequest(BaseModel):
    worker_address: str
    queue_length: int = 0
    ready: bool = True  # as WorkerStatus.ready: a worker whose engine is down stays known but gets no work


class HeartBeatResponse(BaseModel):
    exist: bool  # False: the controller does not know this worker; it must register again


class ListModelsResponse(BaseModel):
    models: list[str]
    context_lengths: dict[str, int] = Field(
        default_factory=dict
    )  # model -> longest context a live worker takes
    embeddings: dict[str, EmbeddingDetails] = Field(default_factory=dict)  # model -> what its embeddings are
    lora_parents: dict[str, str] = Field(default_factory=dict)  # LoRA adapter -> the model it adapts


class WorkerInfo(BaseModel):
    worker_address: str
    status: WorkerStatus
    last_heart_beat: float  # controller's monotonic clock, seconds
    check_heart_beat: bool = True


class ListWorkersResponse(BaseModel):
    workers: list[WorkerInfo]


class GetWorkerAddressRequest(BaseModel):
    model: str
    exclude: list[str] = Field(default_factory=list)  # workers the caller just failed to reach
    # the prompt's prefix fingerprint (serve/prefix_routing.py), for cache_aware dispatch; empty: none
    fingerprint: list[int] = Field(default_factory=list)
    dispatch: bool = True  # False: a look-up, not a generation (the worker's load count is left alone)


class GetWorkerAddressResponse(BaseModel):
    address: str  # empty when no live worker serves the model


class ReportWorkerRequest(BaseModel):
    """An API server saw this worker time out: dispatch skips it until it heartbeats again."""

    worker_address: str
    reason: str = ""


class ControllerStatus(BaseModel):
    model_names: list[str]
    num_workers: int
    speed: float
    queue_length: int


# ---- api server -> worker ----------------------------------------------------------------------------------


class StructuredOutputOptions(BaseModel):
    """StructuredOutputParams as it travels: exactly one field set."""

    json_: str | None = Field(None, alias="json")  # a JSON schema as text ("json" shadows a BaseModel method)
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    model_config = {"populate_by_name": True, "serialize_by_alias": True}


class SamplingOptions(BaseModel):
    """SamplingParams fields as they travel; the worker validates them by building SamplingParams."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_output: StructuredOutputOptions | None = None
    logit_bias: dict[int, float] | None = None


class WorkerGenerateRequest(BaseModel):
    model: str
    prompt: Prompt  # text (tokenized by the worker) or token ids
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)
    request_id: str | None = None
    # False for text rendered by a chat template: the template already wrote any BOS token it wants.
    add_special_tokens: bool = True


class TopLogprob(BaseModel):
    token_id: int
    token: str  # the token's text piece
    logprob: float


class TokenLogprobInfo(BaseModel):
    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = Field(default_factory=list)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0  # of the prompt tokens, those read from the prefix cache


class CompletionDelta(BaseModel):
    index: int  # which of the request's n completions
    text: str = ""  # new text
    token_ids: list[int] = Field(default_factory=list)  # new token ids
    logprobs: list[TokenLogprobInfo] | None = None  # for the new tokens, when requested
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class WorkerStreamChunk(BaseModel):
    """One line of worker_generate_stream. The first line carries the prompt's token ids (and prompt
    logprobs when asked); the last has ``finished`` and ``usage``; an error is a line with ``error`` set."""

    request_id: str
    outputs: list[CompletionDelta] = Field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[TokenLogprobInfo | None] | None = None
    prompt_token_texts: list[str] | None = None  # each prompt token's text, sent with prompt logprobs
    finished: bool = False
    usage: Usage | None = None
    error: ErrorInfo | None = None


class WorkerGenerateResponse(BaseModel):
    """worker_generate: the whole result at once (deltas already joined)."""

    request_id: str
    outputs: list[CompletionDelta]  # text/token_ids/logprobs are complete here
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprobInfo | None] | None = None
    usage: Usage


class EmbeddingsRequest(BaseModel):
    model: str
    inputs: list[Prompt]
    # Keep the first this many components (renormalised if the model normalises); None: all of them
    dimensions: int | None = Field(None, ge=1)


class EmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]  # pooled final hidden states, as the worker's EmbeddingDetails say
    prompt_tokens: int


class CountTokenRequest(BaseModel):
    model: str
    prompt: Prompt


class CountTokenResponse(BaseModel):
    count: int


class TokenizeRequest(BaseModel):
    model: str
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    tokens: list[int]
    token_strs: list[str] | None = None  # each token's own text (its vocabulary entry)
    max_model_len: int


class DetokenizeRequest(BaseModel):
    model: str
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelDetails(BaseModel):
    model_names: list[str]
    context_length: int


class ChatTemplateRequest(BaseModel):
    model: str
    messages: list[dict]
    add_generation_prompt: bool = True
    tools: list[dict] | None = None  # OpenAI tool definitions, for templates that describe them


class ChatTemplateResponse(BaseModel):
    prompt: str
    tool_parser: str | None = None  # the model's tool-call format (serve/tool_parsers), None if unknown


class FrontendInfo(BaseModel):
    """worker's frontend_info: what an API server needs to be a model's front end (fetched once per model),
    and where this worker's front-end stream listens."""

    model_names: list[str]
    lora_parents: dict[str, str] = Field(default_factory=dict)  # adapter name -> base name
    stream_address: str  # tcp://host:port of the worker's ZMQ stream (serve/stream_protocol.py)
    tokenizer_json: str  # the ``tokenizers`` JSON, GGUF tokenizers included (built into one at load)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    eos_token_ids: list[int] = Field(default_factory=list)
    chat_template: str | None = None
    tool_parser: str | None = None  # the model's tool-call format (serve/tool_parsers), None if unknown
    reasoning_parser: str | None = None  # the model's reasoning format (serve/reasoning_parsers), None: none
    vocab_size: int  # the engine's (the model's embedding rows): prompt token ids must be below it
    max_model_len: int
    cache_capacity: int
    can_generate: bool = True


class LoadLoRARequest(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` body (``lora_path``: a PEFT directory on the worker's host)."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRARequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's; ignored (names identify adapters here)
