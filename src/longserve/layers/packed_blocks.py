"""GGUF blocks rearranged once at load for the CPU's integer dot-product kernel (``csrc/ggml_packed.cpp``).

Output rows go in tiles of 16; within a tile and a 32-weight block, each column's four consecutive weights sit
side by side, so one vector instruction multiplies a broadcast quad of activations against 16 columns:

- q4 (Q4_0, Q4_1, Q4_K): ``codes[tile, block, h, column, i]`` is byte ``4h + i`` of the column's GGUF block
  (low nibble weight ``4h + i``, high nibble weight ``4h + i + 16``): 256 bytes a tile-block;
- q8 (Q8_0, Q5_0, Q6_K): ``codes[tile, block, j, column, i]`` is weight ``4j + i`` as ``w + 128``: 512 bytes;
- scales (and q4 minimums) ``[tile, block * sub-blocks, 16]``; Q6_K has two sub-blocks of 16 weights.

The same bytes as the file's blocks, moved: no float copy. A last partial tile is padded with zero weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longserve.loading.gguf_blocks import GROUP, Blocks, Q4Blocks, Q8Blocks

TILE = 16  # output columns per tile


@dataclass
class PackedBlocks:
    codes: torch.Tensor  # [tiles, groups, 256 (q4) or 512 (q8)] uint8
    scale: torch.Tensor  # [tiles, groups * sub, 16] float32
    minimum: torch.Tensor | None  # [tiles, groups, 16] float32 for q4, else None
    out_features: int

    @property
    def q4(self) -> bool:
        return self.minimum is not None

    def select_rows(self, rows: torch.Tensor) -> Blocks:
        """Output rows ``rows`` ([n]) in the file's block format (an embedding lookup from a tied head)."""
        tiles, groups, _ = self.codes.shape
        tile, column = rows // TILE, rows % TILE
        quads = 4 if self.q4 else 8
        codes = self.codes.view(tiles, groups, quads, TILE, 4)[tile, :, :, column]  # [n, groups, quads, 4]
        codes = codes.reshape(len(rows), -1)
        scale = self.scale[tile, :, column]  # [n, groups * sub]: Q8Blocks infers its group from it
        if self.q4:
            return Q4Blocks(codes, scale, self.minimum[tile, :, column])
        return Q8Blocks((codes.to(torch.int16) - 128).to(torch.int8), scale)

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32, the file's values."""
        return self.select_rows(torch.arange(self.out_features)).dequantize()


def pack(blocks: Blocks) -> PackedBlocks:
    """``blocks`` ([out, in] in the file's format) in the kernel's tiles."""
    out = blocks.codes.shape[0]
    tiles = -(-out // TILE)
    pad = tiles * TILE - out

    def padded(t: torch.Tensor) -> torch.Tensor:  # [out, ...] -> [tiles * 16, ...], zero rows added
        return torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t

    def tiled_params(t: torch.Tensor) -> torch.Tensor:  # [out, n] -> [tiles, n, 16]
        return padded(t).view(tiles, TILE, -1).transpose(1, 2).contiguous()

    if isinstance(blocks, Q4Blocks):
        groups = blocks.codes.shape[1] * 2 // GROUP
        codes = padded(blocks.codes).view(tiles, TILE, groups, 4, 4)  # [tiles, column, block, h, i]
        codes = codes.permute(0, 2, 3, 1, 4).reshape(tiles, groups, -1).contiguous()
        return PackedBlocks(codes, tiled_params(blocks.scale), tiled_params(blocks.minimum), out)
    groups = blocks.codes.shape[1] // GROUP
    unsigned = (blocks.codes.to(torch.int16) + 128).to(torch.uint8)  # [out, in]
    codes = padded(unsigned).view(tiles, TILE, groups, 8, 4).permute(0, 2, 3, 1, 4)
    return PackedBlocks(codes.reshape(tiles, groups, -1).contiguous(), tiled_params(blocks.scale), None, out)
