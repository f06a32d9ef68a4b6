"""GGUF blocks rearranged once at load for the CPU's integer dot-product kernel (``csrc/ggml_packed.cpp``).

Output rows go in tiles of 16; within a tile and a 32-weight block, each column's four consecutive weights sit
side by side, so one vector instruction multiplies a broadcast quad of activations against 16 columns:

- q4 (Q4_0, Q4_1, Q4_K): ``codes[tile, block, h, column, i]`` is byte ``4h + i`` of the column's GGUF block
  (low nibble weight ``4h + i``, high nibble weight ``4h + i + 16``): 256 bytes a tile-block;
- q5 (Q5_0, or any 32-weight int8 blocks whose codes fit -16..15): q4's 256 nibble bytes of ``w + 16``, then
  per quad ``j`` a 64-bit mask whose bit ``4 * column + i`` is the fifth bit of weight ``4j + i``: 320 bytes;
- q8 (Q8_0, Q6_K): ``codes[tile, block, j, column, i]`` is weight ``4j + i`` as ``w + 128``: 512 bytes;
- scales (and q4 minimums) ``[tile, block * sub-blocks, 16]``; Q6_K has two sub-blocks of 16 weights.

The same bytes as the file's blocks, moved: no float copy. A last partial tile is padded with zero weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longserve.loading.gguf_blocks import GROUP, Blocks, Q4Blocks, Q8Blocks

TILE = 16  # output columns per tile
Q4_BYTES, Q5_BYTES = 256, 320  # per (tile, block); q8 has 512


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
        tiles, groups, block_bytes = self.codes.shape
        tile, column = rows // TILE, rows % TILE
        if block_bytes == Q5_BYTES:
            return _select_q5_rows(self, tile, column)
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
    if blocks.group == GROUP and blocks.codes.min() >= -16 and blocks.codes.max() <= 15:
        return _pack_q5(blocks, tiles, groups, padded, tiled_params)
    unsigned = (blocks.codes.to(torch.int16) + 128).to(torch.uint8)  # [out, in]
    codes = padded(unsigned).view(tiles, TILE, groups, 8, 4).permute(0, 2, 3, 1, 4)
    return PackedBlocks(codes.reshape(tiles, groups, -1).contiguous(), tiled_params(blocks.scale), None, out)


_BITS = 1 << torch.arange(8, dtype=torch.int16)  # a byte's bit weights, lowest first


def _pack_q5(blocks: Q8Blocks, tiles: int, groups: int, padded, tiled_params) -> PackedBlocks:
    unsigned = padded((blocks.codes + 16).to(torch.uint8)).view(
        tiles, TILE, groups, 2, 4, 4
    )  # [.., half, h, i]
    nibbles = (unsigned[:, :, :, 0] & 15) | ((unsigned[:, :, :, 1] & 15) << 4)  # [tiles, column, block, h, i]
    nibbles = nibbles.permute(0, 2, 3, 1, 4).reshape(tiles, groups, -1)
    fifth = (unsigned.view(tiles, TILE, groups, 8, 4) >> 4).permute(
        0, 2, 3, 1, 4
    )  # [tiles, block, j, column, i]
    masks = (fifth.reshape(tiles, groups, 8, 8, 8).to(torch.int16) * _BITS).sum(-1).to(torch.uint8)
    codes = torch.cat([nibbles, masks.view(tiles, groups, -1)], dim=-1).contiguous()  # [tiles, groups, 320]
    return PackedBlocks(codes, tiled_params(blocks.scale), None, blocks.codes.shape[0])


def _select_q5_rows(tiles: PackedBlocks, tile: torch.Tensor, column: torch.Tensor) -> Q8Blocks:
    count, groups = len(tile), tiles.codes.shape[1]
    nibbles = tiles.codes[:, :, :Q4_BYTES].view(-1, groups, 4, TILE, 4)[
        tile, :, :, column
    ]  # [n, groups, h, i]
    low = torch.cat([nibbles & 15, nibbles >> 4], dim=2)  # [n, groups, quad j, i]
    masks = tiles.codes[:, :, Q4_BYTES:].view(-1, groups, 8, 8)[tile]  # [n, groups, j, 8 bytes]
    bits = ((masks[..., None].to(torch.int16) & _BITS) != 0).view(
        count, groups, 8, TILE, 4
    )  # [.., j, column, i]
    fifth = bits[torch.arange(count), :, :, column].to(torch.uint8)  # [n, groups, j, i]
    codes = (low | (fifth << 4)).to(torch.int16) - 16
    return Q8Blocks(codes.to(torch.int8).reshape(count, -1), tiles.scale[tile, :, column])
