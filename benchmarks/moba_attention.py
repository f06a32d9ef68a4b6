"""MoBA attention on one GPU: block-sparse prefill and paged decode against full attention, side by side.

Prefill: one layer, batch 1, 32 query heads, 8 KV heads, head dim 128, bf16, chunk 4096, topk 12, at 32K, 128K,
512K and 1M tokens; full causal attention through each torch SDPA backend (cuDNN, flash, memory-efficient) and
our MoBA (gating included). Decode: one step for a batch of 8 at 128K and 512K cached tokens, MoBA against
dense paged decode (our split-K kernel at its best split, and SDPA over contiguous K/V).
Inputs are random, so every token chooses its blocks independently of its neighbours.

    python benchmarks/moba_attention.py                  # everything (needs a GPU; prints a table, writes JSON)
    python benchmarks/moba_attention.py --sizes 32768 --decode-contexts 131072 --skip-check
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _moba_bench as mb  # noqa: E402

from longserve.attention import moba_cuda, paged_decode  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, KV_HEADS, DIM = 32, 8, 128
TARGET_1M, TARGET_128K, TARGET_DECODE_512K = 10.0, 2.0, 3.0


def check(log: list[str]) -> dict:
    """bf16 kernels against the float64 oracle, on fresh random inputs each time."""
    results = {}
    cases = [  # (seq, queries, heads, kv_heads, chunk, topk)
        (2048, 2048, 32, 8, 256, 3),
        (1000, 700, 8, 2, 128, 4),  # chunked prefill: queries are the last 700 positions
        (4173, 4173, 8, 8, 512, 12),  # topk > blocks: full causal attention
        (3000, 3000, 4, 1, 64, 1),  # own block only
    ]
    for seq, queries, heads, kv_heads, chunk, topk in cases:
        q = torch.randn(queries, heads, DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(seq, kv_heads, DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(seq, kv_heads, DIM, device="cuda", dtype=torch.bfloat16)
        out = torch.full_like(q, float("nan"))
        moba_cuda.moba_prefill_sequence(q, k, v, chunk, topk, DIM**-0.5, out=out, window_tokens=1000)
        err = mb.rel_error(out, mb.oracle_moba(q, k, v, chunk, topk, DIM**-0.5, q_start=seq - queries))
        name = f"prefill seq={seq} q={queries} h={heads}/{kv_heads} chunk={chunk} topk={topk}"
        results[name] = err
        log.append(f"{name}: rel err {err:.2e}")
    batch, context, chunk, topk, page = 3, 20000, 2048, 4, 16
    k_cache, v_cache, tables = mb.paged_cache(batch, context, KV_HEADS, DIM, page, torch.bfloat16, seed=1)
    lens = torch.tensor([context, 9001, 4096], dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    gate_cache = _gate_cache(k_cache, tables, lens.tolist(), chunk, page)
    moba = moba_cuda.moba_paged_decode(
        q, k_cache, v_cache, tables, lens, context, page, gate_cache, chunk, topk, DIM**-0.5
    )
    dense = paged_decode.paged_decode(q, k_cache, v_cache, tables, lens, context, page, 1024, DIM**-0.5)
    for b, length in enumerate(lens.tolist()):
        kb = mb.gather_context(k_cache, tables[b], length, page)
        vb = mb.gather_context(v_cache, tables[b], length, page)
        for name, out, top in (("moba", moba, topk), ("dense", dense, 10**6)):
            ref = mb.oracle_moba(q[b : b + 1], kb, vb, chunk, top, DIM**-0.5, q_start=length - 1)
            err = mb.rel_error(out[b : b + 1], ref)
            results[f"decode {name} context={length}"] = err
            log.append(f"decode {name} context={length}: rel err {err:.2e}")
    return results


def _gate_cache(k_cache, tables, lens: list[int], chunk: int, page: int) -> torch.Tensor:
    """The gate-key cache the engine keeps: each complete block's mean key, stored at the block's first page."""
    cache = torch.zeros(k_cache.shape[0] // page, KV_HEADS, DIM, device="cuda")
    for b, length in enumerate(lens):
        g = moba_cuda.gate_keys(mb.gather_context(k_cache, tables[b], length, page), chunk)
        cache[tables[b, :: chunk // page][: g.shape[0]].long()] = g
    return cache


def prefill(
    sizes: list[int], chunk: int, topk: int, backends: list[str], kernel_options: dict, log: list[str]
) -> list[dict]:
    rows = []
    for seq in sizes:
        rows.append(_prefill_row(seq, chunk, topk, backends, kernel_options, log))
        torch.cuda.empty_cache()
    return rows


def _prefill_row(
    seq: int, chunk: int, topk: int, backends: list[str], kernel_options: dict, log: list[str]
) -> dict:
    big = seq > 131072
    reps, warmup = (1, 0) if big else (3, 1)
    q = torch.randn(seq, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(seq, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(seq, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    row: dict = {"tokens": seq}

    # Full attention first, each backend on a clean allocator (the efficient kernel failed at 1M tokens
    # with an illegal address when it ran after MoBA had used ~25 GB more, in 2 of 2 runs).
    qf = q.transpose(0, 1).unsqueeze(0)  # [1, heads, seq, d]
    kf = k.repeat_interleave(HEADS // KV_HEADS, 1).transpose(0, 1).unsqueeze(0)
    vf = v.repeat_interleave(HEADS // KV_HEADS, 1).transpose(0, 1).unsqueeze(0)
    for backend in backends:
        fn = mb.full_attention(backend, qf, kf, vf)
        try:
            row[f"{backend}_ms"] = mb.time_ms(fn, reps=reps, warmup=warmup)
            row[f"{backend}_mem_gb"] = mb.peak_memory_gb(fn) if not big else None
        except RuntimeError as exc:
            row[f"{backend}_error"] = str(exc).splitlines()[0][:300]
        log.append(f"{seq}: {backend} {row.get(f'{backend}_ms', row.get(f'{backend}_error'))}")
        print(log[-1], flush=True)
        torch.cuda.empty_cache()
    del qf, kf, vf
    torch.cuda.empty_cache()

    def moba() -> torch.Tensor:
        return moba_cuda.moba_prefill(q, k, v, [seq], chunk, topk, **kernel_options)

    row["moba_ms"] = mb.time_ms(moba, reps=5, warmup=1)  # seconds at most even at 1M: take a real median
    row["moba_mem_gb"] = mb.peak_memory_gb(moba)
    log.append(f"{seq}: moba {row['moba_ms']:.1f} ms, {row['moba_mem_gb']:.1f} GB extra")
    print(log[-1], flush=True)
    best = min((row[f"{b}_ms"], b) for b in backends if f"{b}_ms" in row)
    row["best_full"], row["speedup_vs_best_full"] = best[1], best[0] / row["moba_ms"]
    return row


def decode(contexts: list[int], chunk: int, topk: int, batch: int, log: list[str]) -> list[dict]:
    rows = []
    for context in contexts:
        rows.append(_decode_row(context, chunk, topk, batch))
        log.append(json.dumps(rows[-1]))
        torch.cuda.empty_cache()
    return rows


def _decode_row(context: int, chunk: int, topk: int, batch: int, page: int = 16) -> dict:
    k_cache, v_cache, tables = mb.paged_cache(batch, context, KV_HEADS, DIM, page, torch.bfloat16)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    gate_cache = _gate_cache(k_cache, tables, lens.tolist(), chunk, page)
    row: dict = {"context": context, "batch": batch}

    def moba() -> torch.Tensor:
        return moba_cuda.moba_paged_decode(
            q, k_cache, v_cache, tables, lens, context, page, gate_cache, chunk, topk, DIM**-0.5
        )

    row["moba_ms"] = mb.time_ms(moba, reps=200, warmup=10)
    row["moba_graph_ms"] = mb.time_ms(mb.graphed(moba), reps=50, warmup=3)
    for split in (512, 1024, 2048, 4096):

        def dense(split: int = split) -> torch.Tensor:
            return paged_decode.paged_decode(
                q, k_cache, v_cache, tables, lens, context, page, split, DIM**-0.5
            )

        row[f"dense_paged_split{split}_ms"] = mb.time_ms(dense, reps=50, warmup=3)
        row[f"dense_paged_split{split}_graph_ms"] = mb.time_ms(mb.graphed(dense), reps=50, warmup=3)
    dense_rows = {key: val for key, val in row.items() if key.startswith("dense_paged_split")}
    row["dense_paged_ms"] = min(val for key, val in dense_rows.items() if "graph" not in key)
    row["dense_paged_graph_ms"] = min(val for key, val in dense_rows.items() if "graph" in key)
    row["speedup_vs_dense_paged"] = row["dense_paged_ms"] / row["moba_ms"]
    row["speedup_graphs"] = row["dense_paged_graph_ms"] / row["moba_graph_ms"]
    # SDPA over contiguous K/V (no paging): the fastest dense decode torch offers, for reference.
    kc = torch.stack([mb.gather_context(k_cache, tables[b], context, page) for b in range(batch)])
    vc = torch.stack([mb.gather_context(v_cache, tables[b], context, page) for b in range(batch)])
    kc, vc = kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()  # [batch, kv_heads, ctx, d]
    for backend in mb.SDPA_BACKENDS:
        try:
            row[f"sdpa_contiguous_{backend}_ms"] = mb.time_ms(
                mb.gqa_decode(backend, q, kc, vc), reps=50, warmup=3
            )
        except RuntimeError as exc:
            row[f"sdpa_contiguous_{backend}_error"] = str(exc).splitlines()[0][:160]
    return row


def print_tables(result: dict) -> None:
    print(
        f"\nPrefill (ms; one layer, batch 1, 32/8 heads, d=128, bf16, chunk {result['chunk']}, topk {result['topk']})"
    )
    print(
        f"{'tokens':>8} {'moba':>9} {'cudnn':>10} {'flash':>10} {'efficient':>10} {'speedup':>8} {'moba GB':>8}"
    )
    for r in result["prefill"]:
        cells = [f"{r.get(f'{b}_ms', float('nan')):10.1f}" for b in ("cudnn", "flash", "efficient")]
        print(
            f"{r['tokens']:>8} {r['moba_ms']:9.1f} {' '.join(cells)} {r['speedup_vs_best_full']:7.2f}x {r['moba_mem_gb']:8.1f}"
        )
    print(f"\nDecode step, batch {result['decode'][0]['batch'] if result['decode'] else 0} (ms)")
    print(
        f"{'context':>8} {'moba':>8} {'dense paged':>12} {'speedup':>8} {'moba graph':>11} {'dense graph':>12} {'speedup':>8} {'sdpa (contiguous)':>18}"
    )
    for r in result["decode"]:
        sdpa = {b: r[f"sdpa_contiguous_{b}_ms"] for b in mb.SDPA_BACKENDS if f"sdpa_contiguous_{b}_ms" in r}
        best = min(sdpa.items(), key=lambda kv: kv[1]) if sdpa else ("-", float("nan"))
        print(
            f"{r['context']:>8} {r['moba_ms']:8.3f} {r['dense_paged_ms']:12.3f} {r['speedup_vs_dense_paged']:7.2f}x "
            f"{r['moba_graph_ms']:11.3f} {r['dense_paged_graph_ms']:12.3f} {r['speedup_graphs']:7.2f}x "
            f"{best[1]:12.3f} ({best[0]})"
        )
    for line in result.get("verdict", []):
        print(line)


def verdict(result: dict) -> list[str]:
    lines = []
    by_size = {r["tokens"]: r for r in result["prefill"]}
    for size, target in ((1048576, TARGET_1M), (131072, TARGET_128K)):
        if size in by_size:
            got = by_size[size]["speedup_vs_best_full"]
            lines.append(
                f"prefill {size}: {got:.2f}x vs fastest full attention (target >= {target}x): {got >= target}"
            )
    for r in result["decode"]:
        if r["context"] == 524288:
            got = r["speedup_vs_dense_paged"]
            lines.append(
                f"decode 512K: {got:.2f}x vs dense paged (target >= {TARGET_DECODE_512K}x): {got >= TARGET_DECODE_512K}"
            )
            lines.append(f"decode 512K, both as CUDA graphs: {r['speedup_graphs']:.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[32768, 131072, 524288, 1048576])
    parser.add_argument("--decode-contexts", type=int, nargs="*", default=[131072, 524288])
    parser.add_argument("--backends", nargs="*", default=list(mb.SDPA_BACKENDS))
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--topk", type=int, default=12)
    parser.add_argument("--skip-check", action="store_true")
    # Kernel options; unset ones keep moba_cuda's defaults (TMA on Hopper, 128-key tiles, bf16 partials).
    parser.add_argument(
        "--tma", type=int, choices=[0, 1], help="bulk-copy (TMA) K/V loads in the prefill kernel"
    )
    parser.add_argument("--block-n", type=int, help="keys per tile of the prefill kernel")
    parser.add_argument("--partial-gib", type=float, help="memory for partial outputs per query window")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("moba_attention: needs a CUDA GPU; skipped")
        return
    log: list[str] = []
    torch.manual_seed(0)
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "chunk": args.chunk,
        "topk": args.topk,
    }
    result["check"] = {} if args.skip_check else check(log)
    print("\n".join(log), flush=True)
    kernel_options: dict = {}
    if args.tma is not None:
        kernel_options["use_tma"] = bool(args.tma)
    if args.block_n:
        kernel_options["block_n"] = args.block_n
    if args.partial_gib:  # bf16 partials (the default for bf16 inputs): 2 bytes each
        kernel_options["window_tokens"] = int(args.partial_gib * 2**30) // (HEADS * args.topk * DIM * 2)
    result["kernel_options"] = {k: str(v) for k, v in kernel_options.items()}
    result["prefill"] = prefill(args.sizes, args.chunk, args.topk, args.backends, kernel_options, log)
    result["decode"] = decode(args.decode_contexts, args.chunk, args.topk, 8, log)
    result["verdict"] = verdict(result)
    result["log"] = log
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    for name in (f"moba_attention-{stamp}.json", "moba_attention-latest.json"):
        (args.out / name).write_text(json.dumps(result, indent=1))
    print_tables(result)


if __name__ == "__main__":
    main()
