"""Fused Triton kernels for the decoder's elementwise work on CUDA: RMSNorm with the residual add, rotary
embedding, SiLU·mul. Each replaces 3-7 small torch launches by one, which is most of a decode step's kernel
count (every kernel in a CUDA graph still costs ~1-2 µs on an H200).

Rounding follows the torch paths in ``norm.py``/``rotary.py``/``mlp.py`` where it changes results: the residual
sum is rounded to the storage dtype before it is normalised, and a low-precision norm rounds before it scales.
Other intermediates stay float32 (one rounding at the end, where torch rounds after every op).

Importing this module needs Triton; callers import it only when ``triton_support.use_triton`` says so.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    X, R, R_out, W, Out,
    stride_x, stride_r, stride_ro, stride_o,
    dim, eps,
    HAS_RESIDUAL: tl.constexpr, ROUND_BEFORE_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row: (optionally) s = x + r, stored; out = rms_norm(s) * w."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(R_out.dtype.element_ty)
        tl.store(R_out + row * stride_ro + cols, x, mask=ok)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / dim + eps)
    normed = x * rstd
    if ROUND_BEFORE_SCALE:
        normed = normed.to(Out.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (normed * w).to(Out.dtype.element_ty), mask=ok)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` ``[rows, dim]`` (unit last stride) -> (rms_norm(x + residual) * weight, x + residual or None)."""
    rows, dim = x.shape
    out = torch.empty(rows, dim, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if residual is not None else None
    r = residual if residual is not None else x
    s = summed if summed is not None else out
    _rms_norm_kernel[(rows,)](
        x, r, s, weight, out, x.stride(0), r.stride(0), s.stride(0), out.stride(0), dim, eps,
        HAS_RESIDUAL=residual is not None, ROUND_BEFORE_SCALE=x.dtype != torch.float32,
        BLOCK=triton.next_power_of_2(dim), num_warps=_warps(dim),
    )  # fmt: skip
    return out, summed


@triton.jit
def _rotary_kernel(
    X, Cos, Sin, Out,
    stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
    heads, half,
    HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
):  # fmt: skip
    """One token: every head's pairs (i, i + half) rotated by the token's angles ("rotate half" layout)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    ok = (h < heads) & (d < half)
    x = X + t * stride_xt + h * stride_xh + d
    x1 = tl.load(x, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x + half, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(Cos + t * stride_ct + d, mask=d < half, other=0.0).to(tl.float32)
    s = tl.load(Sin + t * stride_st + d, mask=d < half, other=0.0).to(tl.float32)
    o = Out + t * stride_ot + h * stride_oh + d
    tl.store(o, (x1 * c - x2 * s).to(Out.dtype.element_ty), mask=ok)
    tl.store(o + half, (x2 * c + x1 * s).to(Out.dtype.element_ty), mask=ok)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[tokens, heads, head_dim]`` (unit last stride) rotated; cos/sin ``[tokens, 1, head_dim/2]``."""
    tokens, heads, dim = x.shape
    out = torch.empty(tokens, heads, dim, dtype=x.dtype, device=x.device)
    _rotary_kernel[(tokens,)](
        x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
        heads, dim // 2, HEADS_PAD=triton.next_power_of_2(heads), HALF_PAD=triton.next_power_of_2(dim // 2),
        num_warps=4,
    )  # fmt: skip
    return out


@triton.jit
def _silu_mul_kernel(GateUp, Out, stride_g, stride_o, width, BLOCK: tl.constexpr):
    """Out[t, j] = silu(gate[t, j]) * up[t, j], with gate and up the two halves of a GateUp row."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    gate = tl.load(GateUp + t * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GateUp + t * stride_g + width + cols, mask=ok, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(Out + t * stride_o + cols, out.to(Out.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up`` ``[tokens, 2 * width]`` (unit last stride) -> silu(gate) * up, ``[tokens, width]``."""
    tokens, double = gate_up.shape
    width = double // 2
    out = torch.empty(tokens, width, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(tokens, triton.cdiv(width, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), width, BLOCK=block, num_warps=4
    )
    return out


def _warps(dim: int) -> int:
    return 4 if dim <= 2048 else 8
