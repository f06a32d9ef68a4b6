"""GGUF's block formats read as they are, for kernels that keep weights low-bit (``layers/cpu_kernels``):
Q4_0 and Q4_1 as 4-bit codes with a scale and a minimum per 32 weights, Q8_0 as int8 codes with a scale.
Two more formats are the same arithmetic, rearranged losslessly at load:

- Q4_K (super-blocks of 256: eight 32-weight sub-blocks, each ``d * sc * q - dmin * m`` with 6-bit sc, m)
  becomes 4-bit blocks with scale ``d * sc`` and minimum ``-dmin * m`` (exact in float32: 11 x 6 bits);
- Q5_0 (``d * (q - 16)``, 5-bit q) becomes int8 codes ``q - 16`` with scale d;
- Q6_K (super-blocks of 256: sixteen 16-weight sub-blocks, ``d * sc * (q - 32)`` with int8 sc, 6-bit q) becomes
  int8 codes ``q - 32`` with a scale ``d * sc`` per 16 weights (exact in float32: 11 + 8 bits).

Q5_1 and Q5_K have no such form: they are expanded to floats.

Scales are stored as float32 (the file's fp16 values, exactly). Q4_0's ``d * (q - 8)`` becomes
``d * q + (-8 d)``, so both 4-bit formats are ``scale * code + minimum``; the nibbles keep the file's order
(weight j in the low nibble of byte j of its block, weight j + 16 in the high nibble).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import gguf
import numpy as np
import torch

GROUP = 32  # weights per block in every format here (Q6_K's int8 blocks have two scales each)
_Q = gguf.GGMLQuantizationType
BLOCK_TYPES = (_Q.Q4_0, _Q.Q4_1, _Q.Q8_0, _Q.Q4_K, _Q.Q5_0, _Q.Q6_K)


@dataclass
class Q4Blocks:
    codes: torch.Tensor  # [rows, cols / 2] uint8, two codes per byte
    scale: torch.Tensor  # [rows, cols / GROUP] float32
    minimum: torch.Tensor  # [rows, cols / GROUP] float32

    def dequantize_shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 2

    def select_rows(self, rows: torch.Tensor) -> Q4Blocks:
        """The blocks of ``rows`` ([n] indices), in that order (an embedding lookup)."""
        return _select_rows(self, rows)

    def dequantize(self) -> torch.Tensor:
        """[rows, cols] float32, the file's values."""
        rows = self.codes.shape[0]
        packed = self.codes.view(rows, -1, GROUP // 2)  # [rows, groups, 16]
        codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()  # [rows, groups, 32]
        return (codes * self.scale[..., None] + self.minimum[..., None]).view(rows, -1)


@dataclass
class Q8Blocks:
    codes: torch.Tensor  # [rows, cols] int8
    scale: torch.Tensor  # [rows, cols / group] float32

    @property
    def group(self) -> int:
        """Weights per scale: 32, or 16 (Q6_K's sub-blocks)."""
        return self.codes.shape[1] // self.scale.shape[1]

    def dequantize_shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def select_rows(self, rows: torch.Tensor) -> Q8Blocks:
        """The blocks of ``rows`` ([n] indices), in that order (an embedding lookup)."""
        return _select_rows(self, rows)

    def dequantize(self) -> torch.Tensor:
        rows = self.codes.shape[0]
        return (self.codes.view(rows, -1, self.group).float() * self.scale[..., None]).view(rows, -1)


Blocks = Q4Blocks | Q8Blocks


def cat_blocks(parts: list[Blocks]) -> Blocks:
    """Parts stacked along rows (fused projections: q|k|v, gate|up); all of one format."""
    kind = type(parts[0])
    if any(type(p) is not kind or p.scale.shape[1] * parts[0].codes.shape[1] != p.codes.shape[1]
           * parts[0].scale.shape[1] for p in parts):  # fmt: skip
        raise ValueError("cannot fuse projections stored in different block formats")
    return kind(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(kind)))


def _select_rows(blocks: Blocks, rows: torch.Tensor) -> Blocks:
    return type(blocks)(*(getattr(blocks, f.name).index_select(0, rows) for f in fields(blocks)))


def read_blocks(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> Blocks:
    """A tensor's raw bytes ``[rows, bytes_per_row]`` (as GGUFReader gives them) as codes + block params."""
    if qtype not in BLOCK_TYPES:
        raise ValueError(f"{qtype.name} has no low-bit kernel ({', '.join(t.name for t in BLOCK_TYPES)} do)")
    if qtype == _Q.Q4_K:
        return _read_q4_k(data)
    if qtype == _Q.Q5_0:
        return _read_q5_0(data)
    if qtype == _Q.Q6_K:
        return _read_q6_k(data)
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


def _read_q5_0(data: np.ndarray) -> Q8Blocks:
    """22-byte blocks: fp16 d, 32 high bits (bit j: weight j's), 16 bytes of low nibbles (Q4's order)."""
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(rows, -1, 22)  # [rows, groups, bytes]
    high = np.ascontiguousarray(blocks[..., 2:6]).view("<u4")  # [rows, groups, 1]
    bits = (high >> np.arange(GROUP, dtype=np.uint32)) & 1  # [rows, groups, 32]
    low = blocks[..., 6:22]
    nibbles = np.concatenate([low & 0x0F, low >> 4], axis=-1)  # [rows, groups, 32]
    codes = (nibbles | (bits << 4).astype(np.uint8)).astype(np.int8) - np.int8(16)
    return Q8Blocks(torch.from_numpy(codes.reshape(rows, -1)), torch.from_numpy(_fp16(blocks[..., 0:2])))


def _read_q6_k(data: np.ndarray) -> Q8Blocks:
    """210-byte super-blocks: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 sub-block scales, fp16 d.
    Per 128 weights (64 low bytes ``ql``, 32 high bytes ``qh``): weights 0-31 are ql[0:32] low nibbles with qh
    bits 0-1, 32-63 ql[32:64] low with bits 2-3, 64-95 ql[0:32] high with bits 4-5, 96-127 ql[32:64] high with
    bits 6-7."""
    rows = data.shape[0]
    sb = np.ascontiguousarray(data).reshape(rows, -1, 210)  # [rows, supers, bytes]
    ql = sb[..., 0:128].reshape(rows, -1, 2, 64)  # [rows, supers, halves, 64]
    qh = sb[..., 128:192].reshape(rows, -1, 2, 32)
    low, high = ql[..., :32], ql[..., 32:]
    quarters = [
        (low & 0x0F) | ((qh & 3) << 4),
        (high & 0x0F) | (((qh >> 2) & 3) << 4),
        (low >> 4) | (((qh >> 4) & 3) << 4),
        (high >> 4) | (((qh >> 6) & 3) << 4),
    ]
    q = np.concatenate(quarters, axis=-1)  # [rows, supers, halves, 128] in weight order
    codes = (q.astype(np.int16) - 32).astype(np.int8).reshape(rows, -1)
    sc = np.ascontiguousarray(sb[..., 192:208]).view(np.int8).astype(np.float32)  # [rows, supers, 16]
    scale = (_fp16(sb[..., 208:210])[..., None] * sc).reshape(rows, -1)  # [rows, cols / 16]
    return Q8Blocks(torch.from_numpy(codes), torch.from_numpy(np.ascontiguousarray(scale)))


def _read_q4_k(data: np.ndarray) -> Q4Blocks:
    """144-byte super-blocks: fp16 d, fp16 dmin, 12 bytes of 6-bit (sc, m) pairs for 8 sub-blocks, 128 bytes of
    codes (per 64 weights, 32 bytes: the low nibbles are the first sub-block, the high ones the second)."""
    rows = data.shape[0]
    sb = np.ascontiguousarray(data).reshape(rows, -1, 144)  # [rows, supers, bytes]
    d, dmin = _fp16(sb[..., 0:2]), _fp16(sb[..., 2:4])  # [rows, supers]
    packed = sb[..., 4:16].astype(np.uint8)  # [rows, supers, 12]
    sc = np.empty(packed.shape[:-1] + (8,), dtype=np.uint8)
    m = np.empty_like(sc)
    sc[..., :4], m[..., :4] = packed[..., 0:4] & 63, packed[..., 4:8] & 63
    sc[..., 4:] = (packed[..., 8:12] & 0x0F) | ((packed[..., 0:4] >> 6) << 4)
    m[..., 4:] = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
    scale = (d[..., None] * sc.astype(np.float32)).reshape(rows, -1)  # [rows, groups]
    minimum = (-(dmin[..., None] * m.astype(np.float32))).reshape(rows, -1)
    qs = sb[..., 16:].reshape(rows, -1, 4, 32)  # [rows, supers, pairs, 32 bytes]
    sub = np.stack([qs & 0x0F, qs >> 4], axis=3)  # [rows, supers, pairs, 2, 32]: one sub-block's codes each
    sub = sub.reshape(rows, -1, GROUP)  # [rows, groups, 32] in weight order
    codes = sub[..., :16] | (sub[..., 16:] << 4)  # weight j low nibble, j + 16 high: Q4's order
    return Q4Blocks(
        torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, -1)), torch.from_numpy(scale),
        torch.from_numpy(minimum),
    )  # fmt: skip


def _fp16(two_bytes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(two_bytes).view(np.float16)[..., 0].astype(np.float32)
