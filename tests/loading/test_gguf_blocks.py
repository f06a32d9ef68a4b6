"""Q4_0/Q4_1 blocks read as 4-bit codes + per-block scale and zero give back the file's dequantized values."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from longserve.loading.gguf_blocks import Int4Groups, int4_groups

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_codes_scales_and_zeros_reproduce_the_dequantized_file(qtype) -> None:
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((24, 128)) * rng.uniform(0.01, 2.0, (24, 1))).astype(np.float32)
    raw = quantize(weights, qtype)  # [rows, bytes]
    groups = int4_groups(raw, qtype)
    expected = torch.from_numpy(dequantize(raw, qtype))
    assert groups.codes.shape == (24, 128) and int(groups.codes.max()) <= 15
    assert groups.scale.shape == groups.zero.shape == (24, 4)
    torch.testing.assert_close(groups.dequantize(), expected, rtol=1e-6, atol=1e-6)


def test_fused_rows_concatenate() -> None:
    rng = np.random.default_rng(1)
    parts = [
        int4_groups(quantize(rng.standard_normal((n, 64)).astype(np.float32), Q.Q4_1), Q.Q4_1) for n in (8, 4)
    ]
    fused = Int4Groups.cat(parts)
    assert fused.codes.shape == (12, 64)
    torch.testing.assert_close(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))


def test_other_formats_are_refused() -> None:
    with pytest.raises(ValueError, match="Q8_0 is not a 4-bit block format"):
        int4_groups(np.zeros((1, 34), dtype=np.uint8), Q.Q8_0)
