"""LoRA decode throughput against the base model alone, in one process (issue 30).

The same batch of prompts runs on three engines in turn: ``base`` (no LoRA at all), ``lora-base`` (LoRA on,
every row without an adapter: what serving adapters costs the base model's users) and ``lora-mixed`` (LoRA on,
``--adapters`` adapters spread uniformly over the rows). The adapters have rank ``--rank`` on every projection
(q, k, v, o, gate, up, down) with random weights, written in PEFT's format by this script.

    python benchmarks/lora_throughput.py                        # CPU: default model, batch 8, 4 adapters, rank 8
    python benchmarks/lora_throughput.py --device cuda          # H200: 1B shape, batch 64, 8 adapters, rank 16
    python benchmarks/lora_throughput.py --device cuda --tiny   # dry run of the GPU path

Each system runs ``--repeats`` times after a warm-up; throughput counts generated tokens over the whole
``generate`` call (prefill included). The table shows the median, the spread, every run and the ratio of
medians against ``base``; JSON goes to benchmarks/results/lora_throughput-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _bench_util import default_model, machine_info, print_profile  # noqa: E402
from gpu_generate import SHAPES, build_checkpoint  # noqa: E402 - also puts tests/ on the path
from lora_adapters import write_random_adapter  # noqa: E402


def measure(llm, prompts, loras, new_tokens: int, repeats: int, device: str) -> list[float]:
    from longserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts, params, lora=loras)  # warm-up
    runs = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompts, params, lora=loras)
        if device == "cuda":
            torch.cuda.synchronize()
        runs.append(len(prompts) * new_tokens / (time.perf_counter() - start))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="GPU: a small shape, for a dry run")
    parser.add_argument("--batch", type=int, help="rows (default 8 on the CPU, 64 on a GPU)")
    parser.add_argument("--adapters", type=int, help="adapters mixed (default 4 on the CPU, 8 on a GPU)")
    parser.add_argument("--rank", type=int, help="adapter rank (default 8 on the CPU, 16 on a GPU)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, help="default 64 on the CPU, 128 on a GPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--profile", action="store_true", help="then one more lora-mixed run under the profiler"
    )
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    batch = args.batch or (64 if gpu else 8)
    num_adapters, rank = args.adapters or (8 if gpu else 4), args.rank or (16 if gpu else 8)
    new_tokens = args.new_tokens or (128 if gpu else 64)

    from longserve import LLM

    workdir = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    if gpu:
        model = build_checkpoint(SHAPES["tiny" if args.tiny else "1b"], "cuda", str(workdir / "model"))
        options = dict(device="cuda", dtype="bfloat16", gpu_memory_utilization=0.5)
    else:
        model = str(default_model())
        options = dict(kv_cache_memory_mb=256)
    options.update(max_num_seqs=batch, enable_prefix_caching=False)
    generator = torch.Generator().manual_seed(0)

    results: dict[str, list[float]] = {}
    llm = LLM(model, **options)
    config = llm.engine.model_config
    prompts = [torch.randint(3, config.vocab_size, (args.prompt_len,), generator=generator).tolist()
               for _ in range(batch)]  # fmt: skip
    results["base"] = measure(llm, prompts, None, new_tokens, args.repeats, args.device)
    adapters = {
        f"ad{i}": write_random_adapter(config, workdir / f"ad{i}", rank, i) for i in range(num_adapters)
    }
    del llm
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    modules = tuple(f"{name}={path}" for name, path in adapters.items())
    llm = LLM(model, lora_modules=modules, max_loras=num_adapters, max_lora_rank=rank, **options)
    results["lora-base"] = measure(llm, prompts, None, new_tokens, args.repeats, args.device)
    mixed = [f"ad{i % num_adapters}" for i in range(batch)]
    results["lora-mixed"] = measure(llm, prompts, mixed, new_tokens, args.repeats, args.device)
    if args.profile:
        from longserve import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        print_profile("lora-mixed", lambda: llm.generate(prompts, params, lora=mixed), args.device, rows=25)

    base = statistics.median(results["base"])
    print(f"\nLoRA throughput: {model if not gpu else ('tiny' if args.tiny else '1b') + ' shape'} on {args.device}, "
          f"batch {batch}, {num_adapters} adapters of rank {rank}, {args.prompt_len}+{new_tokens} tokens")  # fmt: skip
    print(f"{'system':<12} {'tok/s median':>13} {'[min-max]':>20}  {'vs base':>7}  runs")
    rows = {}
    for name, runs in results.items():
        median = statistics.median(runs)
        rows[name] = {
            "median": median,
            "min": min(runs),
            "max": max(runs),
            "runs": runs,
            "vs_base": median / base,
        }
        spread = f"[{min(runs):.1f}-{max(runs):.1f}]"
        print(
            f"{name:<12} {median:>13.1f} {spread:>20}  {median / base:>6.2f}x  {[round(r, 1) for r in runs]}"
        )
    out_dir = ROOT / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = out_dir / f"lora_throughput-{args.device}-{stamp}.json"
    out.write_text(json.dumps({
        "machine": machine_info(), "device": args.device, "model": model if not gpu else "1b-random",
        "batch": batch, "adapters": num_adapters, "rank": rank, "prompt_len": args.prompt_len,
        "new_tokens": new_tokens, "systems": rows,
    }, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
