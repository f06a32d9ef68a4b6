"""The engine's command-line flags and their EngineConfig, shared by serve, worker, generate and
``longserve chat --local``."""

from __future__ import annotations

import argparse
import json

from longserve.config import EngineConfig


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="GGUF file, Hugging Face model directory, or a hub repo id in the local Hugging Face cache "
        "(default: SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--revision", help="a hub repo id's branch, tag or commit (default main)")
    parser.add_argument("--device", help="cpu (default) or cuda: where the model and KV cache live")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weight/activation dtype")
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        default=None,
        help="CUDA: run decode steps eagerly instead of replaying captured CUDA graphs",
    )
    parser.add_argument(
        "--quantization",
        choices=["none", "gguf", "gguf-q8", "int8"],
        help="CPU matmuls. Default: gguf for a GGUF with Q4_0/Q4_1/Q8_0/Q4_K/Q5_0/Q6_K weights, else none. "
        "gguf = the file's own low-bit blocks, integer dot products with activations rounded to 16-bit blocks "
        "(near-exact); gguf-q8 = the same with 8-bit activation blocks (llama.cpp's arithmetic, fastest); "
        "none = exact fp32 (the file's values expanded); int8 = dynamic-int8 decode matmuls (approximate)",
    )
    parser.add_argument("--attention", choices=["dense", "reference", "moba"], help="attention backend")
    parser.add_argument("--moba-chunk-size", type=int, help="moba: tokens per key block (default 4096)")
    parser.add_argument(
        "--moba-topk", type=int, help="moba: blocks each query attends, its own included (default 12)"
    )
    parser.add_argument(
        "--moba-full-layers", type=int, help="moba: last layers that keep dense attention (default 3)"
    )
    parser.add_argument(
        "--moba-sink",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="moba: every query also attends block 0, the attention sink (one of its top-k; default off)",
    )
    parser.add_argument(
        "--moba-window",
        type=int,
        help="moba: every query also attends the blocks holding its last N tokens (of its top-k; default 0)",
    )
    parser.add_argument("--max-model-len", type=int, help="context length cap (default: the model's)")
    parser.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse the KV of cached prompt prefixes (default on; --no-enable-prefix-caching turns it off)",
    )
    parser.add_argument(
        "--kv-cache-memory-mb",
        type=int,
        help="KV cache size in MiB per rank (default: 512 on CPU; on a GPU what --gpu-memory-utilization leaves)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="what the KV cache stores (default auto: float16 for GGUF blocks on the CPU, as llama.cpp; else "
        "--dtype; a GPU takes auto only)",
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="share of each GPU's memory the engine may hold, the KV cache included (default 0.9)",
    )
    parser.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prepare each step while the previous one runs on the GPU (default: on for CUDA, off on CPU)",
    )
    parser.add_argument(
        "--speculative-config",
        help='speculative decoding as vLLM\'s JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4}\' (methods: ngram, suffix; default off)',
    )
    lora = parser.add_argument_group("LoRA adapters (a request names one as its model)")
    lora.add_argument("--enable-lora", action="store_true", default=None, help="serve LoRA adapters")
    lora.add_argument(
        "--lora-modules",
        nargs="+",
        metavar="NAME=PATH",
        type=_lora_module,
        help='adapters (PEFT directories) loaded at start: name=path, or JSON {"name": ..., "path": ...}',
    )
    lora.add_argument("--max-loras", type=int, help="adapters one step may mix (device slots; default 1)")
    lora.add_argument("--max-lora-rank", type=int, help="the highest adapter rank accepted (default 16)")
    lora.add_argument("--max-cpu-loras", type=int, help="adapters kept in host memory (default --max-loras)")
    parser.add_argument("--threads", type=int, dest="num_threads", help="torch threads (default: all cores)")
    parser.add_argument("--max-num-seqs", type=int, help="sequences the engine runs at once (default 64)")
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="per-step token budget, decodes + prompt chunks (default 512 on CPU, 8192 on GPU); "
        "smaller keeps streams flowing while long prompts prefill",
    )
    parallel = parser.add_argument_group("tensor parallelism (torchrun-style placement across nodes)")
    parallel.add_argument("--tensor-parallel-size", "-tp", type=int, help="ranks the model is split over")
    parallel.add_argument(
        "--enable-expert-parallel", action="store_true", default=None, help="MoE: split whole experts"
    )
    parallel.add_argument("--nnodes", type=int, help="nodes the ranks span (default 1)")
    parallel.add_argument("--node-rank", type=int, help="this node's index; node 0 serves (default 0)")
    parallel.add_argument("--master-addr", help="node 0's address, where the ranks meet")
    parallel.add_argument("--master-port", type=int, help="rendezvous port (default: free / 29500)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.from_env(
        model=args.model,
        revision=args.revision,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        attention=args.attention,
        moba_chunk_size=args.moba_chunk_size,
        moba_topk=args.moba_topk,
        moba_full_layers=args.moba_full_layers,
        moba_sink=args.moba_sink,
        moba_window=args.moba_window,
        max_model_len=args.max_model_len,
        kv_cache_memory_mb=args.kv_cache_memory_mb,
        kv_cache_dtype=args.kv_cache_dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        async_scheduling=args.async_scheduling,
        speculative_config=args.speculative_config,
        num_threads=args.num_threads,
        show_progress=True,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_lora=args.enable_lora,
        lora_modules=tuple(args.lora_modules) if args.lora_modules else None,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
        **{name: getattr(args, name) for name in _PARALLEL_FIELDS},
    )


_PARALLEL_FIELDS = (
    "tensor_parallel_size", "enable_expert_parallel", "nnodes", "node_rank", "master_addr", "master_port",
)  # fmt: skip


def _lora_module(value: str) -> str:
    """One ``--lora-modules`` entry as ``name=path`` (vLLM's JSON form accepted too)."""
    if value.lstrip().startswith("{"):
        try:
            entry = json.loads(value)
            return f"{entry['name']}={entry['path']}"
        except (ValueError, KeyError, TypeError) as exc:
            raise argparse.ArgumentTypeError(f"not a JSON object with name and path: {value!r}") from exc
    name, _, path = value.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected name=path, got {value!r}")
    return value
