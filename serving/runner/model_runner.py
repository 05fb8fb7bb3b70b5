"""Executes StepPlans: keeps per-request state, runs one forward over the step's tokens reading and
writing the paged KV cache, and samples. Makes no scheduling decisions."""
from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from kernels.ops import paged_attention, write_kv
from kvcache.config import CacheConfig
from scheduler.step import StepPlan, StepResult
from serving.models import CausalLM, ModelArchConfig, load_model
from serving.runner.connector import KVConnector, NullConnector
from serving.runner.input_batch import AttentionMetadata, RunnerRequestState, build_step_inputs
from serving.sampler import Sampler, SamplingBatch, make_generator

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


class PagedAttentionBackend:
    """The model's AttentionBackend for one step: store the step's K/V, attend over the paged cache."""

    def __init__(self, kv_cache: Tensor, meta: AttentionMetadata, scale: float) -> None:
        self.kv_cache = kv_cache  # [L, 2, num_blocks, block_size, Hkv, D]
        self.meta = meta
        self.scale = scale

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_cache, v_cache = self.kv_cache[layer_idx, 0], self.kv_cache[layer_idx, 1]
        meta = self.meta
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                               self.scale, meta.max_query_len, meta.max_seq_len)


def kv_bytes_per_block(arch: ModelArchConfig, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return arch.num_layers * 2 * block_size * arch.num_kv_heads * arch.head_dim * itemsize


class ModelRunner:
    def __init__(self, model_dir: str, cache_config: CacheConfig, device: torch.device,
                 dtype: torch.dtype, seed: int = 0, model: CausalLM | None = None,
                 connector: KVConnector | None = None) -> None:
        self.device = device
        self.connector: KVConnector = connector or NullConnector()
        self.dtype = dtype
        self.block_size = cache_config.block_size
        self.model = model if model is not None else load_model(model_dir, dtype, device)
        self.arch = self.model.config
        self.num_blocks = cache_config.num_blocks_override or (
            cache_config.kv_cache_memory_bytes // kv_bytes_per_block(self.arch, self.block_size, dtype))
        if self.num_blocks < 1:
            raise ValueError(f"the KV memory budget ({cache_config.kv_cache_memory_bytes} bytes) holds no "
                             f"block of {kv_bytes_per_block(self.arch, self.block_size, dtype)} bytes: raise "
                             "--kv-cache-memory-bytes")
        arch = self.arch
        self.kv_cache = torch.zeros(arch.num_layers, 2, self.num_blocks, self.block_size,   # [L,2,NB,BS,Hkv,D]
                                    arch.num_kv_heads, arch.head_dim, dtype=dtype, device=device)
        self.scale = arch.head_dim ** -0.5
        self.sampler = Sampler()
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.states: dict[str, RunnerRequestState] = {}
        self.forward_seconds = 0.0  # cumulative time inside the model's forward + logits
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                    self.kv_cache.numel() * self.kv_cache.element_size() / 2**20)

    def _apply_plan(self, plan: StepPlan) -> None:
        for request_id in plan.finished_request_ids + plan.preempted_request_ids:
            self.states.pop(request_id, None)
        for new in plan.new_requests:
            params = new.sampling_params
            num_sampled = 0 if params.greedy else len(new.token_ids) - new.num_prompt_tokens
            generator = (make_generator(params.seed, self.device, self.arch.vocab_size, num_sampled)
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
        self._apply_plan(plan)
        result = StepResult() if plan.is_empty else self._execute(plan)
        events = self.connector.poll()
        result.finished_sending, result.failed_sending = events.finished_sending, events.failed_sending
        result.finished_recving, result.failed_recving = events.finished_recving, events.failed_recving
        return result

    def _forward(self, inputs, attn: PagedAttentionBackend, plan: StepPlan) -> Tensor:
        if not plan.kv_sends:
            hidden, _ = self.model(inputs.input_ids, inputs.positions, attn)
            return hidden
        # layer by layer (group by group): each group's KV leaves while later layers compute
        self.connector.begin_sends(self.kv_cache, plan.kv_sends)
        hidden, residual = None, None
        for start, end in self.connector.layer_groups(self.arch.num_layers, plan.total_num_scheduled_tokens):
            hidden, residual = self.model(inputs.input_ids, inputs.positions, attn, start, end, hidden, residual)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the sender reads the cache
            self.connector.layers_done(start, end)
        return hidden

    def _execute(self, plan: StepPlan) -> StepResult:
        request_ids = list(plan.num_scheduled_tokens)
        states = [self.states[r] for r in request_ids]
        num_tokens = [plan.num_scheduled_tokens[r] for r in request_ids]
        inputs = build_step_inputs(states, num_tokens, self.block_size, self.device)
        attn = PagedAttentionBackend(self.kv_cache, inputs.attn, self.scale)
        started = time.perf_counter()
        hidden = self._forward(inputs, attn, plan)                               # [T, H]
        logits = (self.model.compute_logits(hidden[inputs.logits_indices])       # [S, V]
                  if inputs.sample_request_ids else None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.forward_seconds += time.perf_counter() - started
        for state, n in zip(states, num_tokens):
            state.num_computed_tokens += n
        if logits is None:
            return StepResult()
        return self._sample(logits, inputs.sample_request_ids)

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
