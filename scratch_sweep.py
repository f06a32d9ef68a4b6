import itertools, sys, time
sys.path[:0] = ["src", "benchmarks", "tests"]
import torch
import _moe_bench as mb
from longserve.layers import moe_triton as mt
from longserve.layers.moe import route
from triton.testing import do_bench
ours, _ = mb.build_blocks(mb.QWEN15_MOE_A27B, "cuda", torch.bfloat16)
wgu, wd, extra = ours._fused_shared_weights()
E = wgu.shape[0]
T0 = time.time()
def t(fn):
    return do_bench(fn, warmup=25, rep=150, return_mode="median")
for tokens in (4096, 256):
    x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        _, ids = route(ours.gate(x), ours.router)
        base = mt.default_config(tokens, tokens * (ids.shape[1] + extra), E)
        ref = mt.fused_experts(x, ids, wgu, wd, base, shared_slices=extra)
        print(tokens, "default", base, round(t(lambda: mt.fused_experts(x, ids, wgu, wd, base, shared_slices=extra)), 4), flush=True)
        if tokens == 4096:
            gu_space = [mt.TileConfig(bm, bn, bk, g, w, st) for bm, bn, bk, g, w, st in itertools.product((128,), (64, 128), (64,), (8, 16), (8,), (3, 4))]
            gu_space += [mt.TileConfig(64, 128, 64, 8, 4, st) for st in (3, 4, 5)]
            dn_space = lambda bm: [mt.TileConfig(bm, bn, bk, g, w, st) for bn, bk, g, w, st in itertools.product((128, 256), (64, 128), (8,), (4, 8), (3, 4))]
        else:
            gu_space = [mt.TileConfig(bm, bn, bk, 1, w, st) for bm, bn, bk, w, st in itertools.product((32, 16), (32, 64), (128, 256), (4,), (3, 4))]
            dn_space = lambda bm: [mt.TileConfig(bm, bn, bk, 1, w, st) for bn, bk, w, st in itertools.product((32, 64, 128), (128, 256), (4,), (3, 4))]
        res = []
        for cfg in gu_space:
            try:
                ms = t(lambda: mt.fused_experts(x, ids, wgu, wd, cfg, shared_slices=extra, down_config=mt.TileConfig(cfg.block_m, *((128, 64, 8, 8, 3) if tokens == 4096 else (64, 128, 1, 4, 3)))))
            except Exception as exc:
                print("fail", cfg, type(exc).__name__, str(exc)[:80]); continue
            res.append((ms, cfg))
        res.sort(key=lambda r: r[0])
        for ms, cfg in res[:6]: print(tokens, "gu", round(ms, 4), cfg, flush=True)
        best_gu = res[0][1]
        res = []
        for dcfg in dn_space(best_gu.block_m):
            try:
                out = mt.fused_experts(x, ids, wgu, wd, best_gu, shared_slices=extra, down_config=dcfg)
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                ms = t(lambda: mt.fused_experts(x, ids, wgu, wd, best_gu, shared_slices=extra, down_config=dcfg))
            except Exception as exc:
                print("fail", dcfg, type(exc).__name__, str(exc)[:80]); continue
            res.append((ms, dcfg, err))
        res.sort(key=lambda r: r[0])
        for ms, cfg, err in res[:6]: print(tokens, "down", round(ms, 4), cfg, f"{err:.1e}", flush=True)
        print("elapsed", round(time.time() - T0), flush=True)
