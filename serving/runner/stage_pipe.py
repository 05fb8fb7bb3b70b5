"""Between adjacent pipeline stages: the hidden state and the residual [T, H] of each plan, from a rank
of stage s to the rank of the same tensor-parallel index in stage s + 1, point to point over the
group's process group (gloo on CPU, NCCL on CUDA).

Sends do not wait for the receiver: the stage goes on to its part of the next plan while the next
stage still computes the previous one (that overlap is what pipelining is for). A send's buffer is
kept until the following send, when the earlier one is waited for, so at most one is outstanding.
"""
from __future__ import annotations

import torch
from torch import Tensor


class StagePipe:
    def __init__(self, process_group, prev_rank: int | None, next_rank: int | None, hidden_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.process_group = process_group
        self.prev_rank, self.next_rank = prev_rank, next_rank
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self._outstanding = None  # (work, buffer) of the last send

    def send(self, hidden: Tensor, residual: Tensor) -> None:
        """Hand (hidden, residual) [T, H] to the next stage; returns without waiting for it."""
        self.wait_sent()
        buffer = torch.stack([hidden, residual])                                 # [2, T, H]
        self._outstanding = (self.process_group.send([buffer], self.next_rank, 0), buffer)

    def wait_sent(self) -> None:
        if self._outstanding is not None:
            work, _ = self._outstanding
            self._outstanding = None
            work.wait()

    def recv(self, num_tokens: int) -> tuple[Tensor, Tensor]:
        """(hidden, residual) [T, H] of the plan's T tokens from the previous stage."""
        buffer = torch.empty(2, num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
        self.process_group.recv([buffer], self.prev_rank, 0).wait()
        return buffer[0], buffer[1]
