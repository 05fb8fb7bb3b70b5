"""CUDA graphs of decode steps (vLLM's default; `--enforce-eager` turns them off).

A decode step of a small model launches a few hundred short kernels (each layer's norms, projections,
rotary, KV write and attention); at small batches the GPU waits on those launches rather than computing.
At start the runner captures the whole forward pass of a pure decode batch (one new token per request,
every layer, up to the final norm) once per *capture size*, and replays it each step: one launch.

    capture sizes      1 2 4 8 16 24 ... max_num_seqs        (vLLM's pattern; --cuda-graph-sizes)
    a step of B rows   padded up to the smallest size >= B; larger batches run eagerly

The graphs read fixed buffers, so each step copies its inputs into them:

    input_ids, positions   [S]           padded rows: token 0 at position 0
    slot_mapping           [S]           padded rows: -1 (their K/V are never written)
    seq_lens               [S]           padded rows: 1 (they read one cached row, never used)
    block_tables           [S, W]        W = the blocks of max_model_len; columns past a request's
                                         blocks keep older, valid block ids (seq_lens bounds the reads)
    query_start_loc        [S + 1]       0, 1, 2, ... (one token per row)

and attention is captured with max_seq_len = max_model_len, so the decode kernel's grid and splits are
fixed at capture (its splits past a row's length are empty). Sampling stays outside the graph. Prefill
and mixed steps, layer-group passes (a KV send's), pipeline stages and tensor-parallel ranks run eagerly.

`DecodeGraphs(..., capture=False)` keeps the buffers and the padding but runs the model eagerly on them
instead of replaying a graph: what the CPU tests check (the graph path's inputs, padding and outputs
against the eager path); `make gpu-check` runs the captured graphs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from serving.runner.input_batch import AttentionMetadata, StepInputs

logger = logging.getLogger(__name__)

MAX_DEFAULT_SIZE = 512


def capture_sizes(spec, max_num_seqs: int) -> tuple[int, ...]:
    """The batch sizes to capture, as vLLM's --cuda-graph-sizes reads them: None (default) or one value N
    is 1, 2, 4 and every multiple of 8 up to N (None: N = min(max_num_seqs, 512)); several values are the
    sizes themselves ("1,2,4,16" or a YAML list); "0" or an empty list captures none. Sizes above
    max_num_seqs are dropped (no decode batch is larger); the pattern's top (N, or max_num_seqs) is
    captured too where the multiples of 8 stop short of it."""
    values = _parse(spec)
    if values == (0,) or values == ():
        return ()
    if values is None or len(values) == 1:
        top = min(max_num_seqs, MAX_DEFAULT_SIZE) if values is None else min(values[0], max_num_seqs)
        sizes = {s for s in (1, 2, 4) if s <= top} | set(range(8, top + 1, 8)) | {top}
    else:
        sizes = {s for s in values if s <= max_num_seqs}
    return tuple(sorted(sizes))


def normalize_sizes(spec) -> str | None:
    """--cuda-graph-sizes as the config keeps it ("1,2,4", a YAML list joined), or None; ValueError
    saying what to change."""
    values = _parse(spec)
    return None if values is None else ",".join(map(str, values))


def _parse(spec) -> tuple[int, ...] | None:
    if spec is None:
        return None
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    parts = spec if isinstance(spec, (list, tuple)) else [p for p in str(spec).replace(" ", ",").split(",") if p]
    try:
        values = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"--cuda-graph-sizes {spec!r}: give batch sizes, comma separated (e.g. 1,2,4,8), one "
                         "size N (1, 2, 4 and every 8 up to N), or 0 for none") from None
    if any(v < 0 for v in values) or (0 in values and len(values) > 1):
        raise ValueError(f"--cuda-graph-sizes {spec!r}: sizes must be at least 1 (or a lone 0 for none)")
    return values


@dataclass
class _Captured:
    size: int
    graph: object | None  # torch.cuda.CUDAGraph; None when not capturing (the model runs on the buffers)
    meta: AttentionMetadata
    hidden: Tensor  # [size, H]: the graph's output (a view of the shared output buffer)


class DecodeGraphs:
    """Decode passes captured per batch size over fixed input buffers (module docstring)."""

    def __init__(self, model, attention, sizes: tuple[int, ...], max_model_len: int, block_size: int,
                 device: torch.device, capture: bool = True) -> None:
        """attention(meta) -> the model's attention backend over the runner's KV cache for that metadata."""
        if not sizes:
            raise ValueError("DecodeGraphs needs at least one capture size")
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.attention = model, attention
        self.sizes = tuple(sorted(sizes))
        self.max_model_len, self.device, self.capture = max_model_len, device, capture
        top, width = self.sizes[-1], -(-max_model_len // block_size)
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=device)
        self.positions = torch.zeros(top, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((top,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(top, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((top, width), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(top + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, _Captured] = {}
        self.replays = 0  # steps served (counted by tests and the step trace)
        self.padded_rows = 0
        self._output: Tensor | None = None
        self._pool = None

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def size_for(self, num_rows: int) -> int | None:
        """The captured size a batch of num_rows decode rows runs in, or None (eager)."""
        for size in self.sizes:
            if size >= num_rows:
                return size
        return None

    def serves(self, inputs: StepInputs) -> bool:
        """A pure decode step (one token per request) of a captured size."""
        attn = inputs.attn
        num_rows = attn.seq_lens.shape[0]
        return (attn.max_query_len == 1 and inputs.input_ids.shape[0] == num_rows
                and self.size_for(num_rows) is not None and attn.block_tables.shape[1] <= self.block_tables.shape[1])

    def capture_all(self, progress: bool = False) -> None:
        """Capture every size, largest first (the smaller graphs reuse its memory pool), each after an
        eager warm-up run on the same buffers (kernels compiled and autotuned outside the capture)."""
        started = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0] if self.capture else 0
        sizes = sorted(self.sizes, reverse=True)
        if progress:
            from tqdm import tqdm
            sizes = tqdm(sizes, desc="Capturing CUDA graphs (decode)", unit="graph")
        if self.capture:
            self._pool = torch.cuda.graph_pool_handle()
        for size in sizes:
            self._capture(size)
        if self.capture:
            torch.cuda.synchronize(self.device)
            used = (free_before - torch.cuda.mem_get_info(self.device)[0]) / 2**20
            logger.info("captured %d CUDA graphs of decode steps (batch sizes %s) in %.1f s, %.0f MiB",
                        len(self.sizes), _ranges(self.sizes), time.perf_counter() - started, used)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
                                 seq_lens=self.seq_lens[:size], query_start_loc=self.query_start_loc[:size + 1],
                                 max_query_len=1, max_seq_len=self.max_model_len)

    def _forward(self, size: int, meta: AttentionMetadata) -> Tensor:
        hidden, _ = self.model(self.input_ids[:size], self.positions[:size], self.attention(meta))
        return hidden                                                                      # [size, H]

    @torch.inference_mode()
    def _capture(self, size: int) -> None:
        meta = self._meta(size)
        self._pad(0, size)
        warm = self._forward(size, meta)  # also compiles the kernels for this size
        if self._output is None:
            self._output = torch.empty((self.max_size, warm.shape[-1]), dtype=warm.dtype, device=self.device)
        out = self._output[:size]
        graph = None
        if self.capture:
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out.copy_(self._forward(size, meta))
        self.graphs[size] = _Captured(size, graph, meta, out)

    def _pad(self, start: int, end: int) -> None:
        """Rows [start, end) hold no request: they write no K/V and read one cached row."""
        if end > start:
            self.input_ids[start:end] = 0
            self.positions[start:end] = 0
            self.slot_mapping[start:end] = -1
            self.seq_lens[start:end] = 1

    def run(self, inputs: StepInputs) -> Tensor:
        """The decode pass of `inputs` (serves() must hold): the normed hidden states [B, H], a view of
        the graphs' output buffer, valid until the next run."""
        attn = inputs.attn
        num_rows = attn.seq_lens.shape[0]
        size = self.size_for(num_rows)
        captured = self.graphs[size]
        self.input_ids[:num_rows].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:num_rows].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:num_rows].copy_(attn.slot_mapping, non_blocking=True)
        self.seq_lens[:num_rows].copy_(attn.seq_lens, non_blocking=True)
        self.block_tables[:num_rows, :attn.block_tables.shape[1]].copy_(attn.block_tables, non_blocking=True)
        self._pad(num_rows, size)
        if captured.graph is not None:
            captured.graph.replay()
        else:
            with torch.inference_mode():
                captured.hidden.copy_(self._forward(size, captured.meta))
        self.replays += 1
        self.padded_rows += size - num_rows
        return captured.hidden[:num_rows]


def _ranges(sizes: tuple[int, ...]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 6 else f"{', '.join(map(str, sizes[:4]))}, ..., {sizes[-1]}"
