"""GGUF blocks read as codes + per-block scale (and minimum) give back the file's dequantized values."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from kquants import quantize_q4_k, random_q6_k

from longserve.loading.gguf_blocks import Q4Blocks, Q8Blocks, cat_blocks, read_blocks

Q = gguf.GGMLQuantizationType


def _weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2.0, (rows, 1))).astype(np.float32)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_blocks_reproduce_the_dequantized_file(qtype) -> None:
    raw = quantize(_weights(24, 128), qtype)  # [rows, bytes]
    blocks = read_blocks(raw, qtype)
    assert blocks.scale.shape == (24, 4)
    torch.testing.assert_close(
        blocks.dequantize(), torch.from_numpy(dequantize(raw, qtype)), rtol=1e-6, atol=1e-6
    )


def test_fused_rows_concatenate() -> None:
    parts = [read_blocks(quantize(_weights(n, 64, n), Q.Q4_1), Q.Q4_1) for n in (8, 4)]
    fused = cat_blocks(parts)
    assert isinstance(fused, Q4Blocks) and fused.codes.shape == (12, 32)
    torch.testing.assert_close(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    with pytest.raises(ValueError, match="different block formats"):
        cat_blocks([parts[0], read_blocks(quantize(_weights(2, 64), Q.Q8_0), Q.Q8_0)])


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_0])
def test_rearranged_formats_reproduce_the_dequantized_file(qtype) -> None:
    """Q4_K and Q5_0 become Q4 / Q8 blocks with exactly the values gguf's own dequantizer gives."""
    x = _weights(6, 512)
    raw = quantize_q4_k(x) if qtype == Q.Q4_K else quantize(x, qtype)
    want = dequantize(raw, qtype)
    assert np.abs(want - x).max() < 0.25 * np.abs(x).max()  # a sane quantizer: the blocks hold x
    assert np.array_equal(read_blocks(raw, qtype).dequantize().numpy(), want)


def test_q6_k_becomes_int8_blocks_with_a_scale_per_16_weights() -> None:
    raw = random_q6_k(5, 3)
    blocks = read_blocks(raw, Q.Q6_K)
    assert isinstance(blocks, Q8Blocks) and blocks.group == 16 and blocks.codes.shape == (5, 768)
    assert int(blocks.codes.min()) >= -32 and int(blocks.codes.max()) <= 31
    assert np.array_equal(blocks.dequantize().numpy(), dequantize(raw, Q.Q6_K))
    with pytest.raises(ValueError, match="different block formats"):  # 16- and 32-weight scales do not fuse
        cat_blocks([blocks, read_blocks(quantize(_weights(2, 768), Q.Q8_0), Q.Q8_0)])


def test_other_formats_are_refused() -> None:
    with pytest.raises(ValueError, match="Q5_K has no low-bit kernel"):
        read_blocks(np.zeros((1, 176), dtype=np.uint8), Q.Q5_K)
