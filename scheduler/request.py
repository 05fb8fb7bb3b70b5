"""`Request`: the one object that flows through pdserve. Only the scheduler mutates it."""
from __future__ import annotations

import enum

from scheduler.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    RUNNING = "running"
    PREEMPTED = "preempted"
    SWAPPED = "swapped"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"
    # prefill instance: the prompt is done and its first token sampled; decode continues elsewhere
    FINISHED_REMOTE_DECODE = "finished_remote_decode"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISHED = frozenset(s for s in RequestStatus if s.value.startswith("finished"))
_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                   RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_ERROR: "error",
                   RequestStatus.FINISHED_REMOTE_DECODE: "remote_decode"}


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_ids: tuple[int, ...] = (), max_model_len: int | None = None,
                 client_id: str = "", arrival_time: float | None = None, priority: int = 0,
                 kv_peer: str | None = None, remote_prefill: bool = False) -> None:
        """arrival_time: on the scheduler's clock; None: the scheduler stamps it when added."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: send at least one token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self._num_prompt_tokens = len(self.prompt_token_ids)  # the prompt never changes
        self.sampling_params = sampling_params
        self.eos_token_ids = tuple(eos_token_ids)
        self.client_id = client_id  # whom the request serves (the OpenAI `user` field): fairness keys on it
        self.priority = priority  # lower runs first under --scheduling-policy priority
        self.arrival_time = arrival_time
        self.output_token_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.error: str | None = None  # why it finished with FINISHED_ERROR
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (or scheduled to be this step)
        self.num_cached_tokens = -1  # prompt tokens served by the prefix cache; -1 until first scheduled
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        # disaggregation: a prefill instance sends this request's prompt KV to `kv_peer` and stops
        # after the first token; a decode instance receives it (`remote_prefill`) instead of computing
        # it. The connector policy of the instance's role owns what happens to such a request.
        self.kv_peer = kv_peer
        self.remote_prefill = remote_prefill
        self.kv_transfer: str | None = None  # remote prefill: "transferred", or "recomputed: <why>"
        self._token_view = _TokenView(self)
        # the output may not run past the context window
        bounds = [b for b in (sampling_params.max_tokens,
                              max_model_len - len(prompt_token_ids) if max_model_len else None)
                  if b is not None]
        self.max_tokens = min(bounds) if bounds else 2**31

    @property
    def num_prompt_tokens(self) -> int:
        return self._num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return self._num_prompt_tokens + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def token_view(self) -> "_TokenView":
        """All token ids as a read-only sequence, without concatenating lists."""
        return self._token_view

    @property
    def is_finished(self) -> bool:
        return self.status in _FINISHED

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
                f"output={len(self.output_token_ids)}, computed={self.num_computed_tokens})")


class _TokenView:
    def __init__(self, request: Request) -> None:
        self._request = request

    def __len__(self) -> int:
        return self._request.num_tokens

    def __getitem__(self, index: slice) -> list[int]:
        start, stop, _ = index.indices(len(self))
        return self._request.token_ids_slice(start, stop)
