"""Paged prefill attention on one GPU (``attention/paged_prefill.py``, Triton), as the engine calls it for a
prompt chunk over its cached prefix, against cuDNN/flash SDPA doing one causal pass over a whole prompt of the
same length. Issue 26 wants dense chunked prefill within 1.1x of one step at 128K; the attention is most of both.

Each chunk setting (cached prefix + chunk) is timed with ``triton.testing.do_bench`` (median) for every tiling in
``--tilings`` (tile rows x keys per block x warps x stages), and reported in TFLOPS: 4 * head_dim * heads *
(keys each query sees, summed) / time. The SDPA row is a whole ``--sdpa-length`` prompt in one causal call,
the rate one step reaches. Prints a table and writes benchmarks/results/prefill_attention-<timestamp>.json.

    python benchmarks/prefill_attention.py                       # 1B shape: 32/8 heads, d 64
    python benchmarks/prefill_attention.py --tilings 64x64x4x2,128x64x8x2,128x64x8x3,128x128x8x2
    python benchmarks/prefill_attention.py --tiny                # CPU dry run under Triton's interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse_tiling(text: str) -> dict:
    rows, block_n, warps, stages = (int(x) for x in text.split("x"))
    return dict(tile_rows=rows, block_n=block_n, num_warps=warps, num_stages=stages)


def chunk_case(prefix: int, chunk: int, heads: int, kv_heads: int, dim: int, page: int, device, dtype):
    """One sequence whose chunk of ``chunk`` queries follows ``prefix`` cached tokens, its pages shuffled."""
    import torch

    context = prefix + chunk
    pages = -(-context // page)
    table = torch.randperm(pages, device=device, dtype=torch.int32).view(1, pages)
    q = torch.randn(chunk, heads, dim, device=device, dtype=dtype)
    key = torch.randn(pages * page, kv_heads, dim, device=device, dtype=dtype)
    value = torch.randn_like(key)
    starts = torch.tensor([0, chunk], device=device, dtype=torch.int32)
    lens = torch.tensor([context], device=device, dtype=torch.int32)
    seen = chunk * prefix + chunk * (chunk + 1) // 2  # keys summed over the chunk's queries
    return (q, key, value, table, starts, lens, chunk, page, dim**-0.5), 4 * dim * heads * seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", default="0+8192,32768+8192,122880+8192", help="prefix+chunk, comma-separated")
    p.add_argument("--tilings", default="64x64x4x2,128x64x8x2,128x64x8x3,128x128x8x2")
    p.add_argument("--sdpa-length", type=int, default=32768)
    p.add_argument("--tiny", action="store_true", help="small sizes under Triton's interpreter, on the CPU")
    args = p.parse_args()
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.chunks, args.tilings, args.sdpa_length = "0+32,40+24,130+70", "64x64x4x2,128x64x8x2", 64
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import triton_interpreter

        triton_interpreter.allow_loaded_loop_bounds()  # the kernel's loop bounds are loaded lengths
    import torch
    import triton.testing

    from longserve.attention.paged_prefill import paged_prefill

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    heads, kv_heads, dim, page = 32, 8, 64, 16
    tilings = args.tilings.split(",")
    bench = (lambda fn: triton.testing.do_bench(fn)) if device == "cuda" else _cpu_time

    rows = []
    for spec in args.chunks.split(","):
        prefix, chunk = (int(x) for x in spec.split("+"))
        call, flops = chunk_case(prefix, chunk, heads, kv_heads, dim, page, device, dtype)
        for tiling in tilings:
            ms = bench(lambda call=call, tiling=tiling: paged_prefill(*call, **parse_tiling(tiling)))
            rows.append({"case": spec, "system": f"paged {tiling}", "ms": ms, "tflops": flops / ms / 1e9})
    n = args.sdpa_length
    q = torch.randn(1, heads, n, dim, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, n, dim, device=device, dtype=dtype).repeat_interleave(heads // kv_heads, 1)
    v = torch.randn_like(k)
    ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    flops = 4 * dim * heads * n * (n + 1) // 2
    rows.append({"case": f"0+{n} one call", "system": "sdpa causal", "ms": ms, "tflops": flops / ms / 1e9})

    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}; "
          f"{heads}/{kv_heads} heads, d {dim}, page {page}, {dtype}")  # fmt: skip
    print(f"{'case':<22}{'system':<26}{'ms':>10}{'TFLOPS':>10}")
    for row in rows:
        print(f"{row['case']:<22}{row['system']:<26}{row['ms']:>10.3f}{row['tflops']:>10.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"prefill_attention-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"device": device, "heads": heads, "kv_heads": kv_heads, "dim": dim,
                               "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {out}")


def _cpu_time(fn) -> float:
    """ms of one call (the interpreter dry run only checks that every path runs)."""
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


if __name__ == "__main__":
    main()
