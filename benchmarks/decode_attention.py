"""Dense paged decode attention on one GPU (Triton split-K + merge), as the engine calls it: splits sized for a
model that allows 131K tokens (``split_context``), real contexts from 256 to 32K keys, batch 1 to 256. Each
time is ``triton.testing.do_bench``'s median; the floor is the K/V bytes at ``--bandwidth`` (the H200's
measured device-to-device copy rate by default). Prints a table and writes
benchmarks/results/decode_attention-<timestamp>.json.

    python benchmarks/decode_attention.py [--batches 1,64,256] [--contexts 256,4096,32768]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import triton.testing

from longserve.attention import paged_decode as pd

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--contexts", default="256,4096,32768")
    p.add_argument("--split-context", type=int, default=139_264)
    p.add_argument("--bandwidth", type=float, default=4.0e12, help="bytes/s")
    p.add_argument(
        "--programs-per-sm",
        default=str(pd.PROGRAMS_PER_SM),
        help="comma-separated settings of paged_decode.PROGRAMS_PER_SM to compare (a tuning sweep)",
    )
    args = p.parse_args()
    heads, kv_heads, dim, page = 32, 8, 64, 16
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            pages = -(-context // page)
            if batch * pages * page * kv_heads * dim * 4 > 40e9:
                continue
            k = torch.randn((batch * pages + 1) * page, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            tables = (torch.randperm(batch * pages, device="cuda") + 1).int().view(batch, pages)
            lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
            q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
            cache = SimpleNamespace(key=k, value=v)
            metadata = SimpleNamespace(
                decode_block_tables=tables, decode_seq_lens=lens, max_decode_len=args.split_context,
                split_context=args.split_context, block_size=page,
            )  # fmt: skip

            def spread(q=q, cache=cache, metadata=metadata):
                return pd.cuda_dense_decode(q, cache, metadata, 0.125)

            def fixed(q=q, k=k, v=v, tables=tables, lens=lens):  # the previous sizing: 1,024-key splits
                return pd.paged_decode(q, k, v, tables, lens, args.split_context, page, 1024, 0.125)

            spread_us = {}
            for variant in args.programs_per_sm.split(","):
                pd.PROGRAMS_PER_SM = int(variant)
                spread_us[variant] = 1e3 * triton.testing.do_bench(spread, return_mode="median")
            fixed_us = 1e3 * triton.testing.do_bench(fixed, return_mode="median")
            floor_us = batch * context * kv_heads * dim * 2 * 2 / args.bandwidth * 1e6
            rows.append(
                {"batch": batch, "context": context, "spread_us": spread_us, "fixed_1024_us": fixed_us,
                 "floor_us": floor_us}
            )  # fmt: skip
            spreads = ", ".join(f"{v} {us:7.1f}" for v, us in spread_us.items())
            print(
                f"batch {batch:4d} context {context:6d}: spread [{spreads}] µs, fixed 1024-key splits "
                f"{fixed_us:7.1f} µs; K/V floor {floor_us:7.1f} µs",
                flush=True,
            )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"decode_attention-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
