"""Conversions between the engine's types and the instance-control messages (proto/instance.proto).

Each pair round-trips exactly: `params_from_proto(params_to_proto(p)) == p` for n == 1, and an
instance's EngineCoreOutput comes back field for field (instances send token ids; the router
detokenizes).
"""
from __future__ import annotations

from scheduler.engine_core import EngineCoreOutput
from scheduler.sampling_params import SamplingParams
from serving.instance._proto import instance_pb2 as pb
from serving.engine.protocol import EngineStats, TokenLogprob

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Instance"].full_name  # "pdserve.instance.Instance"
# how the details of the UNAVAILABLE status that a draining instance answers a new Generate with
# begin: the router then sends the request elsewhere without counting the instance as failed
DRAINING_PREFIX = "draining: "

_PLAIN_PARAMS = ("temperature", "top_p", "top_k", "min_p", "min_tokens", "stop", "stop_token_ids",
                 "ignore_eos", "include_stop_str_in_output", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "skip_special_tokens")
_OPTIONAL_PARAMS = ("seed", "max_tokens", "logprobs")
_STATS_FIELDS = ("num_running", "num_waiting", "num_swapped", "kv_cache_usage", "num_preemptions",
                 "prefix_cache_queries", "prefix_cache_hits")


def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    if params.n != 1:
        raise ValueError(f"an instance runs one sequence per request; expand n={params.n} first")
    message = pb.SamplingParams(**{name: getattr(params, name) for name in _PLAIN_PARAMS})
    for name in _OPTIONAL_PARAMS:
        if getattr(params, name) is not None:
            setattr(message, name, getattr(params, name))
    return message


def params_from_proto(message: pb.SamplingParams) -> SamplingParams:
    values = {name: getattr(message, name) for name in _PLAIN_PARAMS}
    values["stop"], values["stop_token_ids"] = list(message.stop), list(message.stop_token_ids)
    for name in _OPTIONAL_PARAMS:
        values[name] = getattr(message, name) if message.HasField(name) else None
    return SamplingParams(**values)


def generate_request(request_id: str, prompt_token_ids: list[int], params: SamplingParams, kv_peer: str = "",
                     remote_prefill: bool = False, client_id: str = "", priority: int = 0) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt_token_ids,
                              params=params_to_proto(params), kv_peer=kv_peer, remote_prefill=remote_prefill,
                              client_id=client_id, priority=priority)


def request_kwargs(message: pb.GenerateRequest) -> dict:
    """What an instance's engine takes beside the prompt and params (Engine.add_request's kwargs)."""
    return {"client_id": message.client_id, "priority": message.priority, "kv_peer": message.kv_peer or None,
            "remote_prefill": message.remote_prefill}


def output_to_proto(output: EngineCoreOutput) -> pb.GenerateOutput:
    message = pb.GenerateOutput(
        request_id=output.request_id, new_token_ids=output.new_token_ids, finished=output.finished,
        finish_reason=output.finish_reason or "", has_logprobs=output.new_logprobs is not None,
        num_prompt_tokens=output.num_prompt_tokens, num_output_tokens=output.num_output_tokens,
        num_cached_tokens=output.num_cached_tokens, error=output.error or "", accepted=output.accepted,
        kv_transfer=output.kv_transfer or "")
    if isinstance(output.stop_reason, str):
        message.stop_string = output.stop_reason
    elif output.stop_reason is not None:
        message.stop_token_id = output.stop_reason
    for record in output.new_logprobs or ():
        message.new_logprobs.append(pb.TokenLogprob(
            token_id=record.token_id, logprob=record.logprob,
            top_token_ids=[t for t, _ in record.top], top_logprobs=[lp for _, lp in record.top]))
    if output.queue_time_s is not None:
        message.queue_time_s = output.queue_time_s
    return message


def output_from_proto(message: pb.GenerateOutput) -> EngineCoreOutput:
    stop_kind = message.WhichOneof("stop_reason")
    logprobs = None
    if message.has_logprobs:
        logprobs = [TokenLogprob(r.token_id, r.logprob, list(zip(r.top_token_ids, r.top_logprobs)))
                    for r in message.new_logprobs]
    return EngineCoreOutput(
        request_id=message.request_id, new_token_ids=list(message.new_token_ids),
        finished=message.finished, finish_reason=message.finish_reason or None,
        stop_reason=getattr(message, stop_kind) if stop_kind else None, new_logprobs=logprobs,
        num_prompt_tokens=message.num_prompt_tokens, num_output_tokens=message.num_output_tokens,
        num_cached_tokens=message.num_cached_tokens, error=message.error or None,
        queue_time_s=message.queue_time_s if message.HasField("queue_time_s") else None,
        accepted=message.accepted, kv_transfer=message.kv_transfer or None)


def stats_to_proto(stats: EngineStats) -> pb.StatsResponse:
    message = pb.StatsResponse(**{name: getattr(stats, name) for name in _STATS_FIELDS})
    for name, histogram in stats.extra.get("histograms", {}).items():  # LatencyHistogram.snapshot()s
        message.histograms[name].CopyFrom(pb.Histogram(**histogram))
    message.client_service.update(stats.extra.get("client_service", {}))
    return message


def stats_from_proto(message: pb.StatsResponse) -> EngineStats:
    return EngineStats(**{name: getattr(message, name) for name in _STATS_FIELDS})


def draining_details(instance_name: str) -> str:
    return f"{DRAINING_PREFIX}instance {instance_name} is shutting down and takes no new requests"


def is_draining(details: str | None) -> bool:
    return bool(details) and details.startswith(DRAINING_PREFIX)
