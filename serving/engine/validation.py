"""Checks an engine makes of what it is given: requests on admission, its own KV pool at start.

Each raises with a message that says what to change. They are plain functions of numbers so that
every place that must refuse the same thing (the engine core, the API layer before anything is sent
to an instance, the CLI before instances start) refuses it with the same words.
"""
from __future__ import annotations

from serving.engine.protocol import RequestRejectedError


def check_stop_token_ids(stop_token_ids: list[int], vocab_size: int) -> None:
    """RequestRejectedError (a 400) unless every stop token id is in [0, vocab_size).

    An id outside the vocabulary can never be sampled, so the stop would never happen; and on the
    wire to an instance (uint32) a negative or huge id does not even serialise."""
    bad = [t for t in stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestRejectedError(f"stop_token_ids contains {bad[0]}, which is outside the vocabulary "
                                   f"(valid ids are 0..{vocab_size - 1}); remove it")


def check_kv_pool_fits(num_blocks: int, block_size: int, max_model_len: int) -> None:
    """ValueError unless the KV pool can hold one sequence of max_model_len tokens.

    A smaller pool would start, then reject (or preempt forever) every request near the context
    length; vLLM refuses to start in the same case."""
    num_pool_tokens = num_blocks * block_size
    if num_pool_tokens < max_model_len:
        raise ValueError(
            f"the model's max seq len ({max_model_len}) is larger than the number of tokens the KV cache "
            f"can hold ({num_pool_tokens}: {num_blocks} blocks of {block_size} tokens); raise "
            f"--kv-cache-memory-bytes or --num-gpu-blocks-override, or lower --max-model-len to at most "
            f"{num_pool_tokens}")
