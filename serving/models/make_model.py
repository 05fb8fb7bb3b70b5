"""`pdserve make-model`: write a deterministic random-weight Llama model in standard HF format.

The directory (config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) loads in pdserve, transformers and vLLM alike, so tests and benchmarks need no
model hub. The same size and seed give the same bytes in every file on every run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from serving.models import make_tokenizer as tok
from serving.models.corpus import build_corpus


@dataclass(frozen=True)
class ModelSize:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float
    # Tokenizer corpus: enough lines and distinct rare words for BPE to reach vocab_size.
    num_corpus_lines: int
    num_rare_words: int

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        # vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, ...
        if self.head_dim < 32 or self.head_dim % 16 != 0:
            raise ValueError(f"head_dim must be a multiple of 16 and >= 32, got {self.head_dim}")

    @property
    def num_params(self) -> int:
        hidden = self.hidden_size
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = hidden * (2 * q_size + 2 * kv_size) + 3 * hidden * self.intermediate_size + 2 * hidden
        return 2 * self.vocab_size * hidden + self.num_layers * per_layer + hidden


MODEL_SIZES = {
    # Seconds to build; for tests everywhere. Four layers so layer ranges and layer groups are non-trivial.
    "tiny": ModelSize(vocab_size=2048, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=2048, rope_theta=10000.0,
                      num_corpus_lines=6000, num_rare_words=800),
    # ~125M parameters (~0.5 GB float32): CPU benchmarks where compute, not Python, dominates.
    "small": ModelSize(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
                       num_heads=12, num_kv_heads=4, head_dim=64, max_position_embeddings=8192,
                       rope_theta=500000.0, num_corpus_lines=100000, num_rare_words=30000),
}
RMS_NORM_EPS = 1e-5
# Logit scale: lm_head std = LM_HEAD_GAIN / sqrt(hidden) on the unit-RMS final hidden state gives
# logits of std ~LM_HEAD_GAIN (see init_weights).
LM_HEAD_GAIN = 8.0


def make_model(size: str, out_dir: str, seed: int = 0, overwrite: bool = False) -> str:
    """Build the `size` model into out_dir and return out_dir.

    Built in a temporary sibling directory and renamed into place, so out_dir is either absent or
    complete. out_dir may be an existing empty directory; a non-empty one is replaced only when
    overwrite is set.
    """
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --force to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        os.chmod(tmp_dir, 0o755)
        write_model_files(MODEL_SIZES[size], tmp_dir, seed)
        if overwrite and os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp_dir, out_dir)  # fails if another builder filled out_dir meanwhile
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def write_model_files(spec: ModelSize, out_dir: str, seed: int) -> None:
    with tqdm(total=spec.num_params, unit="param", unit_scale=True, desc="make-model",
              disable=spec.num_params < 10_000_000) as progress:
        progress.set_description("make-model: training tokenizer")
        tokenizer = tok.train_tokenizer(build_corpus(spec.num_corpus_lines, spec.num_rare_words),
                                        spec.vocab_size)
        tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
        _write_json(os.path.join(out_dir, "tokenizer_config.json"),
                    tok.tokenizer_config(tokenizer, spec.max_position_embeddings))
        special_ids = tok.special_token_ids(tokenizer)
        hf_config, generation_config = hf_configs(spec, special_ids)
        _write_json(os.path.join(out_dir, "config.json"), hf_config)
        _write_json(os.path.join(out_dir, "generation_config.json"), generation_config)
        progress.set_description("make-model: weights")
        weights = init_weights(spec, seed, on_tensor=lambda t: progress.update(t.numel()))
        save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(out_dir):  # safetensors writes 0600; a shared model cache wants 0644
        os.chmod(os.path.join(out_dir, name), 0o644)


def hf_configs(spec: ModelSize, special_ids: dict[str, int]) -> tuple[dict, dict]:
    """(config.json, generation_config.json) in the transformers 4.x layout every loader reads."""
    bos_id, pad_id = special_ids[tok.BOS_TOKEN], special_ids[tok.PAD_TOKEN]
    # Plain completions end at <|end_of_text|>, chat turns at <|eot_id|>: both stop generation.
    eos_ids = [special_ids[tok.END_OF_TEXT_TOKEN], special_ids[tok.EOT_TOKEN]]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    generation_config = {"bos_token_id": bos_id, "eos_token_id": eos_ids, "pad_token_id": pad_id}
    return config, generation_config


def init_weights(spec: ModelSize, seed: int, on_tensor=lambda tensor: None) -> dict[str, torch.Tensor]:
    """HF-named float32 weights, drawn in a fixed order from one generator seeded with `seed`.

    Why not HF's std 0.02: its logits are nearly flat, so greedy argmax in two implementations flips
    on float rounding and correctness tests become flaky. Instead the residual stream is dominated by
    O(1) token embeddings (std 1), every projection keeps unit scale (std 1/sqrt(fan_in), norms at 1)
    so attention scores are O(1) and the context matters, and the LM head multiplies the unit-RMS
    final state into logits of std ~LM_HEAD_GAIN: the top-1/top-2 gap is then typically ~1, far above
    rounding noise (~1e-5 in float32), while the next token still depends on the prompt.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = spec.hidden_size, spec.intermediate_size
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = [("model.embed_tokens.weight", (spec.vocab_size, hidden), 1.0)]
    for i in range(spec.num_layers):
        prefix = f"model.layers.{i}"
        shapes += [
            (f"{prefix}.input_layernorm.weight", (hidden,), None),
            (f"{prefix}.self_attn.q_proj.weight", (q_size, hidden), hidden ** -0.5),
            (f"{prefix}.self_attn.k_proj.weight", (kv_size, hidden), hidden ** -0.5),
            (f"{prefix}.self_attn.v_proj.weight", (kv_size, hidden), hidden ** -0.5),
            (f"{prefix}.self_attn.o_proj.weight", (hidden, q_size), q_size ** -0.5),
            (f"{prefix}.post_attention_layernorm.weight", (hidden,), None),
            (f"{prefix}.mlp.gate_proj.weight", (inter, hidden), hidden ** -0.5),
            (f"{prefix}.mlp.up_proj.weight", (inter, hidden), hidden ** -0.5),
            (f"{prefix}.mlp.down_proj.weight", (hidden, inter), inter ** -0.5),
        ]
    shapes += [("model.norm.weight", (hidden,), None),
               ("lm_head.weight", (spec.vocab_size, hidden), LM_HEAD_GAIN / math.sqrt(hidden))]
    weights = {}
    for name, shape, std in shapes:
        tensor = torch.ones(shape) if std is None else torch.randn(shape, generator=gen) * std
        weights[name] = tensor
        on_tensor(tensor)
    return weights


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve make-model", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default="tiny")
    parser.add_argument("--out", required=True, help="directory to create")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (the tokenizer never changes)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        out_dir = make_model(args.size, args.out, seed=args.seed, overwrite=args.force)
    except FileExistsError as exc:
        parser.exit(2, f"pdserve make-model: {exc}\n")
    spec = MODEL_SIZES[args.size]
    print(f"wrote {args.size} model ({spec.num_params / 1e6:.1f}M parameters, "
          f"{spec.vocab_size} tokens) to {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
