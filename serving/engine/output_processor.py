"""From engine token ids to what a client sees: incremental text, stop strings, cumulative counts.

One `RequestState` per client request turns each `EngineCoreOutput` (token deltas) into a
`RequestOutput` (text deltas). The in-process engine client (AsyncLLM), the offline LLM API and the
disaggregated router all use it, so text and stop strings are handled once, in one place, and
outside the engine loop. When the text hits a stop string the state finishes the request for the
client at once (finish_reason "stop", stop_reason the string) and sets `stop_hit`: the caller then
tells the engine to stop it (any tokens the engine produced meanwhile are dropped).
"""
from __future__ import annotations

from scheduler.engine_core import EngineCoreOutput
from scheduler.sampling_params import SamplingParams
from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.protocol import RequestOutput


class RequestState:
    def __init__(self, request_id: str, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = len(prompt_token_ids)
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.stop,
                                                  params.include_stop_str_in_output, params.skip_special_tokens)
        self.output_token_ids: list[int] = []
        self.num_cached_tokens: int | None = None
        self.finished = False
        self.stop_hit: str | None = None  # the stop string that finished it here (the engine must stop it)
        self._queue_time_sent = False

    def process(self, output: EngineCoreOutput, finished: bool | None = None) -> RequestOutput | None:
        """The client's increment for one engine output; None once the request has finished here.
        finished overrides output.finished (the router continues a prefill's "finished" request
        on a decode instance)."""
        if self.finished:
            return None
        token_ids = output.new_token_ids
        self.output_token_ids.extend(token_ids)
        if self.num_cached_tokens is None and (token_ids or output.finished):
            self.num_cached_tokens = output.num_cached_tokens
        finished = output.finished if finished is None else finished
        reason, stop_reason = output.finish_reason, output.stop_reason
        matched = self.detokenizer.add_tokens(token_ids) if token_ids else None
        if matched is not None and not finished:  # a stop string ends an unfinished request
            finished, reason, stop_reason = True, "stop", matched
            self.stop_hit = matched
        self.finished = finished
        queue_time = None
        if output.queue_time_s is not None and not self._queue_time_sent:
            queue_time, self._queue_time_sent = output.queue_time_s, True
        return RequestOutput(
            request_id=self.request_id, new_token_ids=token_ids,
            new_text=self.detokenizer.take_new_text(finished), finished=finished,
            finish_reason=reason if finished else None, stop_reason=stop_reason if finished else None,
            new_logprobs=output.new_logprobs, num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=len(self.output_token_ids), num_cached_tokens=self.num_cached_tokens or 0,
            error=output.error if finished else None, queue_time_s=queue_time,
            kv_transfer=output.kv_transfer if finished else None)


class OutputProcessor:
    """The states of every request in flight, keyed by request id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestState:
        state = self.states[request_id] = RequestState(request_id, self.tokenizer, prompt_token_ids, params)
        return state

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[RequestState]]:
        """The client outputs, and the states whose stop string was just hit (stop them in the engine)."""
        client_outputs, stopped = [], []
        for output in outputs:
            state = self.states.get(output.request_id)
            if state is None:
                continue
            client_output = state.process(output)
            if client_output is None:
                continue
            client_outputs.append(client_output)
            if state.stop_hit is not None:
                stopped.append(state)
            if client_output.finished:
                del self.states[output.request_id]
        return client_outputs, stopped

    def abort(self, request_id: str) -> None:
        self.states.pop(request_id, None)
