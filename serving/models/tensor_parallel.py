"""Tensor parallelism as a load-time transform of the plain model (gpt-fast's way, not flags inside the
model code): before its weights exist (on the meta device) the model is given the rank's shapes and three
kinds of module (`shard_structure`); then each checkpoint tensor, memory-mapped, gives the rank only its
part (`load_shard`), so a rank never holds more than its shard. Megatron's split, as vLLM and gpt-fast
do it:

    qkv_proj      column-parallel: rank r keeps its q heads [r*Hq/tp, ...) and the KV heads they read
                  (Hkv/tp of them; when tp > Hkv one KV head, replicated on tp/Hkv ranks)
    o_proj        row-parallel: the input columns of rank r's q heads, then an all-reduce (its bias added
                  once, after the sum)
    gate_up_proj  column-parallel: rows [r*I/tp, ...) of the gate part and of the up part
    down_proj     row-parallel: the matching input columns, then an all-reduce
    embed_tokens  vocabulary-parallel: rank r embeds the ids in its range [r*V', (r+1)*V') (V' = ceil(V/tp)),
                  zeros elsewhere, then an all-reduce (a sum with one non-zero term: exact)
    lm_head       vocabulary-parallel: rank r's logits for its range, all-gathered into [N, V] on every rank
                  (every rank samples the same token from the same logits, as vLLM's workers do)

Norms, rotary and attention run unchanged on the rank's heads: the model's Attention reads its head
counts from its own attributes, which the transform sets. `model.config` becomes the rank's view
(heads, KV heads, intermediate size per rank; vocabulary whole), so the KV layout built from it is the
rank's slice of the cache. On CPU, linear layers are packed after loading (load_model).
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from serving.models.config import ModelArchConfig


class CollectiveError(RuntimeError):
    """A collective could not complete: a peer rank died, hung past the timeout, or the group broke."""


class ShmCollectives:
    """All-reduce and all-gather of float32 CPU tensors through a shared-memory region the group's ranks
    map (pdkernels/csrc/cpu_shm_collectives.cpp): a copy in, one barrier, a sum or copy out. Gloo over
    loopback costs 1-2 ms per collective on the 2-core box; this costs microseconds. Tensors larger than
    a slot go through the process group instead (every rank decides alike: the same shapes)."""

    DEFAULT_SLOT_BYTES = 8 * 2**20

    def __init__(self, lib, region, rank: int, size: int, slot_bytes: int, timeout_s: float) -> None:
        self.lib, self.region, self.rank, self.size = lib, region, rank, size
        self.slot_bytes, self.timeout_s = slot_bytes, timeout_s
        self._base = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping's address for ctypes
        self._seq = ctypes.c_uint64(0)  # shared with the native decode step's collectives (native())
        if lib.pdserve_shm_init(self._base.data_ptr(), rank, size, slot_bytes, os.getpid()) != 0:
            raise CollectiveError(f"rank {rank}: the shared-memory collectives region does not match this group "
                                  f"(size {size}, slot {slot_bytes} bytes)")

    @staticmethod
    def region_bytes(lib, size: int, slot_bytes: int) -> int:
        return lib.pdserve_shm_header_bytes() + 2 * size * slot_bytes

    def serves(self, x: Tensor) -> bool:
        return x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() * 4 <= self.slot_bytes

    def all_reduce(self, x: Tensor) -> Tensor:
        x = x.contiguous()
        self._seq.value += 1
        self._check(self.lib.pdserve_shm_all_reduce(self._base.data_ptr(), self.rank, self.size, self._seq.value,
                                                    x.data_ptr(), x.numel(), self.timeout_s))
        return x

    def all_gather(self, x: Tensor) -> Tensor:
        """[size, *x.shape]: every rank's x, rank order."""
        x = x.contiguous()
        out = torch.empty((self.size, *x.shape), dtype=x.dtype)
        self._seq.value += 1
        self._check(self.lib.pdserve_shm_all_gather(self._base.data_ptr(), self.rank, self.size, self._seq.value,
                                                    x.data_ptr(), x.numel(), out.data_ptr(), self.timeout_s))
        return out

    def native(self):
        """The same group as the native decode step calls it (pdkernels/cpu_decode_layers.py)."""
        from pdkernels.cpu_decode_layers import NativeCollective
        return NativeCollective(self._base.data_ptr(), self.rank, self.size, self._seq, self.timeout_s)

    def _check(self, status: int) -> None:
        if status == -2:
            raise CollectiveError("a tensor-parallel peer rank's process is gone (shared-memory collective)")
        if status == -3:
            raise CollectiveError(f"a tensor-parallel peer rank did not reach the collective within "
                                  f"{self.timeout_s:.0f} s (collective_timeout_s)")
        if status != 0:
            raise CollectiveError(f"shared-memory collective refused its arguments (status {status})")


class TPGroup:
    """This rank's place in a tensor-parallel group, and the process group its collectives run on
    (gloo on CPU, NCCL on CUDA), created without torch.distributed's global default group. On CPU, with
    `shm`, float32 collectives that fit a slot go through shared memory instead."""

    def __init__(self, rank: int, size: int, process_group, shm: ShmCollectives | None = None) -> None:
        self.rank, self.size, self.process_group, self.shm = rank, size, process_group, shm

    def all_reduce(self, x: Tensor) -> Tensor:
        """x summed over the ranks (in place where x is contiguous)."""
        if self.shm is not None and self.shm.serves(x):
            return self.shm.all_reduce(x)
        self.process_group.allreduce([x]).wait()
        return x

    def all_gather_last_dim(self, x: Tensor) -> Tensor:
        """[..., n] from every rank -> [..., size * n], rank order."""
        x = x.contiguous()
        if self.shm is not None and self.shm.serves(x):
            gathered = self.shm.all_gather(x)                                   # [size, ..., n]
            return gathered.movedim(0, -2).reshape(*x.shape[:-1], self.size * x.shape[-1])
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.process_group.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=-1)


def make_process_group(store, rank: int, size: int, device: torch.device, timeout_s: float):
    """A process group over `store` for `size` ranks: NCCL on CUDA, gloo otherwise. A collective that
    waits longer than timeout_s for a peer (a hung rank) raises; a dead peer raises at once."""
    from torch import distributed as dist
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, options)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def check_tensor_parallel(config: ModelArchConfig, tp: int) -> None:
    """ValueError, saying what to change, for a model that cannot be split over tp ranks."""
    if tp < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {tp}")
    problems = []
    if config.num_heads % tp:
        problems.append(f"num_attention_heads ({config.num_heads}) is not a multiple of it")
    if config.num_kv_heads % tp and tp % config.num_kv_heads:
        problems.append(f"num_key_value_heads ({config.num_kv_heads}) neither divides it nor is a multiple of it")
    if config.intermediate_size % tp:
        problems.append(f"intermediate_size ({config.intermediate_size}) is not a multiple of it")
    if problems:
        divisors = [d for d in range(1, config.num_heads + 1) if config.num_heads % d == 0
                    and (config.num_kv_heads % d == 0 or d % config.num_kv_heads == 0)
                    and config.intermediate_size % d == 0]
        raise ValueError(f"--tensor-parallel-size {tp} cannot split this model: {'; '.join(problems)}. "
                         f"Sizes that can: {', '.join(map(str, divisors))}")


def rank_config(config: ModelArchConfig, tp: int) -> ModelArchConfig:
    """What one rank of tp holds: heads, KV heads and intermediate size per rank (the vocabulary stays
    whole: logits are gathered)."""
    check_tensor_parallel(config, tp)
    return dataclasses.replace(config, num_heads=config.num_heads // tp,
                               num_kv_heads=_kv_slice(config, tp, 0).num_kv_heads,
                               intermediate_size=config.intermediate_size // tp)


def _kv_slice(config: ModelArchConfig, tp: int, rank: int):
    """Rank `rank`'s KV heads by the KV cache layout's own rule (kvcache/layout.py: Hkv/tp each, or one
    replicated on tp/Hkv ranks), so the weights a rank holds and the cache it writes cannot disagree."""
    from kvcache.layout import KVCacheLayout
    return KVCacheLayout.for_model(1, config.num_kv_heads, config.head_dim, 1, "float32", tp, rank)


class RowParallelLinear(nn.Module):
    """A linear layer over this rank's slice of the input features, summed over the ranks; the bias is
    added once, after the sum."""

    def __init__(self, linear: nn.Linear, bias: Tensor | None, group: TPGroup) -> None:
        super().__init__()
        self.linear = linear  # no bias; pack_linears may swap it for a PackedLinear
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        out = self.group.all_reduce(self.linear(x))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: Tensor, start: int, end: int, group: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [end - start, H]
        self.start, self.end, self.group = start, end, group

    def forward(self, ids: Tensor) -> Tensor:
        mine = (ids >= self.start) & (ids < self.end)
        out = F.embedding(torch.where(mine, ids - self.start, 0), self.weight)
        out = out * mine.unsqueeze(-1).to(out.dtype)
        return self.group.all_reduce(out.contiguous())


class ParallelLMHead(nn.Module):
    def __init__(self, linear: nn.Linear, vocab_size: int, group: TPGroup) -> None:
        super().__init__()
        self.linear = linear  # [V' rows (padded with zeros past the vocabulary), H]
        self.vocab_size, self.group = vocab_size, group

    def forward(self, x: Tensor) -> Tensor:
        return self.group.all_gather_last_dim(self.linear(x))[..., :self.vocab_size]


@dataclasses.dataclass(frozen=True)
class RankShard:
    """Which part of each whole-model weight rank `rank` of `size` holds (rows of the fused projections
    in the checkpoint's coordinates, columns of the row-parallel ones, its vocabulary range)."""
    rank: int
    size: int
    q: slice         # rows of q_proj (its query heads)
    kv: slice        # rows of k_proj and of v_proj (the KV heads they read)
    inter: slice     # rows of gate_proj and up_proj, columns of down_proj
    vocab: slice     # rows of embed_tokens and lm_head
    vocab_rows: int  # rows every rank's LM head has (the last range is padded with zeros to it)

    @classmethod
    def of(cls, config: ModelArchConfig, rank: int, size: int) -> RankShard:
        local = rank_config(config, size)
        d = config.head_dim
        first_kv, last_kv = _kv_slice(config, size, rank).kv_head_range()
        per_rank = -(-config.vocab_size // size)
        start, end = min(config.vocab_size, rank * per_rank), min(config.vocab_size, (rank + 1) * per_rank)
        return cls(rank, size, slice(rank * local.num_heads * d, (rank + 1) * local.num_heads * d),
                   slice(first_kv * d, last_kv * d),
                   slice(rank * local.intermediate_size, (rank + 1) * local.intermediate_size),
                   slice(start, end), per_rank)


def shard_structure(model: nn.Module, group: TPGroup) -> None:
    """Before the weights are loaded (on the meta device, say): give a whole-model CausalLM the modules
    and shapes of rank group.rank's shard; `load_shard` then fills them from the checkpoint, each rank
    reading only its part. Raises ValueError for a model that cannot be split over group.size ranks."""
    config: ModelArchConfig = model.config
    local = rank_config(config, group.size)
    shard = RankShard.of(config, group.rank, group.size)
    d, hidden = config.head_dim, config.hidden_size
    hq, hkv, inter = local.num_heads, local.num_kv_heads, local.intermediate_size

    def linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
        return nn.Linear(in_features, out_features, bias=bias, device="meta")

    def parameter(*shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)

    for layer in model.layers:
        if not hasattr(layer, "self_attn"):
            continue  # another pipeline stage's layer
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = linear(hidden, (hq + 2 * hkv) * d, attn.qkv_proj.bias is not None)
        attn.o_proj = RowParallelLinear(linear(hq * d, hidden, False),
                                        None if attn.o_proj.bias is None else parameter(hidden), group)
        attn.num_heads, attn.num_kv_heads, attn.q_size, attn.kv_size = hq, hkv, hq * d, hkv * d
        mlp.gate_up_proj = linear(hidden, 2 * inter, mlp.gate_up_proj.bias is not None)
        mlp.down_proj = RowParallelLinear(linear(inter, hidden, False),
                                          None if mlp.down_proj.bias is None else parameter(hidden), group)
        mlp.intermediate_size = inter
    model.embed_tokens = VocabParallelEmbedding(parameter(shard.vocab.stop - shard.vocab.start, hidden),
                                                shard.vocab.start, shard.vocab.stop, group)
    model.lm_head = ParallelLMHead(linear(hidden, shard.vocab_rows, False), config.vocab_size, group)
    model.full_config = config  # the whole model's (the KV layout's rank slice is taken from it)
    model.config = local
    model.tensor_parallel = group
    model.rank_shard = shard


def shard_target(hf_name: str, tensor: Tensor, full: ModelArchConfig, shard: RankShard) -> list[tuple[str, int, Tensor]]:
    """Where a checkpoint tensor's part goes in a rank's model: [(parameter name, first row, the part)]
    (several for a tied embedding, which is the LM head too); [] for tensors that are skipped."""
    from serving.models.loader import hf_weight_target
    target = hf_weight_target(hf_name, full)
    if target is None:
        return []
    name = target.param_name
    if ".qkv_proj." in name:
        rows = shard.q if target.shard_id == 0 else shard.kv
        q_rows, kv_rows = shard.q.stop - shard.q.start, shard.kv.stop - shard.kv.start
        offset = (0, q_rows, q_rows + kv_rows)[target.shard_id]
        return [(name, offset, tensor[rows])]
    if ".gate_up_proj." in name:
        return [(name, target.shard_id * (shard.inter.stop - shard.inter.start), tensor[shard.inter])]
    if name.endswith(".o_proj.weight"):
        return [(name.replace(".o_proj.weight", ".o_proj.linear.weight"), 0, tensor[:, shard.q])]
    if name.endswith(".down_proj.weight"):
        return [(name.replace(".down_proj.weight", ".down_proj.linear.weight"), 0, tensor[:, shard.inter])]
    if name in ("embed_tokens.weight", "lm_head.weight"):
        rows = tensor[shard.vocab]
        head = [("lm_head.linear.weight", 0, rows)]
        if name == "lm_head.weight":
            return head
        return [("embed_tokens.weight", 0, rows)] + (head if full.tie_word_embeddings else [])
    return [(name, 0, tensor)]  # norms, the row-parallel biases (added once, whole)


def load_shard(model: nn.Module, weights) -> None:
    """Fill a model shaped by shard_structure (its tensors allocated) from HF-named checkpoint tensors,
    copying only this rank's part of each; every parameter must be filled (the LM head's padding rows
    past the vocabulary are zeroed)."""
    full: ModelArchConfig = model.full_config
    shard: RankShard = model.rank_shard
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}
    for hf_name, tensor in weights:
        for name, first_row, part in shard_target(hf_name, tensor, full, shard):
            stage = getattr(model, "pipeline_stage", None)
            if name not in params and stage is not None and not stage.holds(name):
                continue  # another pipeline stage's (a tied head's rows come as lm_head too)
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in a {full.architecture} model with "
                                 "this config.json: the checkpoint and config disagree")
            dest = params[name].data
            dest = dest[first_row:first_row + part.shape[0]] if dest.dim() and part.dim() else dest
            if tuple(dest.shape) != tuple(part.shape):
                raise ValueError(f"checkpoint tensor {hf_name!r} gives rank {shard.rank} a part of shape "
                                 f"{tuple(part.shape)} where the model expects {tuple(dest.shape)}")
            dest.copy_(part)
            filled[name] = filled.get(name, 0) + part.shape[0]
    expected = {name: p.shape[0] for name, p in params.items()}
    if "lm_head.linear.weight" in params:  # (a pipeline stage before the last has no head)
        params["lm_head.linear.weight"].data[shard.vocab.stop - shard.vocab.start:].zero_()
        expected["lm_head.linear.weight"] = shard.vocab.stop - shard.vocab.start  # the rest is padding
    missing = [name for name, rows in expected.items() if filled.get(name, 0) != rows]
    if missing:
        raise ValueError(f"checkpoint is missing weights for {len(missing)} parameters of rank {shard.rank}, e.g. "
                         f"{missing[:5]}; is the model directory complete?")
