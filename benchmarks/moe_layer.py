"""MoE layer benchmark: our ``MoE`` block against HF transformers' ``Qwen2MoeSparseMoeBlock``.

GPU part (skipped with a note without CUDA): one Qwen1.5-MoE-A2.7B-shaped block (hidden 2048, 60 experts of
1408, top-4, gated shared expert of 5632; bf16, random weights) at 16, 256 and 4096 tokens, ours under each
``expert_impl`` against HF under each ``experts_implementation``; outputs are checked to agree before timing;
the floor (max of measured-bandwidth and measured-matmul-rate times), the routed load balance, and where our
time goes (CPU launch time per call, CUDA-graph replay, per-kernel breakdown from torch.profiler) are
reported.

CPU part: decode tokens/s of the tiny Qwen2-MoE checkpoint (tests/tiny_models.py) through ``longserve.LLM``
against transformers' ``generate`` (fp32, greedy, 64 new tokens, batch 1 and 8), and a small MoE block (hidden
512, 16 experts of 256, top-2, fp32) ours against HF at 1 / 16 / 256 tokens.

    python benchmarks/moe_layer.py [--cpu-only | --gpu-only] [--sweep-triton] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks"), str(ROOT / "tests")]

import _moe_bench as mb  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GPU_TOKENS = (16, 256, 4096)
CPU_TOKENS = (1, 16, 256)
OURS_IMPLS = ("grouped_mm", "loop")
GPU_IMPLS = ("triton", "grouped_mm", "loop")  # triton: fused-MoE kernels (layers/moe_triton.py)
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
TARGET_SPEEDUP, TARGET_FLOOR = 1.5, 2.0
console = Console()


def compare_block(
    shape: mb.MoEShape, device: str, dtype: torch.dtype, token_counts: tuple[int, ...], prepared_cpu: bool
) -> list[dict]:
    """One row per (tokens, system): checked against HF eager first, then timed."""
    ours, hf = mb.build_blocks(shape, device, dtype)
    impls = GPU_IMPLS if device == "cuda" else OURS_IMPLS
    systems = {f"ours:{impl}": mb.ours_forward(ours, impl) for impl in impls}
    if prepared_cpu:
        ours_prepared, _ = mb.build_blocks(shape, device, dtype)
        mb.prepare_for_cpu(ours_prepared)
        systems["ours:auto(prepared)"] = mb.ours_forward(ours_prepared, "auto")
    systems.update({f"hf:{impl}": mb.hf_forward(hf, impl) for impl in mb.hf_experts_implementations()})
    timer = mb.time_gpu if device == "cuda" else mb.time_cpu
    ceilings = mb.gpu_ceilings() if device == "cuda" else None
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(1)
    for tokens in token_counts:
        x = torch.randn(tokens, shape.hidden, generator=gen).to(device=device, dtype=dtype)
        balance = mb.load_balance(ours, x)
        floor_ms = None
        if ceilings is not None:
            elem = torch.finfo(dtype).bits // 8
            bytes_s = shape.min_bytes(tokens, balance["experts_hit"], elem) / ceilings["bandwidth_Bps"]
            floor_ms = 1e3 * max(bytes_s, shape.flops(tokens) / ceilings["bf16_flops"])
        with torch.inference_mode():
            reference = mb.hf_forward(hf, "eager")(x)
            for name, fn in systems.items():
                row = {"tokens": tokens, "system": name, "balance": balance, "floor_ms": floor_ms}
                try:
                    err = mb.rel_err(fn(x), reference)
                except Exception as exc:  # an implementation this machine lacks (kernels package, device)
                    rows.append(row | {"error": f"{type(exc).__name__}: {str(exc)[:120]}"})
                    continue
                row["rel_err"] = err
                if err > TOLERANCE[dtype]:
                    rows.append(row | {"error": f"outputs disagree (rel err {err:.2e})"})
                    continue
                row["ms"] = timer(lambda fn=fn, x=x: fn(x))
                rows.append(row)
    if ceilings is not None:
        for row in rows:
            row["ceilings"] = ceilings
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per token count: our best, HF's best, their ratio, and the gap to the floor."""
    out = []
    for tokens in sorted({r["tokens"] for r in rows}):
        timed = [r for r in rows if r["tokens"] == tokens and "ms" in r]
        ours = [r for r in timed if r["system"].startswith("ours:")]
        hf = [r for r in timed if r["system"].startswith("hf:")]
        if not ours or not hf:
            continue
        best_ours, best_hf = min(ours, key=lambda r: r["ms"]), min(hf, key=lambda r: r["ms"])
        entry = {
            "tokens": tokens,
            "ours_best": best_ours["system"],
            "ours_ms": best_ours["ms"],
            "hf_best": best_hf["system"],
            "hf_ms": best_hf["ms"],
            "speedup_vs_hf_best": best_hf["ms"] / best_ours["ms"],
        }
        if best_ours.get("floor_ms"):
            entry["floor_ms"] = best_ours["floor_ms"]
            entry["ours_over_floor"] = best_ours["ms"] / best_ours["floor_ms"]
        out.append(entry)
    return out


def print_block_table(title: str, rows: list[dict], summary: list[dict]) -> None:
    table = Table(title=title)
    for col in ("tokens", "system", "ms", "rel err", "floor ms", "tokens/expert min/mean/max (hit)"):
        table.add_column(col, justify="right" if col != "system" else "left")
    for r in rows:
        b = r["balance"]
        table.add_row(
            str(r["tokens"]),
            r["system"],
            f"{r['ms']:.3f}" if "ms" in r else f"[red]{r.get('error', '')}[/red]",
            f"{r['rel_err']:.1e}" if "rel_err" in r else "",
            f"{r['floor_ms']:.3f}" if r.get("floor_ms") else "",
            f"{b['min']}/{b['mean']:.1f}/{b['max']} ({b['experts_hit']})",
        )
    console.print(table)
    verdict = Table(title=f"{title}: ours vs HF's best")
    for col in ("tokens", "ours best", "ms", "HF best", "ms ", "HF/ours", "ours/floor"):
        verdict.add_column(col)
    for s in summary:
        speed = s["speedup_vs_hf_best"]
        mark = "green" if speed >= TARGET_SPEEDUP else "red"
        floor = s.get("ours_over_floor")
        verdict.add_row(
            str(s["tokens"]),
            s["ours_best"],
            f"{s['ours_ms']:.3f}",
            s["hf_best"],
            f"{s['hf_ms']:.3f}",
            f"[{mark}]{speed:.2f}x[/{mark}]",
            f"{floor:.2f}x" if floor else "",
        )
    console.print(verdict)


def gpu_part() -> dict:
    if not torch.cuda.is_available():
        console.print("[yellow]GPU part skipped: CUDA is not available[/yellow]")
        return {"skipped": "CUDA not available"}
    torch.manual_seed(0)
    rows = compare_block(mb.QWEN15_MOE_A27B, "cuda", torch.bfloat16, GPU_TOKENS, False)
    summary = summarize(rows)
    print_block_table("GPU MoE block, Qwen1.5-MoE-A2.7B shape, bf16", rows, summary)
    at_4096 = next((s for s in summary if s["tokens"] == 4096), {})
    targets = {
        "speedup_at_every_size": bool(summary)
        and all(s["speedup_vs_hf_best"] >= TARGET_SPEEDUP for s in summary),
        "within_2x_floor_at_4096": at_4096.get("ours_over_floor", float("inf")) <= TARGET_FLOOR,
    }
    extra = gpu_diagnostics()
    console.print(
        f"targets: >= {TARGET_SPEEDUP}x HF's best at every size: {targets['speedup_at_every_size']}; "
        f"<= {TARGET_FLOOR}x floor at 4096: {targets['within_2x_floor_at_4096']}"
    )
    return {
        "device": torch.cuda.get_device_name(),
        "shape": vars(mb.QWEN15_MOE_A27B),
        "rows": rows,
        "summary": summary,
        "targets": targets,
        "diagnostics": extra,
    }


def gpu_diagnostics() -> dict:
    """Where our time goes, per stacked-weight implementation and token count: CPU launch time per call,
    CUDA-graph replay (no launch gaps), and the kernel breakdown."""
    ours, _ = mb.build_blocks(mb.QWEN15_MOE_A27B, "cuda", torch.bfloat16)
    out: dict = {}
    for impl in ("triton", "grouped_mm"):
        fn = mb.ours_forward(ours, impl)
        for tokens in GPU_TOKENS:
            x = torch.randn(tokens, ours.hidden_size, device="cuda", dtype=torch.bfloat16)
            entry: dict = {}
            with torch.inference_mode():
                try:
                    entry["host_ms"] = mb.host_ms(lambda x=x, fn=fn: fn(x))
                    entry["graph_ms"] = mb.time_gpu(mb.graph_forward(fn, x))
                except Exception as exc:  # capture needs every op to be graph-safe
                    entry["graph_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                try:
                    entry["kernels"] = mb.kernel_breakdown(lambda x=x, fn=fn: fn(x))
                except Exception as exc:  # e.g. no Triton on this machine
                    entry["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                    entry["kernels"] = []
            out[f"{impl}:{tokens}"] = entry
            times = ", ".join(f"{k} {v:.3f}" for k, v in entry.items() if k.endswith("_ms"))
            table = Table(title=f"ours:{impl} at {tokens} tokens: kernels ({times})")
            for col in ("kernel", "us/call", "launches/call"):
                table.add_column(col)
            for k in entry["kernels"]:
                table.add_row(k["kernel"], f"{k['us_per_call']:.1f}", f"{k['count_per_call']:.0f}")
            console.print(table)
    return out


def sweep_grid(tokens: int) -> list:
    """Tile configs to try at ``tokens``: small row-blocks for weight-bound sizes, large ones for prefill."""
    import itertools

    from longserve.layers import moe_triton as mt

    if tokens <= 512:
        space = itertools.product((16, 32), (64, 128), (128,), (4,), (3, 4, 5))
    else:
        space = itertools.product((64, 128), (64, 128), (64,), (4, 8), (3, 4))
    return [mt.TileConfig(bm, bn, bk, 1 if bm <= 32 else 8, w, st) for bm, bn, bk, w, st in space]


def triton_sweep() -> dict:
    """Time the fused-MoE Triton kernels (align + both matmuls; routed experts plus the shared expert as
    slots) under a grid of tile configs, with and without TMA weight loads, at each GPU token count, against
    the default heuristic's pick: for tuning ``default_configs``."""
    from longserve.layers import moe_triton as mt
    from longserve.layers.moe import route

    ours, _ = mb.build_blocks(mb.QWEN15_MOE_A27B, "cuda", torch.bfloat16)
    w_gate_up, w_down, extra = ours._fused_shared_weights()
    experts = w_gate_up.shape[0]
    out: dict = {}
    for tokens in GPU_TOKENS:
        x = torch.randn(tokens, ours.hidden_size, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            _, ids = route(ours.gate(x), ours.router)
            default = mt.default_configs(tokens, tokens * (ids.shape[1] + extra), experts)[0]
            times = []
            for config in dict.fromkeys([default, *sweep_grid(tokens)]):
                for tma in (True, False):
                    try:
                        ms = mb.time_gpu(
                            lambda c=config, t=tma, x=x, ids=ids: mt.fused_experts(
                                x, ids, w_gate_up, w_down, c, shared_slices=extra, use_tma=t
                            )
                        )
                    except Exception as exc:  # e.g. out of shared memory for this tile
                        console.print(f"[yellow]{config} tma={tma}: {type(exc).__name__}[/yellow]")
                        continue
                    entry = {"config": vars(config), "tma": tma, "ms": ms, "default": config == default}
                    times.append(entry)
        times.sort(key=lambda r: r["ms"])
        out[tokens] = times
        table = Table(title=f"Triton fused experts at {tokens} tokens: fastest configs (default marked *)")
        for col in ("ms", "BM", "BN", "BK", "GROUP_M", "warps", "stages", "TMA"):
            table.add_column(col)
        for r in times[:8] + [r for r in times[8:] if r["default"]]:
            c = r["config"]
            table.add_row(
                f"{r['ms']:.3f}{'*' if r['default'] else ''}",
                *(str(c[k]) for k in ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages")),
                str(r["tma"]),
            )
        console.print(table)
    return out


def decode_rates(directory: str, threads: int, new_tokens: int, batches: tuple[int, ...]) -> list[dict]:
    """Decode tokens/s, ours and HF generate: (t(n new) - t(1 new)) excludes prefill."""
    import transformers

    from longserve import LLM, SamplingParams

    gen = torch.Generator().manual_seed(2)
    prompts = {b: torch.randint(3, 200, (b, 16), generator=gen).tolist() for b in batches}
    llm = LLM(model=directory, dtype="float32", num_threads=threads)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()

    def ours(batch: list[list[int]], k: int) -> None:
        llm.generate(batch, SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))

    def theirs(batch: list[list[int]], k: int) -> None:
        ids = torch.tensor(batch)
        with torch.inference_mode():
            hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k, do_sample=False
            )

    rows = []
    for b in batches:
        for name, fn in (("longserve.LLM", ours), ("transformers.generate", theirs)):
            fn(prompts[b], 4)  # warm-up
            full = min(_seconds(fn, prompts[b], new_tokens) for _ in range(3))
            first = min(_seconds(fn, prompts[b], 1) for _ in range(3))
            rate = b * (new_tokens - 1) / max(full - first, 1e-9)
            rows.append({"batch": b, "system": name, "total_s": full, "decode_tok_s": rate})
    return rows


def _seconds(fn, batch: list[list[int]], k: int) -> float:
    t0 = time.perf_counter()
    fn(batch, k)
    return time.perf_counter() - t0


def cpu_part(threads: int) -> dict:
    from tiny_models import write_tiny_model

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_tiny_model("qwen2_moe", tmp)
        decode = decode_rates(directory, threads, 64, (1, 8))
    table = Table(title=f"CPU decode, tiny Qwen2-MoE (fp32, {threads} threads, greedy, 64 new tokens)")
    for col in ("batch", "system", "decode tok/s", "total s"):
        table.add_column(col)
    for r in decode:
        table.add_row(str(r["batch"]), r["system"], f"{r['decode_tok_s']:.0f}", f"{r['total_s']:.3f}")
    console.print(table)
    torch.set_num_threads(threads)
    rows = compare_block(mb.CPU_SHAPE, "cpu", torch.float32, CPU_TOKENS, True)
    summary = summarize(rows)
    print_block_table(f"CPU MoE block (hidden 512, 16x256, top-2, fp32, {threads} threads)", rows, summary)
    return {
        "threads": threads,
        "decode": decode,
        "shape": vars(mb.CPU_SHAPE),
        "rows": rows,
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--gpu-only", action="store_true")
    only.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the CPU part")
    parser.add_argument(
        "--sweep-triton",
        action="store_true",
        help="GPU part: also time the Triton kernels under a grid of tiles",
    )
    parser.add_argument(
        "--out", type=Path, help="JSON path (default: benchmarks/results/moe_layer-<ts>.json)"
    )
    args = parser.parse_args()
    import transformers

    result: dict = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "loadavg_at_start": os.getloadavg(),  # other processes' load skews the CPU part
    }
    if not args.cpu_only:
        result["gpu"] = gpu_part()
        if args.sweep_triton and torch.cuda.is_available():
            result["gpu"]["triton_sweep"] = triton_sweep()
    if not args.gpu_only:
        result["cpu"] = cpu_part(args.threads)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        (RESULTS / f"moe_layer-{stamp}.json").write_text(text)
        (RESULTS / "moe_layer-latest.json").write_text(text)
    console.print(f"results written ({'--out' if args.out else RESULTS})")


if __name__ == "__main__":
    main()
