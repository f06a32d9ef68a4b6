"""KV cache sizing: how many cache blocks a rank gets. On a GPU, what ``gpu_memory_utilization`` leaves once the
weights and the largest step's activations are counted (measured by one profile step, as vLLM does);
``kv_cache_memory_mb`` overrides it; on the CPU it is ``kv_cache_memory_mb`` or 512 MiB."""

from __future__ import annotations

import logging

import torch

from longserve.attention.metadata import host_metadata, plan_attention
from longserve.attention.paged_cache import allocate_kv_cache
from longserve.config import EngineConfig
from longserve.distributed.parallel import TensorParallel
from longserve.engine.sampler import Sampler
from longserve.engine.sampling_params import SamplingParams
from longserve.engine.sequence import Sequence

log = logging.getLogger(__name__)

CPU_DEFAULT_MB = 512


def kv_cache_bytes(config: EngineConfig, loaded, device: torch.device, tp: TensorParallel) -> int:
    """Bytes of KV cache for this rank (every rank gets the smallest of all ranks' budgets)."""
    if config.kv_cache_memory_mb is not None:
        return config.kv_cache_memory_mb * 2**20
    if device.type != "cuda":
        return CPU_DEFAULT_MB * 2**20
    peak = profile_step_memory(config, loaded, device, tp)
    torch.cuda.empty_cache()  # what the profile step cached goes back, so free memory is really free
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free  # this process's weights and CUDA context, and every other process on the GPU
    budget = int(total * config.gpu_memory_utilization) - in_use - peak
    if tp.is_parallel:
        budget = min(tp.all_gather_object(budget))
    if budget <= 0:
        raise ValueError(
            f"gpu_memory_utilization {config.gpu_memory_utilization} leaves no room for the KV cache on "
            f"{device}: {in_use / 2**30:.1f} of {total / 2**30:.1f} GiB are in use (the weights, other "
            f"processes) and the largest step needs {peak / 2**30:.2f} GiB; raise it, or set "
            "kv_cache_memory_mb"
        )
    log.info(
        "KV cache: %.2f GiB (%.0f%% of %.1f GiB, less %.1f GiB in use and %.2f GiB for the largest step)",
        budget / 2**30, 100 * config.gpu_memory_utilization, total / 2**30, in_use / 2**30, peak / 2**30,
    )  # fmt: skip
    return budget


def profile_step_memory(config: EngineConfig, loaded, device: torch.device, tp: TensorParallel) -> int:
    """Peak bytes the largest step allocates beyond what is held now: prompts filling the whole per-step token
    budget through the model, then the sampling of ``max_num_seqs`` rows (top-p sorts the vocabulary).

    It runs on a throwaway two-block cache (every slot maps to block 1: the values written do not matter).
    """
    mc = loaded.model_config
    tokens = config.resolved(device.type).max_num_batched_tokens
    block = config.block_size
    caches = allocate_kv_cache(
        mc.num_layers, 2, block, tp.local_kv_heads(mc.num_kv_heads), mc.head_dim,
        config.torch_dtype, device=device, gate_keys=config.attention == "moba",
    )  # fmt: skip
    # As many prompts as the budget holds when one may not be that long; positions stay within the model's.
    longest = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    lengths = [min(longest, tokens - start) for start in range(0, tokens, longest)]
    tables = [[1] * -(-n // block) for n in lengths]
    plan = plan_attention(tables, [0] * len(lengths), lengths, block)
    metadata = host_metadata(plan).to(device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, mc.vocab_size, (tokens,), generator=generator).to(device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        hidden = loaded.model(ids, positions, caches, metadata)  # [tokens, hidden]
        if loaded.family.can_generate:
            rows = min(config.max_num_seqs, tokens)
            logits = loaded.model.compute_logits(hidden[-rows:])  # [rows, vocab]
            params = SamplingParams(temperature=1.0, top_p=0.9, logprobs=1)
            seqs = [Sequence("profile", i, [0], params, frozenset(), 2) for i in range(rows)]
            Sampler().sample(logits, seqs).to_host()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
