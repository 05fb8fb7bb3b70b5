"""Splitting a layer group of one request into chunks of at most max_chunk_bytes.

A chunk is a rectangle of (layers x blocks of the request's block table). Whole layers are grouped
while they fit; a single layer larger than the limit is cut along its blocks:

    blocks ─►  0 1 2 3 4 5 6 7                   blocks ─►  0 1 2 3 4 5 6 7
    layer 4   [ chunk 0       ]                  layer 4   [chunk 0][chunk 1]
    layer 5   [               ]                  layer 5   [chunk 2][chunk 3]
    layer 6   [ chunk 1       ]
    (2 layers fit in one chunk)                  (half a layer fits in one chunk)
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkRange:
    layer_start: int
    layer_end: int
    block_start: int  # index into the request's block table, not a block id
    block_end: int
    rank: int = 0     # the receiving tensor-parallel rank whose heads the chunk carries

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def num_blocks(self) -> int:
        return self.block_end - self.block_start


def plan_chunks(layer_start: int, layer_end: int, num_blocks: int, num_bytes_per_layer_block: int,
                max_chunk_bytes: int, rank: int = 0) -> list[ChunkRange]:
    """Cover layers [layer_start, layer_end) x blocks [0, num_blocks) of receiving rank `rank` with
    chunks of at most max_chunk_bytes (assumes one layer-block fits: num_bytes_per_layer_block <=
    max_chunk_bytes, the rank's)."""
    if not (0 <= layer_start < layer_end and num_blocks > 0):
        raise ValueError(f"empty chunk plan: layers [{layer_start}, {layer_end}), {num_blocks} blocks")
    if num_bytes_per_layer_block > max_chunk_bytes:
        raise ValueError(f"one block of one layer is {num_bytes_per_layer_block} bytes, above the "
                         f"{max_chunk_bytes}-byte chunk limit: raise max_chunk_bytes")
    num_bytes_per_layer = num_blocks * num_bytes_per_layer_block
    if num_bytes_per_layer <= max_chunk_bytes:
        layers_per_chunk = max_chunk_bytes // num_bytes_per_layer
        return [ChunkRange(start, min(start + layers_per_chunk, layer_end), 0, num_blocks, rank)
                for start in range(layer_start, layer_end, layers_per_chunk)]
    blocks_per_chunk = max_chunk_bytes // num_bytes_per_layer_block
    return [ChunkRange(layer, layer + 1, start, min(start + blocks_per_chunk, num_blocks), rank)
            for layer in range(layer_start, layer_end)
            for start in range(0, num_blocks, blocks_per_chunk)]


def cut_at(start: int, stop: int, boundaries: list[int]) -> list[tuple[int, int]]:
    """[start, stop) cut at every boundary inside it; [] when empty."""
    points = [start] + [b for b in boundaries if start < b < stop] + [stop]
    return [(a, b) for a, b in zip(points, points[1:]) if a < b]
