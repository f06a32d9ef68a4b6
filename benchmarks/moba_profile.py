"""Where MoBA prefill spends its GPU time at one size: wall time per kernel option and a kernel profile.

python benchmarks/moba_profile.py --tokens 1048576
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from longserve.attention import moba_cuda


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1048576)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--topk", type=int, default=12)
    args = parser.parse_args()
    seq = args.tokens
    q = torch.randn(seq, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(seq, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(seq, 8, 128, device="cuda", dtype=torch.bfloat16)
    for options in ({}, {"use_tma": True}):
        moba_cuda.moba_prefill(q, k, v, [seq], args.chunk, args.topk, **options)
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            moba_cuda.moba_prefill(q, k, v, [seq], args.chunk, args.topk, **options)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        print(f"{options or 'default'}: {sorted(times)[1] * 1e3:.1f} ms (median of 3)", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        moba_cuda.moba_prefill(q, k, v, [seq], args.chunk, args.topk)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
