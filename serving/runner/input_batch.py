"""Per-request runner state and the tensors of one step.

For a step with requests A (prefill chunk of 3 tokens from position 4) and B (one decode token at
position 9), block_size 4:

    input_ids        [a4 a5 a6 | b9]
    positions        [ 4  5  6 |  9]
    query_start_loc  [0, 3, 4]
    seq_lens         [7, 10]                   (context incl. this step's tokens)
    slot_mapping     [A.blocks[1]*4+0, +1, +2 | B.blocks[2]*4+1]
    logits_indices   [2, 3] if A's chunk ends its prompt, else [3]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from scheduler.sampling_params import SamplingParams


@dataclass
class RunnerRequestState:
    request_id: str
    token_ids: list[int]  # prompt + outputs
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class AttentionMetadata:
    slot_mapping: Tensor  # [T] int64
    block_tables: Tensor  # [B, max_blocks] int32
    seq_lens: Tensor  # [B] int32
    query_start_loc: Tensor  # [B+1] int32
    max_query_len: int
    max_seq_len: int


@dataclass
class StepInputs:
    input_ids: Tensor  # [T] int64
    positions: Tensor  # [T] int64
    attn: AttentionMetadata
    logits_indices: Tensor  # [S] rows of the hidden states whose logits are sampled
    sample_request_ids: list[str]  # the S requests that sample a token this step


def build_step_inputs(states: list[RunnerRequestState], num_tokens: list[int], block_size: int,
                      device: torch.device) -> StepInputs:
    """Flatten the scheduled tokens of `states` (in batch order) into one step's tensors."""
    num_sched = np.asarray(num_tokens, dtype=np.int64)                      # [B]
    num_computed = np.asarray([s.num_computed_tokens for s in states], dtype=np.int64)
    ends = np.cumsum(num_sched)                                             # [B]
    starts = ends - num_sched
    total = int(ends[-1])
    # position of every scheduled token: its offset in the request's chunk + the request's start
    positions = np.arange(total) - np.repeat(starts - num_computed, num_sched)   # [T]
    seq_lens = num_computed + num_sched
    max_blocks = max(len(s.block_ids) for s in states)
    block_tables = np.zeros((len(states), max_blocks), dtype=np.int64)      # [B, max_blocks]
    input_ids: list[int] = []
    for i, state in enumerate(states):
        block_tables[i, :len(state.block_ids)] = state.block_ids
        input_ids.extend(state.token_ids[num_computed[i]:seq_lens[i]])
    request_index = np.repeat(np.arange(len(states)), num_sched)            # [T]
    slot_mapping = block_tables[request_index, positions // block_size] * block_size + positions % block_size
    # a request samples when this step reaches the end of its known tokens
    samples = [i for i, s in enumerate(states) if seq_lens[i] >= len(s.token_ids)]
    query_start_loc = np.concatenate([[0], ends])

    def t(array, dtype):
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)

    attn = AttentionMetadata(
        slot_mapping=t(slot_mapping, torch.int64), block_tables=t(block_tables, torch.int32),
        seq_lens=t(seq_lens, torch.int32), query_start_loc=t(query_start_loc, torch.int32),
        max_query_len=int(num_sched.max()), max_seq_len=int(seq_lens.max()))
    return StepInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
        positions=t(positions, torch.int64), attn=attn,
        logits_indices=t(ends[samples] - 1, torch.int64),
        sample_request_ids=[states[i].request_id for i in samples])
