"""Input checks shared by the torch and Triton paths; errors say what to change."""

from torch import Tensor


def check_attention_inputs(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> int:
    """Validate q [.., Hq, D] against caches [num_blocks, block_size, Hkv, D]; returns Hq // Hkv."""
    num_q_heads, head_dim = q.shape[-2], q.shape[-1]
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
                         f"[num_blocks, block_size, Hkv, {head_dim}] (head_dim of q)")
    num_kv_heads = k_cache.shape[2]
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"number of query heads {num_q_heads} must be a multiple of KV heads {num_kv_heads}")
    return num_q_heads // num_kv_heads
