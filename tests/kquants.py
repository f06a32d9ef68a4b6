"""A small K-quant writer for tests: GGUF's Q4_K blocks from floats (gguf's own quantizer has none)."""

from __future__ import annotations

import numpy as np


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """A small Q4_K quantizer of our own (not llama.cpp's search for the best scales): [rows, cols] float32,
    cols a multiple of 256 -> raw 144-byte super-blocks [rows, cols / 256 * 144] uint8."""
    rows = x.shape[0]
    sub = x.reshape(rows, -1, 8, 32).astype(np.float64)  # [rows, supers, sub-blocks, 32]
    low = np.minimum(sub.min(-1), 0.0)
    scale_f, min_f = (sub.max(-1) - low) / 15, -low  # [rows, supers, 8]
    d = (scale_f.max(-1) / 63).astype(np.float16)
    dmin = (min_f.max(-1) / 63).astype(np.float16)
    safe = lambda v: np.where(v == 0, 1, v).astype(np.float64)  # noqa: E731
    sc = np.clip(np.rint(scale_f / safe(d)[..., None]), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(min_f / safe(dmin)[..., None]), 0, 63).astype(np.uint8)
    step = safe(d.astype(np.float64)[..., None] * sc)[..., None]
    q = np.clip(np.rint((sub + (dmin.astype(np.float64)[..., None] * m)[..., None]) / step), 0, 15).astype(
        np.uint8
    )
    packed = np.empty(sc.shape[:-1] + (12,), dtype=np.uint8)
    packed[..., 0:4] = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    packed[..., 4:8] = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    q = q.reshape(rows, -1, 4, 2, 32)  # [rows, supers, pairs, (first, second sub-block), 32]
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(rows, -1, 128)
    header = np.concatenate([d[..., None].view(np.uint8), dmin[..., None].view(np.uint8)], -1)
    return np.concatenate([header.reshape(rows, -1, 4), packed, qs], -1).reshape(rows, -1)


def random_q6_k(rows: int, supers: int, seed: int = 0) -> np.ndarray:
    """Raw Q6_K rows of random bytes, with finite fp16 d (every bit pattern of codes and scales occurs)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, supers, 210), dtype=np.uint8)
    d = (rng.uniform(1e-4, 1e-2, (rows, supers)) * rng.choice([-1, 1], (rows, supers))).astype(np.float16)
    raw[..., 208:210] = d.view(np.uint8).reshape(rows, supers, 2)
    return raw.reshape(rows, supers * 210)
