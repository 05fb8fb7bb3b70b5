"""What crosses the engine process boundary, and how it is encoded.

    API process                                   engine process
    EngineProcess ── PUSH ──► ipc://…/in ── PULL ──► input thread ──► busy loop (schedule, compute)
                  ◄─ PULL ── ipc://…/out ◄─ PUSH ─────────────────────┘

Requests go in, `EngineCoreOutput`s come out, one OUTPUTS message per step with every output of
that step (StepPlan/StepResult stay inside the engine process). Every message is one msgpack array
whose first item is its kind:

    in   ADD      request_id, prompt_token_ids, SamplingParams fields, request kwargs
         ABORT    call_id | nil, request_ids, RequestStatus value, stop_reason
         CALL     call_id, cloudpickle of fn(engine)           (tests, admin, SetFirstToken)
         CANCEL   call_id                                      (its caller gave up: skip it)
         SHUTDOWN
    out  READY    EngineInfo fields                            (once, after the engine is built)
         STARTUP_ERROR  pickled exception, its message         (then the process exits)
         OUTPUTS  [EngineCoreOutput as an array, ...], EngineStats fields | nil
         REPLY    call_id, ok, pickled result or exception
         ADD_FAILED  request_id, pickled exception             (e.g. RequestRejectedError)
         DEAD     reason                                       (the loop died; the process exits)

Outputs are arrays of ints and strings, not pickles: a batch-64 decode step is ~3 KB and decodes in
well under a millisecond (docs/benchmarks.md, "Engine process"). Received frames are read in place
(`copy=False`).
"""
from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from typing import Any

import cloudpickle
import msgpack

from scheduler.engine_core import EngineCoreOutput
from scheduler.request import RequestStatus
from scheduler.sampling_params import SamplingParams
from serving.engine.protocol import EngineStats, TokenLogprob

ADD, ABORT, CALL, CANCEL, SHUTDOWN = range(5)
READY, STARTUP_ERROR, OUTPUTS, REPLY, ADD_FAILED, DEAD = range(10, 16)

_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(EngineStats))


@dataclass(frozen=True)
class EngineInfo:
    """The facts about a built engine that the API process and an instance's Info RPC need."""
    model_dir: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    num_blocks: int
    block_size: int
    kv_layout: bytes  # KVLayout proto (what KV peers must agree on)
    kv_address: str = ""  # a decode role's KVTransfer address
    pid: int = 0  # the process that computes

    def to_list(self) -> list:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    @classmethod
    def from_list(cls, values: list) -> "EngineInfo":
        info = cls(*values)
        return dataclasses.replace(info, eos_token_ids=tuple(info.eos_token_ids))

    @classmethod
    def of(cls, engine, pid: int) -> "EngineInfo":
        return cls(engine.model_dir, engine.max_model_len, engine.vocab_size, tuple(engine.eos_token_ids),
                   engine.kv.pool.num_blocks, engine.kv.block_size, engine.kv_layout.to_proto().SerializeToString(),
                   getattr(engine.connector, "address", ""), pid)


def pack(message: list) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(buffer) -> list:
    return msgpack.unpackb(buffer, raw=False, use_list=True, strict_map_key=False)


# ---- requests in ----
def add_message(request_id: str, prompt_token_ids: list[int], params: SamplingParams, kwargs: dict) -> bytes:
    return pack([ADD, request_id, prompt_token_ids, [getattr(params, name) for name in _PARAM_FIELDS], kwargs])


def decode_params(values: list) -> SamplingParams:
    return SamplingParams(**dict(zip(_PARAM_FIELDS, values)))


def abort_message(call_id: int | None, request_ids: list[str], status: RequestStatus,
                  stop_reason: int | str | None) -> bytes:
    return pack([ABORT, call_id, request_ids, status.value, stop_reason])


def call_message(call_id: int, fn) -> bytes:
    return pack([CALL, call_id, cloudpickle.dumps(fn)])


# ---- outputs ----
def encode_output(o: EngineCoreOutput) -> list:
    logprobs = None if o.new_logprobs is None else [
        None if lp is None else [lp.token_id, lp.logprob, lp.top] for lp in o.new_logprobs]
    return [o.request_id, o.new_token_ids, logprobs, o.finished, o.finish_reason, o.stop_reason,
            o.num_prompt_tokens, o.num_output_tokens, o.num_cached_tokens, o.error, o.queue_time_s,
            o.accepted, o.kv_transfer]


def decode_output(values: list) -> EngineCoreOutput:
    output = EngineCoreOutput(*values)
    if output.new_logprobs is not None:
        output.new_logprobs = [None if lp is None else TokenLogprob(lp[0], lp[1], [tuple(t) for t in lp[2]])
                               for lp in output.new_logprobs]
    return output


def outputs_message(outputs: list[EngineCoreOutput], stats: EngineStats | None) -> bytes:
    return pack([OUTPUTS, [encode_output(o) for o in outputs],
                 None if stats is None else [getattr(stats, name) for name in _STATS_FIELDS]])


def decode_stats(values: list) -> EngineStats:
    return EngineStats(**dict(zip(_STATS_FIELDS, values)))


# ---- exceptions and results (pickled: rare, and their types must survive the trip) ----
def dump_exception(error: BaseException) -> bytes:
    """The exception itself when it pickles and unpickles, else a RuntimeError with its text."""
    try:
        data = cloudpickle.dumps(error)
        pickle.loads(data)
        return data
    except Exception:  # noqa: BLE001 - an exception type that does not survive the trip
        return cloudpickle.dumps(RuntimeError(f"{type(error).__name__}: {error}"))


def load_exception(data: bytes) -> BaseException:
    try:
        error = pickle.loads(data)
    except Exception as e:  # noqa: BLE001 - e.g. a type this process cannot import
        return RuntimeError(f"an error from the engine process that cannot be read here ({e})")
    return error if isinstance(error, BaseException) else RuntimeError(repr(error))


def dump_result(result: Any) -> bytes:
    return cloudpickle.dumps(result)
