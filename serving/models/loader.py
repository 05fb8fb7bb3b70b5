"""Build a CausalLM from a local Hugging Face directory and load its safetensors weights.

The checkpoint keeps transformers' layout (separate q/k/v and gate/up projections, `model.` prefix);
the model has fused qkv_proj / gate_up_proj. `hf_weight_target` is the load hook that maps each
checkpoint tensor onto a row range of a model parameter, as vLLM's stacked-params mapping does:

    qkv_proj.weight  [q_size + 2 kv_size, H]      gate_up_proj.weight [2 I, H]
    rows 0 .. q_size          <- q_proj          rows 0 .. I    <- gate_proj
    rows q_size .. +kv_size   <- k_proj          rows I .. 2I   <- up_proj
    rows .. +kv_size          <- v_proj

Tensors are read memory-mapped with safetensors.torch and converted to the target dtype on copy, so no
full copy of the checkpoint is ever held in memory; transformers is not imported.

On CPU the loaded model then gets its linear layers' weights packed for oneDNN
(serving.models.cpu_linear): the last load hook, after every weight is in place.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import Tensor

from serving.models.causal_lm import CausalLM
from serving.models.config import ModelArchConfig
from serving.models.cpu_linear import pack_linears, packing_supported

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tensors some checkpoints carry that the model recomputes (RoPE tables of old Llama exports).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightTarget(NamedTuple):
    param_name: str
    shard_id: int  # which fused part (0 for an unfused parameter)
    row_start: int
    row_end: int | None  # None: the whole parameter


def load_model(model_dir: str, dtype: torch.dtype, device: torch.device, tensor_parallel=None,
               pipeline_stage=None) -> CausalLM:
    """A CausalLM in eval mode on `device` with the checkpoint's weights in `dtype`; on CPU in float32
    its nn.Linear layers are PackedLinear (same parameters, weights also packed for oneDNN).
    tensor_parallel: a TPGroup (serving/models/tensor_parallel.py) of more than one rank: the model is
    built in this rank's shapes and each checkpoint tensor (memory-mapped) gives it only its part, so a
    rank never holds more than its shard. pipeline_stage: a PipelineStage (serving/models/pipeline.py)
    of more than one: only its layers (and the embedding or the head, first or last) are built."""
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; use one of {_SUPPORTED_DTYPES} "
                         "(float32 on CPU, bfloat16/float16 on CUDA)")
    config = ModelArchConfig.from_model_dir(model_dir)
    # Build on the meta device so no memory is allocated or randomly initialised twice.
    with torch.device("meta"):
        model = CausalLM(config)
    sharded = tensor_parallel is not None and tensor_parallel.size > 1
    if sharded:  # this rank's modules and shapes, still on meta: only its part is ever allocated
        from serving.models.tensor_parallel import shard_structure
        shard_structure(model, tensor_parallel)
    if pipeline_stage is not None and pipeline_stage.size > 1:
        from serving.models.pipeline import prune_to_stage
        prune_to_stage(model, pipeline_stage)
    model = model.to(dtype).to_empty(device=torch.device(device))
    model.reset_cos_sin_cache()
    if sharded:
        from serving.models.tensor_parallel import load_shard
        load_shard(model, iter_safetensors(model_dir))
    else:
        model.tie_weights()
        load_weights(model, iter_safetensors(model_dir))
    model = model.eval().requires_grad_(False)
    if packing_supported(device, dtype):
        pack_linears(model)
    return model


def load_weights(model: CausalLM, weights: Iterator[tuple[str, Tensor]]) -> None:
    """Copy HF-named tensors into the model's (fused) parameters; every parameter must be filled."""
    config = model.config
    params = dict(model.named_parameters())
    loaded: set[tuple[str, int]] = set()
    for hf_name, tensor in weights:
        target = hf_weight_target(hf_name, config)
        if target is None:
            continue
        if target.param_name not in params and _held_elsewhere(model, target.param_name):
            if not (target.param_name == "embed_tokens.weight" and config.tie_word_embeddings
                    and "lm_head.weight" in params):
                continue
            target = WeightTarget("lm_head.weight", 0, 0, None)  # a last stage's copy of a tied embedding
        if target.param_name not in params:
            raise ValueError(f"checkpoint tensor {hf_name!r} has no place in a {config.architecture} "
                             "model with this config.json: the checkpoint and config disagree")
        dest = params[target.param_name].data
        if target.row_end is not None:
            dest = dest[target.row_start:target.row_end]
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, the model "
                             f"expects {tuple(dest.shape)} from config.json")
        dest.copy_(tensor)
        loaded.add((target.param_name, target.shard_id))
    missing = [f"{name}[{shard}]" for name, shard in _expected_shards(model) if (name, shard) not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing weights for {len(missing)} parameter parts, e.g. "
                         f"{missing[:5]}; is the model directory complete?")


def _held_elsewhere(model, param_name: str) -> bool:
    """The parameter belongs to another pipeline stage (its checkpoint tensor is skipped here)."""
    stage = getattr(model, "pipeline_stage", None)
    return stage is not None and not stage.holds(param_name)


def hf_weight_target(hf_name: str, config: ModelArchConfig) -> WeightTarget | None:
    """Where a transformers checkpoint tensor goes in CausalLM; None for tensors to skip."""
    if hf_name.endswith(_IGNORED_SUFFIXES):
        return None
    if hf_name == "lm_head.weight" and config.tie_word_embeddings:
        return None  # some tied checkpoints store the copy too; the embedding is the one used
    name = hf_name.removeprefix("model.")
    for hf_proj, fused, shard_id, row_start, row_end in _fused_parts(config):
        if f".{hf_proj}." in name:
            return WeightTarget(name.replace(f".{hf_proj}.", f".{fused}."), shard_id, row_start, row_end)
    return WeightTarget(name, 0, 0, None)


def _fused_parts(config: ModelArchConfig) -> list[tuple[str, str, int, int, int]]:
    """(HF projection, fused parameter, shard id, first row, end row) for each fused part."""
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    return [
        ("q_proj", "qkv_proj", 0, 0, q),
        ("k_proj", "qkv_proj", 1, q, q + kv),
        ("v_proj", "qkv_proj", 2, q + kv, q + 2 * kv),
        ("gate_proj", "gate_up_proj", 0, 0, inter),
        ("up_proj", "gate_up_proj", 1, inter, 2 * inter),
    ]


def _expected_shards(model: CausalLM) -> Iterator[tuple[str, int]]:
    for name, _ in model.named_parameters():  # a tied lm_head is listed once, as embed_tokens
        num_shards = 3 if ".qkv_proj." in name else 2 if ".gate_up_proj." in name else 1
        for shard_id in range(num_shards):
            yield name, shard_id


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint files: the shards named by model.safetensors.index.json, else *.safetensors."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            file_names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        file_names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not file_names:
        raise ValueError(f"no *.safetensors weights in {model_dir}: convert the checkpoint to safetensors "
                         "(e.g. save_pretrained(..., safe_serialization=True))")
    return [os.path.join(model_dir, n) for n in file_names]


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, memory-mapped, in file order."""
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
