"""Kernel-configuration sweep for MoBA prefill on a GPU, with a profile of where the time goes.

python benchmarks/moba_tune.py --tokens 131072
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _moba_bench as mb  # noqa: E402

from longserve.attention import moba_cuda  # noqa: E402

VARIANTS = [  # (block_m, block_n, num_warps, num_stages, partial dtype, partial budget GiB, TMA, warp-specialize)
    (128, 128, 8, 3, torch.bfloat16, 8, False, False),
    (128, 128, 8, 3, torch.bfloat16, 8, True, False),
    (128, 128, 8, 3, torch.bfloat16, 8, True, True),
    (128, 128, 8, 2, torch.bfloat16, 8, True, False),
    (128, 64, 8, 3, torch.bfloat16, 8, True, False),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="*", default=[131072])
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--topk", type=int, default=12)
    parser.add_argument("--variants", type=int, default=len(VARIANTS), help="try only the first N variants")
    args = parser.parse_args()
    for seq in args.tokens:
        tune(seq, args.chunk, args.topk, VARIANTS[: args.variants])


def tune(seq: int, chunk: int, topk: int, variants: list) -> None:
    heads, kv_heads, dim = 32, 8, 128
    if True:
        q = torch.randn(seq, heads, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(seq, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(seq, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
        scale = dim**-0.5
        chosen_blocks = seq // chunk
        flops = 0.0  # q·k and p·v over every chosen key, own block causal
        for t0 in range(0, seq, chunk):
            own = min(chunk, seq - t0)
            earlier = min(t0 // chunk, topk - 1)
            flops += 4 * heads * dim * (own * (own + 1) / 2 + own * earlier * chunk)
        print(f"tokens {seq}: blocks {chosen_blocks}, {flops / 1e12:.1f} TFLOP")
        ref = None
        for block_m, block_n, warps, stages, pdtype, budget, tma, ws in variants:
            window = max(1024, (budget << 30) // (heads * topk * dim * pdtype.itemsize))

            def run(
                q=q,
                k=k,
                v=v,
                scale=scale,
                block_m=block_m,
                block_n=block_n,
                warps=warps,
                stages=stages,
                pdtype=pdtype,
                window=window,
                tma=tma,
                ws=ws,
            ):
                return moba_cuda.moba_prefill_sequence(
                    q, k, v, chunk, topk, scale, window_tokens=window, partial_dtype=pdtype,
                    block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages, use_tma=tma, warp_specialize=ws,
                )  # fmt: skip

            try:
                ms = mb.time_ms(run, reps=3, warmup=1)
                out = run()
                ref = out if ref is None else ref
                diff = mb.rel_error(out.float(), ref.double())
                print(
                    f"  bm={block_m} bn={block_n} w={warps} s={stages} {str(pdtype)[6:]} window={window} tma={tma} ws={ws}: "
                    f"{ms:.1f} ms, {flops / ms / 1e9:.0f} TFLOP/s, vs first {diff:.1e}",
                    flush=True,
                )
            except Exception as exc:  # a config can fail to compile (shared memory)
                print(
                    f"  bm={block_m} bn={block_n} w={warps} s={stages}: {type(exc).__name__} {str(exc)[:200]}"
                )
        positions = torch.arange(seq, device="cuda")
        gates = moba_cuda.gate_keys(k, chunk)
        sel_ms = mb.time_ms(lambda: moba_cuda.select_prefill_blocks(q, positions, gates, chunk, topk), 3)
        print(f"  gating + selection alone: {sel_ms:.1f} ms")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            moba_cuda.moba_prefill_sequence(q, k, v, chunk, topk, scale)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        cudnn = mb.full_attention(
            "cudnn",
            q.transpose(0, 1).unsqueeze(0),
            k.repeat_interleave(4, 1).transpose(0, 1).unsqueeze(0),
            v.repeat_interleave(4, 1).transpose(0, 1).unsqueeze(0),
        )
        print(f"  cudnn full causal: {mb.time_ms(cudnn, reps=3):.1f} ms")


if __name__ == "__main__":
    main()
