"""EngineConfig and ServeConfig: every engine and serving knob with its default, in one place; the CLI and LONGSERVE_* env map onto it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace

from longserve.attention.moba_params import validate_moba_params

# Torch-free on purpose: the API server and the controller read ServeConfig without loading torch.
DTYPES = ("float32", "bfloat16", "float16", "float64")
KV_CACHE_DTYPES = ("float32", "float16", "bfloat16")


SPECULATIVE_METHODS = ("ngram", "suffix", "draft_model", "mtp")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, as vLLM's ``--speculative-config`` JSON: a proposer drafts up to
    ``num_speculative_tokens`` tokens per sequence and one forward pass verifies them (spec_decode/)."""

    # "ngram": prompt lookup; "suffix": frequency-ranked continuations (SuffixDecoding); "draft_model": a
    # smaller model with the target's tokenizer (``model``); "mtp": the multi-token-prediction layer a
    # DeepSeek-V3 checkpoint carries
    method: str
    num_speculative_tokens: int = 4  # the most draft tokens per sequence and step
    # ngram: the longest and shortest tail n-grams looked up in the sequence's own tokens
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # suffix: how deep the suffix trees go, how many finished requests' outputs the shared tree keeps, and
    # the least estimated probability of a drafted token (drafting stops at the first below it)
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_cached_requests: int = 1000
    suffix_decoding_min_token_prob: float = 0.1
    # draft_model: the draft's GGUF file or HF directory; draft_model and mtp: the draft's own KV cache
    # (allocated before the target's, so on a GPU the target's cache takes what the utilization leaves)
    model: str | None = None
    draft_kv_cache_memory_mb: int = 1024

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative_config method must be one of {list(SPECULATIVE_METHODS)}, got {self.method!r}"
            )
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                     "suffix_decoding_max_tree_depth"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config {name} must be a positive integer, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative_config prompt_lookup_min ({self.prompt_lookup_min}) must not exceed "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError("speculative_config: a model is given with method 'draft_model', and only then")
        if not isinstance(self.draft_kv_cache_memory_mb, int) or self.draft_kv_cache_memory_mb < 1:
            raise ValueError("speculative_config draft_kv_cache_memory_mb must be a positive integer")
        if self.suffix_decoding_max_cached_requests < 0:
            raise ValueError("speculative_config suffix_decoding_max_cached_requests must be >= 0")
        if not 0.0 <= self.suffix_decoding_min_token_prob <= 1.0:
            raise ValueError("speculative_config suffix_decoding_min_token_prob must be in [0, 1]")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
        """From a JSON object (the CLI flag), a dict (``LLM(speculative_config=...)``) or itself."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {unknown}; known: {sorted(known)}")
        if "method" not in value:
            raise ValueError(f"speculative_config needs a method, one of {list(SPECULATIVE_METHODS)}")
        return cls(**value)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class EngineConfig:
    # GGUF file, HF directory, or a hub repo id in the local hub cache; None = the default SmolLM2 GGUF
    model: str | None = None
    revision: str | None = None  # the hub repo's branch, tag or commit (hub ids only; default main)
    device: str = "cpu"  # where the weights, the KV cache and the step run: "cpu" or "cuda" ("cuda:1", ...)
    dtype: str = "float32"  # weights and activations; float32 is the exact mode
    # None (auto): "gguf" for a GGUF with projections in block formats on the CPU, else exact. "none": exact
    # fp32 (the file's values expanded). "gguf": the file's own blocks kept low-bit, integer dot products with
    # activations rounded to 16-bit blocks; "gguf-q8": 8-bit blocks (llama.cpp's arithmetic). "int8": dynamic
    # int8 matmuls on CPU.
    quantization: str | None = None
    attention: str = "dense"  # attention backend: dense | reference | moba
    moba_chunk_size: int = 4096  # moba: tokens per key block (a multiple of 16 and of block_size)
    moba_topk: int = 12  # moba: blocks each query attends, its own block included
    moba_full_layers: int = 3  # moba: how many of the last layers keep dense attention
    # moba, for models not trained with it: block 0 (the attention sink) and the blocks holding the last
    # moba_window tokens are attended whatever the gating says (they take the first of the topk - 1 choices)
    moba_sink: bool = False
    moba_window: int = 0
    block_size: int = 16  # tokens per KV cache block
    enable_prefix_caching: bool = (
        True  # full KV blocks stay cached by content and are reused by later prompts
    )
    # KV cache size per rank; the number of blocks follows from it. None: on a GPU, what gpu_memory_utilization
    # leaves (kv_sizing.py); on the CPU 512 MiB, committed (zeroed) at start (in fp16 it holds 64 streams
    # of ~350 tokens of the default model, so 32-64 concurrent requests do not preempt).
    kv_cache_memory_mb: int | None = None
    # What the KV cache stores: "auto" is fp16 for the CPU's low-bit GGUF modes (as llama.cpp's cache: half the
    # bytes decode attention reads), else --dtype. On a GPU only auto or --dtype itself.
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = (
        0.9  # share of the GPU's memory the engine may hold, its KV cache included
    )
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_mb (block 0 is reserved as padding)
    max_model_len: int | None = None  # None = the model's context length
    # Per-step token budget (decodes + prompt chunks); None = by device (default_max_num_batched_tokens).
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 64  # sequences running at once
    num_threads: int | None = None  # torch intra-op threads; None = all cores
    enforce_eager: bool = False  # CUDA: run decode steps eagerly instead of replaying captured CUDA graphs
    # Overlap each step's host work with the previous step on the device; None: on for CUDA, off on the CPU
    # (where the same cores do both, so there is nothing to overlap).
    async_scheduling: bool | None = None
    # Speculative decoding (SpeculativeConfig, or its dict / JSON); None: off. A step that verifies drafts, or
    # after which a sequence may draft, is read back at once; the others overlap as without speculation. MTP
    # reads every step's hidden states on the host, so it turns async_scheduling off (asking for both: error).
    speculative_config: SpeculativeConfig | None = None
    # LoRA adapters (lora/), on when enable_lora or lora_modules: a request names one as its model
    enable_lora: bool = False
    lora_modules: tuple[str, ...] = ()  # "name=path" (a PEFT directory), loaded at start
    max_loras: int = 1  # adapters in the device slots at once: one step mixes up to this many
    max_lora_rank: int = 16  # the highest adapter rank accepted (slots are sized by it)
    max_cpu_loras: int | None = None  # adapters kept in host memory when unused; None: max_loras
    show_progress: bool = False  # progress bar while loading
    # Tensor parallelism: one rank per device (one process each, the engine's own is rank 0); heads, MLP rows
    # and the vocabulary split across ranks. kv_cache_memory_mb is per rank.
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False  # MoE: whole experts split across the ranks instead of their rows
    nnodes: int = 1  # nodes the ranks span (torchrun's --nnodes); each runs tensor_parallel_size / nnodes
    node_rank: int = 0  # this node's index; node 0 runs rank 0, the engine
    master_addr: str = "127.0.0.1"  # rank 0's host, where the ranks meet
    master_port: int | None = None  # None: a free port on one node; 29500 across nodes

    def __post_init__(self) -> None:
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in (None, "none", "int8", "gguf", "gguf-q8"):
            raise ValueError(
                "quantization must be None (auto), 'none', 'int8', 'gguf' or 'gguf-q8', "
                f"got {self.quantization!r}"
            )
        for name in ("block_size", "kv_cache_memory_mb", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if value is None and name in ("max_num_batched_tokens", "kv_cache_memory_mb"):
                continue  # chosen by device once the engine has placed the model
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.kv_cache_dtype not in ("auto", *KV_CACHE_DTYPES):
            raise ValueError(
                f"kv_cache_dtype must be 'auto' or one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        if self.device.startswith("cuda") and self.kv_cache_dtype not in ("auto", self.dtype):
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} runs on the CPU; on a GPU the cache holds --dtype "
                f"({self.dtype}): leave it auto"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            # Every running sequence's decode must fit in one step, or the last ones would stall.
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        for name in ("tensor_parallel_size", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(
                f"tensor_parallel_size ({self.tensor_parallel_size}) must be a multiple of nnodes ({self.nnodes})"
            )
        if not isinstance(self.node_rank, int) or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, {self.nnodes}), got {self.node_rank!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        self._validate_attention()
        self._validate_lora()
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if (
            self.speculative_config is not None
            and self.speculative_config.method == "mtp"
            and self.async_scheduling
        ):
            raise ValueError(
                "MTP drafts from every step's hidden states, read on the host before the next step is "
                "scheduled: it cannot run with async_scheduling"
            )

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_modules)

    def lora_paths(self) -> dict[str, str]:
        """``lora_modules`` as name -> path."""
        return dict(module.split("=", 1) for module in self.lora_modules)

    def _validate_lora(self) -> None:
        if isinstance(self.lora_modules, str):
            self.lora_modules = tuple(m.strip() for m in self.lora_modules.split(",") if m.strip())
        for module in self.lora_modules:
            name, _, path = module.partition("=")
            if not name or not path:
                raise ValueError(f"lora_modules entries are name=path, got {module!r}")
        names = [m.split("=", 1)[0] for m in self.lora_modules]
        if len(set(names)) != len(names):
            raise ValueError(f"lora_modules names must be unique, got {names}")
        for name in ("max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})"
            )

    def _validate_attention(self) -> None:
        if self.attention not in ("dense", "reference", "moba"):
            raise ValueError(f"attention must be 'dense', 'reference' or 'moba', got {self.attention!r}")
        validate_moba_params(self.moba_chunk_size, self.moba_topk, self.moba_sink, self.moba_window)
        full = self.moba_full_layers
        if not isinstance(full, int) or isinstance(full, bool) or full < 0:
            raise ValueError(f"moba_full_layers must be an integer >= 0, got {full!r}")
        if self.attention == "moba" and self.moba_chunk_size % self.block_size:
            raise ValueError(
                f"moba_chunk_size ({self.moba_chunk_size}) must be a multiple of block_size ({self.block_size})"
            )

    @property
    def torch_dtype(self):  # -> torch.dtype; torch is imported only by the engine that asks
        import torch

        return getattr(torch, self.dtype)

    def cache_dtype(self, low_bit_on_cpu: bool):  # -> torch.dtype
        """The KV cache's element type; ``low_bit_on_cpu``: the matmuls run GGUF blocks on the CPU."""
        import torch

        if self.kv_cache_dtype != "auto":
            return getattr(torch, self.kv_cache_dtype)
        return torch.float16 if low_bit_on_cpu else self.torch_dtype

    def overlaps_steps(self, device_type: str) -> bool:
        """Whether steps overlap (``async_scheduling``) for a model on ``device_type``."""
        if self.speculative_config is not None and self.speculative_config.method == "mtp":
            return False
        return self.async_scheduling if self.async_scheduling is not None else device_type == "cuda"

    def resolved(self, device_type: str) -> EngineConfig:
        """This config with every by-device default filled in for a model on ``device_type``."""
        if self.max_num_batched_tokens is not None:
            return self
        budget = max(default_max_num_batched_tokens(device_type), self.max_num_seqs)
        return replace(self, max_num_batched_tokens=budget)

    @classmethod
    def from_env(cls, **overrides) -> EngineConfig:
        """Defaults, then ``LONGSERVE_<FIELD>`` environment variables, then explicit overrides."""
        return cls(**_env_values(cls, overrides))


def default_max_num_batched_tokens(device_type: str) -> int:
    """Per-step token budget that keeps running streams flowing while prompts are prefilled.

    Every step runs all running decodes plus up to the rest of the budget in prompt chunks, so the budget
    bounds how long a decode waits for its next token. On 2 CPU cores the default model's step costs ~2 ms per
    prompt token (512: ~1 s, 2048: ~5 s) and chunks of 256-512 are the cheapest per token; 256 would halve the
    worst stall but stall more tokens when a burst of prompts arrives (benchmarks/NOTES.md). A GPU prefills
    8192 tokens of a 1B model in ~30 ms and wants large batches: 256 prompts of 128 tokens took 328 ms of
    prefill steps at 2048 and 118 ms at 8192 (16384 gave no more), 45.8K -> 69.8K tok/s end to end on an H100
    (vLLM's API server default is 8192 too).
    """
    return 8192 if device_type == "cuda" else 512


def _env_values(cls: type, overrides: dict) -> dict:
    values = {}
    for f in fields(cls):
        raw = os.environ.get(f"LONGSERVE_{f.name.upper()}")
        if raw is not None:
            values[f.name] = _parse(raw, f.type)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return values


def _parse(raw: str, annotation: str) -> object:
    if "tuple" in annotation:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if "float" in annotation:
        return float(raw)
    if "bool" in annotation:
        return raw.lower() in ("1", "true", "yes", "on")
    if "int" in annotation:
        return int(raw)
    return raw


@dataclass
class ServeConfig:
    """Serving-stack settings: addresses, limits, heartbeats. Everything binds 127.0.0.1 unless told otherwise."""

    host: str = "127.0.0.1"
    api_port: int = 8000
    controller_port: int = 21001
    worker_port: int = 21002
    controller_address: str = "http://127.0.0.1:21001"
    worker_address: str | None = (
        None  # how the controller reaches this worker; default http://host:worker_port
    )
    # names served to clients, comma-separated aliases; default: the repo id or the model's file name
    model_name: str | None = None
    api_keys: tuple[str, ...] = ()  # empty: no authentication (LONGSERVE_API_KEYS: comma-separated)
    dispatch_method: str = "shortest_queue"  # or "lottery", or "cache_aware" (prefers the worker holding
    # the longest part of the prompt's prefix, within a load margin; serve/prefix_routing.py)
    heart_beat_interval_s: float = 15.0
    heart_beat_expiration_s: float = 45.0
    worker_concurrency: int = 64  # requests a worker admits at once (its semaphore)
    max_queue_len: int = 256  # requests that may wait for a worker's semaphore; beyond that, 429 at once
    max_in_flight_requests: int = 4096  # generation requests one API server handles at once; beyond, 429
    api_server_count: int = 1  # API server processes sharing api_port (SO_REUSEPORT); `serve` runs them apart
    max_request_body_bytes: int = 4 * 2**20  # larger bodies get 413
    worker_connect_retries: int = 3  # other workers tried when one is unreachable before streaming
    # A worker stream silent this long fails its request; live workers send a keep-alive line every
    # worker_stream_keepalive_s, so only a frozen worker or a broken network trips it.
    worker_stream_timeout_s: float = 60.0
    worker_stream_keepalive_s: float = 5.0
    request_timeout_s: float | None = None  # a whole generation request; None: no limit
    # A generation request whose stream has brought no token for this long ends with a 504 error (a worker
    # that answers keep-alives but makes no progress); None: no limit.
    request_stall_timeout_s: float | None = None
    sse_keepalive_s: float = 15.0  # an SSE comment to a client whose stream has been silent this long
    # The worker runs its engine core in a child process (its forward passes never share the worker's GIL);
    # True keeps it on a thread of the worker process instead (tests, debugging).
    engine_in_process: bool = False
    # The model's tool-call format (a serve/tool_parsers name); None: detected from its chat template.
    tool_call_parser: str | None = None
    # The model's reasoning format (a serve/reasoning_parsers name); None: detected from its chat template.
    reasoning_parser: str | None = None
    web_ui: bool = True  # the API server's web chat page at / (serve/static/); False: / is a 404
    # Drain on SIGTERM / Ctrl-C: stop admitting (/health 503 "draining"), let running requests finish for up to
    # this long, then end what is left with an error event and exit 0; a second signal stops at once. 0: at once.
    shutdown_timeout_s: float = 30.0
    # A worker whose engine core has requests but completes no step for this long (a hung kernel, a deadlock)
    # fails them, kills the core and starts another, as for a core that died.
    engine_stall_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.dispatch_method not in ("shortest_queue", "lottery", "cache_aware"):
            raise ValueError(
                "dispatch_method must be 'shortest_queue', 'lottery' or 'cache_aware', "
                f"got {self.dispatch_method!r}"
            )
        if self.heart_beat_expiration_s <= self.heart_beat_interval_s:
            raise ValueError("heart_beat_expiration_s must be larger than heart_beat_interval_s")
        for name in ("worker_concurrency", "max_in_flight_requests", "api_server_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_len < 0:
            raise ValueError(f"max_queue_len must be >= 0, got {self.max_queue_len}")
        # The keep-alive is the workers' setting and the timeout the API server's, often in other processes:
        # keep the timeout well above the workers' keep-alive.
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
        for name in ("worker_stream_timeout_s", "worker_stream_keepalive_s", "sse_keepalive_s",
                     "engine_stall_timeout_s"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("request_timeout_s", "request_stall_timeout_s"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if isinstance(self.api_keys, str):
            self.api_keys = tuple(k.strip() for k in self.api_keys.split(",") if k.strip())

    @property
    def own_worker_address(self) -> str:
        return self.worker_address or f"http://{self.host}:{self.worker_port}"

    @classmethod
    def from_env(cls, **overrides) -> ServeConfig:
        """Defaults, then ``LONGSERVE_<FIELD>`` environment variables, then explicit overrides."""
        return cls(**_env_values(cls, overrides))
