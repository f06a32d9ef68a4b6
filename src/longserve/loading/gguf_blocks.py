"""GGUF's 4-bit block formats read as they are, for kernels that keep weights low-bit: Q4_0 and Q4_1 blocks
(32 weights each) as 4-bit codes with one scale and one zero per block.

Every value follows ``(code - 8) * scale + zero``, the convention of torch's int4 matmul kernels:
Q4_0 is ``d * (q - 8)`` (zero 0) and Q4_1 is ``d * q + m`` (zero ``m + 8 d``, exact up to float32 rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

GROUP = 32  # weights per block in both formats
_Q = gguf.GGMLQuantizationType
INT4_TYPES = (_Q.Q4_0, _Q.Q4_1)


@dataclass
class Int4Groups:
    """A [rows, cols] matrix as 4-bit codes with per-block affine parameters."""

    codes: torch.Tensor  # [rows, cols] uint8 in [0, 15]
    scale: torch.Tensor  # [rows, cols / GROUP] float32
    zero: torch.Tensor  # [rows, cols / GROUP] float32

    def dequantize(self) -> torch.Tensor:
        """[rows, cols] float32: what the file's values are."""
        rows, cols = self.codes.shape
        codes = self.codes.view(rows, cols // GROUP, GROUP).float() - 8.0
        return (codes * self.scale[..., None] + self.zero[..., None]).view(rows, cols)

    @staticmethod
    def cat(parts: list[Int4Groups]) -> Int4Groups:
        """Stacked along rows (fused projections: q, k, v or gate, up)."""
        return Int4Groups(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "zero")))


def int4_groups(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> Int4Groups:
    """A Q4_0/Q4_1 tensor's raw bytes ``[rows, bytes_per_row]`` (as GGUFReader gives them) as codes + params."""
    if qtype not in INT4_TYPES:
        raise ValueError(
            f"{qtype.name} is not a 4-bit block format ({', '.join(t.name for t in INT4_TYPES)})"
        )
    header = 2 if qtype == _Q.Q4_0 else 4  # fp16 d, then fp16 m for Q4_1
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(rows, -1, header + GROUP // 2)  # [rows, groups, bytes]
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [rows, groups]
    packed = blocks[..., header:]  # [rows, groups, 16]: weight j in the low nibble, weight j + 16 in the high
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)  # [rows, cols]
    if qtype == _Q.Q4_0:
        zero = np.zeros_like(d)
    else:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = m + 8.0 * d
    return Int4Groups(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(zero))
