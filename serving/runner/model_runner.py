"""The model runner: the Executor of one process. It keeps per-request state, runs each plan's segments
over the paged KV cache, samples, and has its connector worker carry out the plan's KV moves. It makes
no scheduling decisions.

Segments (scheduler/step.py) are grouped into *chains*: consecutive segments over the same rows with
adjoining layer ranges. A chain that starts past layer 0 resumes from the hidden state its rows left
in an earlier step; one that stops before the last layer leaves its hidden state here:

    plan   [A B C] 0-1 | [A B C] 1-2 | [A B C] 2-4        one chain (layer groups for a KV send)
    plan   [A B] 0-4 | [P] 0-2                         two chains; P's hidden state is carried
    next   [A B] 0-4 | [P] 2-4                         P resumes at layer 2 and samples
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from pdkernels.ops import paged_attention, write_kv
from kvcache.config import CacheConfig
from kvcache.layout import KVCacheLayout
from scheduler.step import Segment, StepPlan, StepResult
from serving.kv_connector.base import KVConnectorWorker, NullWorker
from serving.models import CausalLM, load_model
from serving.models.native_decoder import NativeDecoder
from serving.runner.cpu_malloc import keep_step_memory
from serving.runner.cuda_graphs import DecodeGraphs
from serving.runner.input_batch import AttentionMetadata, RunnerRequestState, StepInputs, build_step_inputs
from serving.sampler import Sampler, SamplingBatch, make_generator
from serving.runner.stage_pipe import StagePipe

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 matmuls are ~100x slower than fp32 on CPU
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def model_kv_layout(model: CausalLM, block_size: int) -> KVCacheLayout:
    """The KV cache layout this model's rank holds (a tensor-parallel rank: its slice of the KV heads; a
    pipeline stage: its layers only)."""
    group = getattr(model, "tensor_parallel", None)
    stage = getattr(model, "pipeline_stage", None)
    arch = getattr(model, "full_config", model.config)
    tp_size, tp_rank = (group.size, group.rank) if group is not None else (1, 0)
    num_layers = stage.num_layers if stage is not None else arch.num_layers
    layout = KVCacheLayout.for_model(num_layers, arch.num_kv_heads, arch.head_dim, block_size,
                                     next(model.parameters()).dtype, tp_size, tp_rank)
    if layout.num_kv_heads != model.config.num_kv_heads:
        raise RuntimeError(f"rank {tp_rank} of {tp_size} holds {model.config.num_kv_heads} KV heads, its layout "
                           f"{layout.num_kv_heads}")
    return layout


def _has_swaps(plan: StepPlan) -> bool:
    """Copies into or out of the cache may run beside the plan's forward pass (kv_connector/swap.py)."""
    return any(m.kind in ("swap_out", "swap_in") for m in plan.kv_moves)


def pool_layout(layout: KVCacheLayout, stage) -> KVCacheLayout:
    """The rank layout a per-rank memory budget is sized by: with pipeline stages (every rank holds as
    many blocks, of the same ids) the largest stage's, so that no rank's cache exceeds the budget."""
    return layout if stage is None else layout.largest_stage(stage.partition)


def num_kv_blocks(layout: KVCacheLayout, cache_config: CacheConfig, budget_bytes: int | None = None) -> int:
    """The pool size: fixed by --num-gpu-blocks-override, else what the memory budget holds (budget_bytes:
    one the engine worked out, serving/runner/gpu_memory.py; else the configured or default one)."""
    if cache_config.num_blocks_override:
        return cache_config.num_blocks_override
    budget = cache_config.kv_bytes if budget_bytes is None else budget_bytes
    num_blocks = layout.num_blocks_for_bytes(budget)
    if num_blocks < 1:
        raise ValueError(f"the KV memory budget ({budget} bytes) holds no block of "
                         f"{layout.bytes_per_block} bytes: raise --kv-cache-memory-bytes")
    return num_blocks


class PagedAttentionBackend:
    """The model's AttentionBackend for one chain: store its K/V, attend over the paged cache."""

    def __init__(self, kv_cache: Tensor, meta: AttentionMetadata, scale: float, first_layer: int = 0,
                 wait_layers=None) -> None:
        self.kv_cache = kv_cache  # [L, 2, num_blocks, block_size, Hkv, D]: layers first_layer.. (a pipeline stage's)
        self.meta = meta
        self.scale = scale
        self.first_layer = first_layer
        self.wait_layers = wait_layers  # the connector's, when copies into or out of the cache may be pending

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.wait_layers is not None:
            self.wait_layers(layer_idx, layer_idx + 1)
        index = layer_idx - self.first_layer
        k_cache, v_cache = self.kv_cache[index, 0], self.kv_cache[index, 1]
        meta = self.meta
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                               self.scale, meta.max_query_len, meta.max_seq_len)


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: Tensor, layout: KVCacheLayout, device: torch.device,
                 seed: int = 0, connector: KVConnectorWorker | None = None, enforce_eager: bool = False,
                 pipe: StagePipe | None = None) -> None:
        """pipe: with a pipeline stage's model, the link to the stages before and after it."""
        layout.check(kv_cache)
        if device.type == "cpu":
            keep_step_memory()  # else every step page-faults its large temporaries in again
        self.model = model
        self.arch = model.config
        self.kv_cache = kv_cache  # [L, 2, num_blocks, block_size, Hkv, D]
        self.layout = layout
        self.block_size = layout.block_size
        self.num_blocks = kv_cache.shape[2]
        self.device = device
        self.connector: KVConnectorWorker = connector or NullWorker()
        self.scale = self.arch.head_dim ** -0.5
        self.sampler = Sampler()
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.states: dict[str, RunnerRequestState] = {}
        # hidden state of chains that stopped before the last layer: request ids -> (hidden, residual)
        self.carried: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}
        # cumulative wall and process CPU time inside the model's forward passes + logits (not input
        # preparation, sampling or KV moves): what benchmarks call the step's compute
        self.forward_seconds = 0.0
        self.forward_cpu_seconds = 0.0
        # a later pipeline stage's: cumulative wall time waiting for the stage before's activations
        self.pipe_wait_seconds = 0.0
        # on CUDA, wait for the device before every layers_done, not only between layer groups: other
        # processes read the KV this step writes (set for rank 0 of a group whose caches it maps)
        self.sync_before_layers_done = False
        # decode steps of 1-8 rows in one native call per segment (serving/models/native_decoder.py);
        # --enforce-eager keeps every step on the model's Python path
        self.enforce_eager = enforce_eager
        self.native_decoder: NativeDecoder | None = None
        # pure decode steps replayed from CUDA graphs (serving/runner/cuda_graphs.py); capture_decode_graphs
        self.decode_graphs: DecodeGraphs | None = None
        # a pipeline stage runs its layers of every plan and passes the hidden state on; the last samples
        self.stage = getattr(model, "pipeline_stage", None)
        self.pipe = pipe
        if self.stage is not None and pipe is None:
            raise ValueError("a pipeline stage's runner needs the pipe to its neighbouring stages")
        self.bind_native_decoder()

    def bind_native_decoder(self) -> None:
        """(Re)bind the native decode path to the model's current weights; call after changing the
        model's layers (pack_linears / unpack_linears). Until then decode steps take the Python path."""
        self.native_decoder = (NativeDecoder.build(self.model, self.kv_cache)
                               if self.device.type == "cpu" and not self.enforce_eager else None)

    def capture_decode_graphs(self, sizes: tuple[int, ...], max_model_len: int, capture: bool = True,
                              progress: bool = False) -> DecodeGraphs | None:
        """Capture the decode pass for each batch size in `sizes` (serving/runner/cuda_graphs.py); later
        pure decode steps of up to max(sizes) rows replay them. capture=False runs the model eagerly on
        the graphs' buffers instead (the CPU tests of that path). None where graphs do not apply: no
        sizes, --enforce-eager, or a pipeline stage or tensor-parallel rank (those run eagerly)."""
        if not sizes or self.enforce_eager or self.stage is not None \
                or getattr(self.model, "tensor_parallel", None) is not None:
            return None

        def attention(meta: AttentionMetadata) -> PagedAttentionBackend:
            return PagedAttentionBackend(self.kv_cache, meta, self.scale)

        graphs = DecodeGraphs(self.model, attention, sizes, max_model_len, self.block_size, self.device, capture)
        graphs.capture_all(progress)
        self.decode_graphs = graphs
        return graphs

    @classmethod
    def load(cls, model_dir: str, cache_config: CacheConfig, device: torch.device, dtype: torch.dtype,
             seed: int = 0, connector: KVConnectorWorker | None = None, enforce_eager: bool = False) -> ModelRunner:
        """Load the model and allocate a KV cache of the configured size (tools and benchmarks)."""
        model = load_model(model_dir, dtype, device)
        layout = model_kv_layout(model, cache_config.block_size)
        kv_cache = layout.allocate(num_kv_blocks(layout, cache_config), device)
        return cls(model, kv_cache, layout, device, seed, connector, enforce_eager)

    def close(self) -> None:
        """Nothing to release in one process (a tensor-parallel runner stops its other ranks)."""

    def _apply_plan(self, plan: StepPlan) -> None:
        for request_id in plan.finished_request_ids + plan.preempted_request_ids:
            self.states.pop(request_id, None)
            self.carried = {key: value for key, value in self.carried.items() if request_id not in key}
        for new in plan.new_requests:
            params = new.sampling_params
            num_sampled = 0 if params.greedy else len(new.token_ids) - new.num_prompt_tokens
            generator = (make_generator(params.seed, self.device, num_sampled=num_sampled)
                         if params.seed is not None else None)
            self.states[new.request_id] = RunnerRequestState(
                new.request_id, list(new.token_ids), new.num_prompt_tokens, params, list(new.block_ids),
                new.num_computed_tokens, generator)
        for delta in plan.cached_requests:
            state = self.states[delta.request_id]
            state.block_ids.extend(delta.new_block_ids)
            state.num_computed_tokens = delta.num_computed_tokens
            state.token_ids.extend(delta.new_token_ids)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        started = time.perf_counter()
        self.connector.start(plan.kv_moves)  # first: every move is then reported, whatever happens below
        self._apply_plan(plan)
        result = StepResult() if plan.is_empty else self._execute(plan)
        self.connector.wait_layers(0, self.arch.num_layers)  # the step's swaps end in it (kv_connector/swap.py)
        result.moves = self.connector.poll()
        result.step_seconds = time.perf_counter() - started
        return result

    @contextmanager
    def _forward_timer(self, sync: bool = False) -> Iterator[None]:
        """Adds the block's wall and CPU time to forward_seconds / forward_cpu_seconds; with sync, waits
        for the device first (absorbing any work the earlier, unsynced blocks left queued)."""
        started, cpu_started = time.perf_counter(), time.process_time()
        yield
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.forward_seconds += time.perf_counter() - started
        self.forward_cpu_seconds += time.process_time() - cpu_started

    def _execute(self, plan: StepPlan) -> StepResult:
        if self.stage is not None:
            return self._execute_stage(plan)
        hidden_rows, sample_ids = [], []
        for chain in _chains(plan.segments or [Segment(list(plan.num_scheduled_tokens))]):
            rows, hidden, inputs = self._run_chain(plan, chain)
            if hidden is not None and inputs.sample_request_ids:
                hidden_rows.append(hidden[inputs.logits_indices])                     # [S_i, H]
                sample_ids += inputs.sample_request_ids
        with self._forward_timer(sync=True):
            logits = self.model.compute_logits(torch.cat(hidden_rows)) if hidden_rows else None   # [S, V]
        if logits is None:
            return StepResult()
        result = self._sample(logits, sample_ids)
        self.connector.tokens_sampled(result.sampled_token_ids)
        return result

    def _execute_stage(self, plan: StepPlan) -> StepResult:
        """A pipeline stage's part of a plan: its layers over every scheduled token, the hidden state
        taken from the stage before (not the first) and passed to the stage after (not the last), which
        samples. Whole passes only (layered prefill's segments are refused with pipeline parallelism)."""
        stage = self.stage
        rows = list(plan.num_scheduled_tokens)
        bounds = self._stage_pieces(plan, rows)
        states = [self.states[r] for r in rows]
        num_tokens = [plan.num_scheduled_tokens[r] for r in rows]
        inputs = build_step_inputs(states, num_tokens, self.block_size, self.device)
        swapping = _has_swaps(plan)
        attn = PagedAttentionBackend(self.kv_cache, inputs.attn, self.scale, stage.first_layer,
                                     wait_layers=self.connector.wait_layers if swapping else None)
        hidden, residual = None, None
        if not stage.is_first:
            waiting = time.perf_counter()
            hidden, residual = self.pipe.recv(inputs.input_ids.shape[0])
            self.pipe_wait_seconds += time.perf_counter() - waiting
        layers = self._native_layers_for(inputs)
        for start, end in zip(bounds, bounds[1:]):  # layer groups: each handed to a KV send as it ends
            if swapping and layers is not None:  # one native call runs the range: its copies first
                self.connector.wait_layers(start, end)
            with self._forward_timer(sync=not stage.is_last):
                hidden, residual = self.model(inputs.input_ids, inputs.positions, attn, start, end, hidden,
                                              residual, layers)                              # [T, H]
            self.connector.layers_done(rows, start, end)
        for state, n in zip(states, num_tokens):
            state.num_computed_tokens += n
        if not stage.is_last:
            self.pipe.send(hidden, residual)
            return StepResult()
        if not inputs.sample_request_ids:
            return StepResult()
        with self._forward_timer(sync=True):
            logits = self.model.compute_logits(hidden[inputs.logits_indices])                 # [S, V]
        result = self._sample(logits, inputs.sample_request_ids)
        self.connector.tokens_sampled(result.sampled_token_ids)
        return result

    def _stage_pieces(self, plan: StepPlan, rows: list[str]) -> list[int]:
        """The layer boundaries of the stage's part of a plan: its first and end layer, and the ends of
        the plan's layer groups within it (a KV send's groups). The plan must run every row through
        every layer in one chain: layered prefill's carried passes are not supported across stages."""
        stage = self.stage
        chains = _chains(plan.segments or [Segment(rows)])
        chain = chains[0]
        ends = [stage.num_model_layers if s.layer_end is None else s.layer_end for s in chain]
        if len(chains) != 1 or chain[0].request_ids != rows or chain[0].layer_start != 0 \
                or ends[-1] != stage.num_model_layers:
            raise RuntimeError("pipeline stages run every row through every layer in one pass: layered prefill "
                               "is not supported with pipeline parallelism")
        inner = [end for end in ends if stage.first_layer < end < stage.end_layer]
        return [stage.first_layer, *inner, stage.end_layer]

    def _run_chain(self, plan: StepPlan, chain: list[Segment]) -> tuple[list[str], Tensor | None, StepInputs]:
        """Run one chain of segments; returns its rows, the final hidden state (None when the chain
        stops before the last layer: then it is carried) and the chain's inputs."""
        rows = chain[0].request_ids
        states = [self.states[r] for r in rows]
        num_tokens = [plan.num_scheduled_tokens[r] for r in rows]
        inputs = build_step_inputs(states, num_tokens, self.block_size, self.device)
        swapping = _has_swaps(plan)
        attn = PagedAttentionBackend(self.kv_cache, inputs.attn, self.scale,
                                     wait_layers=self.connector.wait_layers if swapping else None)
        num_layers = self.arch.num_layers
        key = tuple(rows)
        hidden, residual = self.carried.pop(key, (None, None)) if chain[0].layer_start > 0 else (None, None)
        if chain[0].layer_start > 0 and hidden is None:
            raise RuntimeError(f"segment of {rows} resumes at layer {chain[0].layer_start} but no hidden "
                               "state was carried for these rows")
        graphs = self._graphs_for(chain, inputs)
        if graphs is not None:
            if swapping:
                self.connector.wait_layers(0, num_layers)
            with self._forward_timer():
                hidden = graphs.run(inputs)                                                 # [B, H]
            self.connector.layers_done(rows, 0, num_layers)
            for state, n in zip(states, num_tokens):
                state.num_computed_tokens += n
            return rows, hidden, inputs
        layers = self._native_layers_for(inputs)
        for segment in chain:
            end = num_layers if segment.layer_end is None else segment.layer_end
            if swapping and layers is not None:  # one native call runs the range: its copies first
                self.connector.wait_layers(segment.layer_start, end)
            with self._forward_timer():
                hidden, residual = self.model(inputs.input_ids, inputs.positions, attn, segment.layer_start, end,
                                              hidden, residual, layers)                   # [T, H]
            if (len(chain) > 1 or self.sync_before_layers_done) and self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # a sender reads the cache
            self.connector.layers_done(rows, segment.layer_start, end)
        last = chain[-1].layer_end
        if last is not None and last < num_layers:
            self.carried[key] = (hidden, residual)
            return rows, None, inputs
        for state, n in zip(states, num_tokens):
            state.num_computed_tokens += n
        return rows, hidden, inputs

    def _graphs_for(self, chain: list[Segment], inputs: StepInputs) -> DecodeGraphs | None:
        """The decode graphs for a chain they serve: one pass over every layer of a pure decode batch."""
        graphs = self.decode_graphs
        if graphs is None or len(chain) != 1 or chain[0].layer_start != 0 \
                or chain[0].layer_end not in (None, self.arch.num_layers):
            return None
        return graphs if graphs.serves(inputs) else None

    def _native_layers_for(self, inputs: StepInputs) -> NativeDecoder | None:
        """The native decoder for a decode step it serves (the model's layers run it), else None."""
        native = self.native_decoder
        if native is not None and native.serves(inputs.input_ids.shape[0], inputs.attn.max_query_len, self.kv_cache) \
                and native.is_current():
            return native
        return None

    def _sample(self, logits: Tensor, request_ids: list[str]) -> StepResult:
        states = [self.states[r] for r in request_ids]
        batch = SamplingBatch.from_params(
            [s.sampling_params for s in states],
            [s.prompt_token_ids if s.sampling_params.has_penalties else [] for s in states],
            [s.output_token_ids if s.sampling_params.has_penalties else [] for s in states],
            [s.generator for s in states], self.device)
        out = self.sampler(logits, batch, self.generator)
        token_ids = out.token_ids.tolist()
        result = StepResult()
        for state, token_id, logprob in zip(states, token_ids, out.logprobs):
            state.token_ids.append(token_id)
            result.sampled_token_ids[state.request_id] = token_id
            if logprob is not None:
                result.logprobs[state.request_id] = logprob
        return result


def _chains(segments: list[Segment]) -> list[list[Segment]]:
    """Consecutive segments over the same rows with adjoining layer ranges, grouped."""
    chains: list[list[Segment]] = []
    for segment in segments:
        last = chains[-1][-1] if chains else None
        if last is not None and last.request_ids == segment.request_ids and last.layer_end == segment.layer_start:
            chains[-1].append(segment)
        else:
            chains.append([segment])
    return chains
