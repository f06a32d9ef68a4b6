"""Checks of the fused Triton kernels against float64 torch references, runnable on CUDA or, under
TRITON_INTERPRET=1, on the CPU (test_fused_kernels.py runs them both ways)."""

from __future__ import annotations

import torch

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


def check_rms_norm(device: str, dtype: torch.dtype) -> None:
    from longserve.layers.fused_triton import rms_norm

    for rows, dim in ((1, 576), (5, 2048), (3, 100)):
        x = torch.randn(rows, dim, dtype=dtype, device=device)
        r = torch.randn(rows, dim, dtype=dtype, device=device)
        w = torch.rand(dim, dtype=dtype, device=device) + 0.5
        out, summed = rms_norm(x, w, 1e-6, r)
        s = (x.double() + r.double()).to(dtype).double()  # the residual is stored in the model's dtype
        ref = s / (s.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w.double()
        assert _rel(summed, x.double() + r.double()) < TOLERANCE[dtype]
        assert _rel(out, ref) < TOLERANCE[dtype], (rows, dim)
        plain, none = rms_norm(x, w, 1e-6)
        xd = x.double()
        assert none is None
        assert (
            _rel(plain, xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w.double()) < TOLERANCE[dtype]
        )


def check_rotary(device: str, dtype: torch.dtype) -> None:
    from longserve.layers.fused_triton import rotary

    for tokens, heads, dim in ((1, 40, 64), (7, 12, 128), (3, 3, 48)):
        base = torch.randn(tokens, heads + 2, dim, dtype=dtype, device=device)
        x = base[:, :heads]  # strided, as q/k are views of the fused QKV output
        angle = torch.rand(tokens, 1, dim // 2, device=device) * 6
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        xd, c, s = x.double(), cos.double(), sin.double()
        x1, x2 = xd[..., : dim // 2], xd[..., dim // 2 :]
        ref = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        assert _rel(rotary(x, cos, sin), ref) < TOLERANCE[dtype], (tokens, heads, dim)


def check_silu_mul(device: str, dtype: torch.dtype) -> None:
    from longserve.layers.fused_triton import silu_mul

    for tokens, width in ((1, 1536), (4, 3000)):
        gate_up = torch.randn(tokens, 2 * width, dtype=dtype, device=device)
        g, u = gate_up.double().chunk(2, dim=-1)
        assert _rel(silu_mul(gate_up), g * torch.sigmoid(g) * u) < TOLERANCE[dtype]


def check_store_kv(device: str, dtype: torch.dtype) -> None:
    from longserve.attention.paged_cache import allocate_kv_cache
    from longserve.attention.paged_triton import store_kv_kernel

    cache = allocate_kv_cache(1, 6, 16, 3, 64, dtype, device)[0]
    cache.key.fill_(7.0)
    cache.value.fill_(7.0)
    qkv = torch.randn(5, 4 + 2 * 3, 64, dtype=dtype, device=device)
    k, v = qkv[:, 4:7], qkv[:, 7:]
    slots = torch.tensor([17, 3, 95, 40, 41], device=device)
    store_kv_kernel[(5,)](
        k, v, cache.key, cache.value, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cache.key.stride(0), cache.key.stride(1), cache.value.stride(0), cache.value.stride(1),
        3, 64, HEADS_PAD=4, DIM_PAD=64,
    )  # fmt: skip
    assert torch.equal(cache.key[slots], k) and torch.equal(cache.value[slots], v)
    untouched = torch.ones(cache.key.shape[0], dtype=torch.bool, device=device)
    untouched[slots] = False
    assert (cache.key[untouched] == 7.0).all() and (cache.value[untouched] == 7.0).all()


def check_paged_decode(device: str, dtype: torch.dtype) -> None:
    """Dense split-K decode over shuffled pages equals float64 attention over each sequence's context."""
    from longserve.attention.paged_decode import paged_decode

    page, kv_heads, group, dim = 16, 2, 4, 64
    lens = [1, 37, 70]
    pages = [-(-n // page) for n in lens]
    order = torch.randperm(sum(pages)) + 1  # page 0 is the padding page
    tables = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    start = 0
    for i, n in enumerate(pages):
        tables[i, :n] = order[start : start + n]
        start += n
    slots = (sum(pages) + 1) * page
    key = torch.randn(slots, kv_heads, dim, dtype=dtype, device=device)
    value = torch.randn(slots, kv_heads, dim, dtype=dtype, device=device)
    q = torch.randn(len(lens), kv_heads * group, dim, dtype=dtype, device=device)
    scale = dim**-0.5
    out = paged_decode(
        q, key, value, tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device),
        max(lens), page, 32, scale,
    )  # fmt: skip
    for i, n in enumerate(lens):
        positions = torch.arange(n)
        slot = (tables[i, positions // page].long() * page + positions % page).to(device)
        k, v = key[slot].double(), value[slot].double()  # [n, kv_heads, dim]
        qi = q[i].double().view(kv_heads, group, dim)
        weights = torch.einsum("hgd,nhd->hgn", qi, k).mul(scale).softmax(-1)
        ref = torch.einsum("hgn,nhd->hgd", weights, v).reshape(kv_heads * group, dim)
        assert _rel(out[i], ref) < TOLERANCE[dtype] * 10, (i, n)


def check_all(device: str) -> None:
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        check_rms_norm(device, dtype)
        check_rotary(device, dtype)
        check_silu_mul(device, dtype)
        check_store_kv(device, dtype)
        if device == "cuda":  # its loop bounds are tensors, which Triton's interpreter cannot iterate
            check_paged_decode(device, dtype)
