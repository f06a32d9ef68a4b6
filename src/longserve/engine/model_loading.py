"""Building one rank's model and KV cache from an EngineConfig: the checkpoint read, this rank's slices loaded,
the weights placed and prepared for their kernels. The engine (rank 0) and every follower rank call the same
functions, so all ranks agree on shapes and on the number of cache blocks."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from longserve.attention.backend import layer_backends
from longserve.attention.paged_cache import LayerKVCache, allocate_kv_cache
from longserve.config import EngineConfig
from longserve.distributed.parallel import TensorParallel
from longserve.engine.cuda_graphs import BUCKETS, DecodeGraphs
from longserve.engine.kv_sizing import kv_cache_bytes
from longserve.layers.matmul import runs_blocks
from longserve.loading.checkpoint import load_checkpoint
from longserve.loading.errors import ModelLoadError
from longserve.loading.pooling_config import PoolingConfig
from longserve.lora.manager import LoRAManager
from longserve.models.interface import CausalLM, Encoder
from longserve.models.registry import ModelFamily, build_model, resolve_architecture

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: CausalLM | Encoder  # eval mode, on its device, prepared for inference
    model_config: Any  # DecoderConfig or a family's own config (the whole model's shapes, not one rank's)
    family: ModelFamily
    tokenizer: Any
    hf_config: dict
    quantization: str | None  # what the matmuls run: None (exact), "int8" or "gguf"
    pooling: PoolingConfig  # how embeddings pool the hidden states


def load_model(config: EngineConfig, device: torch.device, tp: TensorParallel) -> LoadedModel:
    """This rank's shard of the model (all of it when ``tp.size == 1``); a bad checkpoint raises
    ``ModelLoadError`` naming the file."""
    checkpoint = load_checkpoint(
        config.model, revision=config.revision, show_progress=config.show_progress and tp.rank == 0
    )
    quantization = resolve_quantization(config.quantization, checkpoint, device, tp)
    try:
        model, model_config = build_model(
            checkpoint.config, partial(layer_backends, config), config.torch_dtype, tp
        )
        model.load_weights(checkpoint.weights, keep_blocks=runs_blocks(quantization))
        model.to(device)  # before prepare: kernel choices (oneDNN packing, int8) depend on the device
        model.prepare_for_inference(quantization)
        family = resolve_architecture(checkpoint.config)
    except ValueError as exc:
        raise ModelLoadError(f"{checkpoint.path}: {exc}") from exc
    return LoadedModel(
        model.eval(),
        model_config,
        family,
        checkpoint.tokenizer,
        checkpoint.config,
        quantization,
        checkpoint.pooling or family.default_pooling,
    )


def model_max_len(config: EngineConfig, model_config) -> int:
    """The longest context (prompt + completion) the engine serves: ``max_model_len``, within the model's."""
    limit = model_config.max_position_embeddings
    return min(config.max_model_len or limit, limit)


def allocate_caches(
    config: EngineConfig, loaded: LoadedModel, device: torch.device, tp: TensorParallel
) -> tuple[int, list[LayerKVCache]]:
    """(number of blocks, per-layer caches) for this rank's KV heads, sized by ``kv_sizing``."""
    mc = loaded.model_config
    if loaded.family.encoder:
        # One bidirectional pass per input, nothing cached: two blocks (never used) keep the scheduler whole.
        return 2, []
    kv_heads = tp.local_kv_heads(mc.num_kv_heads)
    dtype = config.cache_dtype(runs_blocks(loaded.quantization) and device.type == "cpu")
    bytes_per_token = 2 * mc.num_layers * kv_heads * mc.head_dim * dtype.itemsize
    num_blocks = config.num_kv_blocks or max(
        2, kv_cache_bytes(config, loaded, device, tp) // (bytes_per_token * config.block_size)
    )
    pool = num_blocks * config.block_size * bytes_per_token
    if device.type == "cpu":
        release_freed_heap()
        check_host_memory(pool)
    caches = allocate_kv_cache(
        mc.num_layers, num_blocks, config.block_size, kv_heads, mc.head_dim, dtype,
        device=device, gate_keys=config.attention == "moba" and device.type == "cuda",
    )  # fmt: skip
    log.info("KV cache: %.0f MiB of %s allocated and committed on %s", pool / 2**20, dtype, device)
    return num_blocks, caches


def release_freed_heap() -> None:
    """Hand the heap that loading freed (packing's and dequantization's scratch) back to the OS before the KV
    pool is committed, so the process's peak is not the two together (-70 MB on the default model). glibc
    keeps freed memory otherwise; other C libraries have no ``malloc_trim`` and keep their own policy."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


def check_host_memory(pool_bytes: int) -> None:
    """``ValueError`` at start when the KV cache cannot fit in the memory the machine has free now (rather
    than the process being killed later, as blocks are first used)."""
    available = host_memory_available()
    if available is not None and pool_bytes > available:
        raise ValueError(
            f"the KV cache needs {pool_bytes / 2**20:.0f} MiB but only {available / 2**20:.0f} MiB of memory is "
            "available: lower --kv-cache-memory-mb"
        )


def host_memory_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def build_graphs(
    config: EngineConfig,  # resolved for the device
    loaded: LoadedModel,
    caches: list[LayerKVCache],
    device: torch.device,
    tp: TensorParallel,
    max_model_len: int,
    max_rows: int | None = None,  # the most rows a graph takes; None: graph_rows(config)
) -> DecodeGraphs | None:
    """Captured decode graphs on CUDA (every rank captures the same buckets in the same order: the captures
    run the model's collectives), or None where steps run eagerly."""
    if device.type != "cuda" or config.enforce_eager or not loaded.family.can_generate:
        return None
    if (
        config.attention == "reference"  # the oracle gathers every context on the host's say
        or not loaded.model.supports_cuda_graphs
        or tp.expert_parallel  # its dispatch picks each rank's rows on the host
    ):
        log.info("CUDA graphs are not used for this model or attention backend: every step runs eagerly")
        return None
    rows = graph_rows(config) if max_rows is None else max_rows
    graphs = DecodeGraphs(loaded.model, caches, config.block_size, rows, max_model_len, device)
    graphs.capture_all()
    return graphs


def build_lora(
    config: EngineConfig, loaded: LoadedModel, device: torch.device, tp: TensorParallel
) -> LoRAManager | None:
    """Adapter slots on the model's projections and the adapters of ``lora_modules`` loaded into host
    memory, when LoRA is on (before graphs are captured: they capture the LoRA update too); else None."""
    if not config.lora_enabled:
        return None
    if tp.is_parallel:
        raise ValueError("LoRA adapters run on one device: tensor parallelism with LoRA is not supported")
    if not loaded.family.can_generate:
        raise ValueError(
            f"LoRA adapters are for generating models; {loaded.model_config.architecture} embeds"
        )
    from longserve.lora.manager import LoRAManager
    from longserve.lora.slots import LoRASlots

    max_rows = max(config.max_num_batched_tokens, BUCKETS[-1])  # a step's rows, a padded graph's too
    kernels = None
    if device.type == "cpu" and config.torch_dtype == torch.float32:
        from longserve.layers.cpu_kernels import cpu_kernels

        try:
            kernels = cpu_kernels()
        except RuntimeError as exc:
            log.warning("LoRA updates run as torch matmuls over every slot (slower): %s", exc)
    slots = LoRASlots(
        loaded.model.weight_targets(), config.max_loras, config.max_lora_rank, max_rows, device,
        config.torch_dtype, kernels,
    )  # fmt: skip
    manager = LoRAManager(slots, config.max_loras, config.max_cpu_loras or config.max_loras)
    for name, path in config.lora_paths().items():
        manager.add(name, path)
    return manager


def graph_rows(config: EngineConfig) -> int:
    """The most decode rows a captured graph takes: one per sequence, or with speculation one per sequence and
    draft (verification steps), within the step's token budget and the largest bucket."""
    if config.speculative_config is None:
        return config.max_num_seqs
    rows = config.max_num_seqs * (1 + config.speculative_config.num_speculative_tokens)
    budget = config.resolved("cuda").max_num_batched_tokens
    return max(config.max_num_seqs, min(rows, budget, BUCKETS[-1]))


def resolve_quantization(
    requested: str | None, checkpoint, device: torch.device, tp: TensorParallel | None = None
) -> str | None:
    """The matmul mode for ``requested`` (None = auto): ``"none"`` -> None (exact fp32); auto -> ``"gguf"`` on
    the CPU for a GGUF whose projections come in blocks the kernels run (``gguf_blocks``; llama.cpp's
    arithmetic at a fifth of fp32's bytes), else exact.

    Auto falls back to exact, with a warning that says why, when the low-bit kernels cannot be built here
    (no C++ compiler) or the model is split across ranks (each rank slices float rows); an explicit ``"gguf"``
    raises instead.
    """
    parallel = tp is not None and tp.is_parallel
    if requested == "none":
        return None
    if runs_blocks(requested) and device.type != "cpu":
        raise ValueError(
            f"quantization {requested!r} runs on the CPU; on a GPU the weights are expanded to --dtype"
        )
    if runs_blocks(requested) and parallel:
        raise ValueError(
            f"quantization {requested!r} keeps whole low-bit tensors; with tensor parallelism use none or int8"
        )
    if requested is not None:
        return requested
    blocks = getattr(checkpoint.weights, "has_blocks", None)
    if device.type != "cpu" or blocks is None or not blocks():
        return None
    if parallel:
        log.warning("tensor parallel: %s's low-bit blocks are expanded to %s", checkpoint.path, "float")
        return None
    from longserve.layers.cpu_kernels import cpu_kernels

    try:
        cpu_kernels()
    except RuntimeError as exc:
        log.warning("running %s in exact fp32 (5x the bytes per token): %s", checkpoint.path, exc)
        return None
    return "gguf"
