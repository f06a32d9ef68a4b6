"""GGUF's block formats read as they are, for kernels that keep weights low-bit (``layers/cpu_kernels``):
Q4_0 and Q4_1 as 4-bit codes with a scale and a minimum per 32 weights, Q8_0 as int8 codes with a scale.

Scales are stored as float32 (the file's fp16 values, exactly). Q4_0's ``d * (q - 8)`` becomes
``d * q + (-8 d)``, so both 4-bit formats are ``scale * code + minimum``; the nibbles keep the file's order
(weight j in the low nibble of byte j of its block, weight j + 16 in the high nibble).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import gguf
import numpy as np
import torch

GROUP = 32  # weights per block in every format here
_Q = gguf.GGMLQuantizationType
BLOCK_TYPES = (_Q.Q4_0, _Q.Q4_1, _Q.Q8_0)


@dataclass
class Q4Blocks:
    codes: torch.Tensor  # [rows, cols / 2] uint8, two codes per byte
    scale: torch.Tensor  # [rows, cols / GROUP] float32
    minimum: torch.Tensor  # [rows, cols / GROUP] float32

    def dequantize_shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 2

    def dequantize(self) -> torch.Tensor:
        """[rows, cols] float32, the file's values."""
        rows = self.codes.shape[0]
        packed = self.codes.view(rows, -1, GROUP // 2)  # [rows, groups, 16]
        codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()  # [rows, groups, 32]
        return (codes * self.scale[..., None] + self.minimum[..., None]).view(rows, -1)


@dataclass
class Q8Blocks:
    codes: torch.Tensor  # [rows, cols] int8
    scale: torch.Tensor  # [rows, cols / GROUP] float32

    def dequantize_shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        rows = self.codes.shape[0]
        return (self.codes.view(rows, -1, GROUP).float() * self.scale[..., None]).view(rows, -1)


Blocks = Q4Blocks | Q8Blocks


def cat_blocks(parts: list[Blocks]) -> Blocks:
    """Parts stacked along rows (fused projections: q|k|v, gate|up); all of one format."""
    kind = type(parts[0])
    if any(type(p) is not kind for p in parts):
        raise ValueError("cannot fuse projections stored in different block formats")
    return kind(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(kind)))


def select_rows(blocks: Blocks, rows: torch.Tensor) -> Blocks:
    """The blocks of ``rows`` ([n] indices), in that order (an embedding lookup)."""
    return type(blocks)(*(getattr(blocks, f.name).index_select(0, rows) for f in fields(blocks)))


def read_blocks(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> Blocks:
    """A tensor's raw bytes ``[rows, bytes_per_row]`` (as GGUFReader gives them) as codes + block params."""
    if qtype not in BLOCK_TYPES:
        raise ValueError(f"{qtype.name} has no low-bit kernel ({', '.join(t.name for t in BLOCK_TYPES)} do)")
    header = 4 if qtype == _Q.Q4_1 else 2  # fp16 d, then fp16 m for Q4_1
    payload = GROUP if qtype == _Q.Q8_0 else GROUP // 2
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(rows, -1, header + payload)  # [rows, groups, bytes]
    scale = _fp16(blocks[..., 0:2])  # [rows, groups]
    codes = np.ascontiguousarray(blocks[..., header:]).reshape(rows, -1)
    if qtype == _Q.Q8_0:
        return Q8Blocks(torch.from_numpy(codes.view(np.int8)), torch.from_numpy(scale))
    minimum = -8.0 * scale if qtype == _Q.Q4_0 else _fp16(blocks[..., 2:4])
    return Q4Blocks(torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(minimum))


def _fp16(two_bytes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(two_bytes).view(np.float16)[..., 0].astype(np.float32)
