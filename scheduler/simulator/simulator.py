"""Discrete-event simulation of a deployment, through the runtime's own scheduler, KV manager,
policies, connector policies and routing policy.

Events, on one global clock (seconds after the first arrival), ordered by (time, insertion order):

    arrival      a conversation's turn is sent (after --max-concurrency lets it through); the router
                 routes it as the runtime's router does (scheduler/routing.py):
                   colocated      to a replica (fewest queued prompt tokens, then fewest streaming)
                   disaggregated  reserve on a decode instance (most free blocks as of the last poll,
                                  then fewest active); none has room: wait at the router (FCFS, retried
                                  whenever a decode instance finishes a request, failed after
                                  instance_timeout_s as the runtime's 503)
    step         an instance runs one EngineCore step at the event time: its VirtualClock is set to
                 that time and advanced by the latency model's step duration; what the step emits
                 happens at its end (`step done`), and the instance steps again at once while it has
                 work, else sleeps until an event concerns it
    move due     a KV move result falls due (transfer model: scheduler/simulator/transfer.py): wakes
                 its instance, whose next step collects it

    the router reserves on decode D and, when its estimate says D has room (prefill_while_reserving,
    the runtime's default), picks a prefill instance P (fewest queued prompt tokens) at once; else once
    D reports `accepted` (its RecvKV is registered, at the end of D's next step) -> P's step that
    completes the prompt plans SendKV (whose KV leaves once D has registered the blocks) and samples the
    first token: at that step's end, or once D has accepted if later, the client has its first token
    and the router hands it to D (SetFirstToken) -> the commit (transfer done) carries it too; D decodes
    once both are in.

A step's outputs carry the virtual time of the step's end, which is when a client would see them.
Every decision (batching, chunking, preemption, admission, reservation, routing) is made by the
runtime's code; the simulator only decides when each instance steps and how long moves take.
"""
from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from scheduler.engine_core import EngineCoreOutput
from scheduler.errors import NoKVSpaceError, RequestTooLargeError
from scheduler.request import Request
from scheduler.routing import LeastLoadedRouting
from scheduler.sampling_params import SamplingParams
from scheduler.simulator.instance import SimInstance
from scheduler.simulator.spec import SimConversation, SimDeployment, SimRecord
from scheduler.simulator.transfer import IDEAL_PEER, InstanceMoves, TransferNetwork, TransferStats


@dataclass
class InstanceStats:
    role: str
    node: int
    num_steps: int
    busy_seconds: float
    num_preemptions: int
    num_blocks: int
    max_num_waiting: int  # longest queue (waiting + waiting for KV) seen after a step


@dataclass
class SimResult:
    records: list[SimRecord]
    duration_s: float  # first arrival to last token
    instances: dict[str, InstanceStats]
    transfer: TransferStats
    max_router_queue: int  # most requests waiting at the router for decode room at once
    wall_s: float = 0.0
    num_events: int = 0


@dataclass
class _Flow:
    """One request across the instances it visits."""
    record: SimRecord
    conversation: SimConversation
    prompt_ids: list[int]
    instance: SimInstance | None = None  # the replica, or the prefill instance
    decode: SimInstance | None = None
    request: Request | None = None  # on the replica, or on the decode instance
    prefill_request: Request | None = None
    prefill_sent: bool = False  # the prefill is dispatched (at the reservation, or once it was accepted)
    accepted: bool = False  # the decode instance has accepted the reservation
    held_first: EngineCoreOutput | None = None  # the prefill's answer, held until the reservation is accepted
    prefill_answered: bool = False
    done: bool = False


class Simulator:
    def __init__(self, deployment: SimDeployment, token_id: int = 0) -> None:
        self.deployment = deployment
        self.token_id = token_id
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()
        self.network = TransferNetwork(deployment.links, self._on_move_due, token_id)
        self.instances = [SimInstance(spec, deployment, self.network, token_id) for spec in deployment.instances]
        self._by_moves: dict[int, SimInstance] = {id(i.moves): i for i in self.instances}
        self._by_name = {i.name: i for i in self.instances}
        self._decodes = [i for i in self.instances if i.role == "decode"]
        self.routing = LeastLoadedRouting()
        self._flows: dict[str, _Flow] = {}
        self._router_queue: deque[_Flow] = deque()
        self._client_queue: deque[_Flow] = deque()
        self._num_in_flight = 0
        self._params: dict[int, SamplingParams] = {}
        self.records: list[SimRecord] = []
        self.max_router_queue = 0
        self._on_done: Callable[[SimRecord], None] | None = None
        self._num_events = 0

    # ---- the loop ----
    def run(self, conversations: list[SimConversation],
            on_done: Callable[[SimRecord], None] | None = None) -> SimResult:
        """Simulate the whole workload (a Simulator runs once). `on_done` is called with each finished
        record (progress bars)."""
        if self.records or self._events:
            raise RuntimeError("a Simulator runs once; make a new one")
        started = time.perf_counter()
        self._on_done = on_done
        for conversation in sorted(conversations, key=lambda c: (c.arrival_s, c.conversation_id)):
            self._at(conversation.arrival_s, self._arrive, conversation, 0, None)
        events = self._events
        while events:
            when, _, fn, args = heapq.heappop(events)
            self.now = when
            fn(*args)
            self._num_events += 1
        waiting_at_router = {id(flow) for flow in self._router_queue}
        for flow in list(self._flows.values()):
            self._finish(flow, f"no decode instance could take request {flow.record.request_id} (all are out of "
                               "free KV blocks)" if id(flow) in waiting_at_router else
                         "the simulation ended with the request unfinished (nothing left to run it)")
        self.records.sort(key=lambda r: (r.conversation_id, r.turn_index))
        duration = max((r.finish_s for r in self.records), default=0.0)
        return SimResult(self.records, duration, self._instance_stats(), self.network.stats, self.max_router_queue,
                         time.perf_counter() - started, self._num_events)

    def _at(self, when: float, fn, *args) -> None:
        heapq.heappush(self._events, (when, next(self._seq), fn, args))

    # ---- instances: steps and wake-ups ----
    def _wake(self, instance: SimInstance) -> None:
        if instance.stepping:
            instance.poked = True
            return
        instance.stepping = True
        self._at(self.now, self._step, instance)

    def _on_move_due(self, moves: InstanceMoves, when: float) -> None:
        self._at(when, self._wake, self._by_moves[id(moves)])

    def _step(self, instance: SimInstance) -> None:
        instance.clock.advance_to(self.now)
        instance.poked = False
        num_move_events = instance.moves.num_events
        outputs = instance.core.step()
        moved = instance.moves.num_events != num_move_events
        self._at(instance.clock.now(), self._step_done, instance, outputs,
                 not instance.core.last_step_idle or moved)

    def _step_done(self, instance: SimInstance, outputs: list[EngineCoreOutput], worked: bool) -> None:
        handle = {"colocated": self._on_replica_output, "prefill": self._on_prefill_output,
                  "decode": self._on_decode_output}[instance.role]
        any_finished = False
        for output in outputs:
            flow = self._flows.get(output.request_id)
            if flow is not None:
                handle(instance, flow, output)
                any_finished = any_finished or output.finished
        num_waiting = instance.scheduler.num_waiting
        if num_waiting > instance.max_num_waiting:
            instance.max_num_waiting = num_waiting
        if worked or outputs or instance.poked:
            self._step(instance)  # at once: the next step starts when this one ends
        else:
            instance.stepping = False
        if any_finished and instance.role == "decode" and self._router_queue:
            self._retry_router_queue()

    # ---- arrivals and routing ----
    def _arrive(self, conversation: SimConversation, turn_index: int, previous: _Flow | None) -> None:
        turn = conversation.turns[turn_index]
        marker = conversation.conversation_id + 1  # distinct per conversation: no false prefix hits
        if previous is None:
            prompt_ids = [marker] * turn.num_input_tokens
        else:  # the history (prompt and reply) comes first, as bench resends it
            prompt_ids = (previous.prompt_ids + [self.token_id] * previous.record.num_output_tokens
                          + [marker] * turn.num_input_tokens)
        record = SimRecord(f"sim-{conversation.conversation_id}-{turn_index}", conversation.conversation_id,
                           turn_index, conversation.tenant, len(prompt_ids), turn.num_output_tokens, self.now)
        flow = _Flow(record, conversation, prompt_ids)
        self._flows[record.request_id] = flow
        cap = self.deployment.max_concurrency
        if cap is not None and self._num_in_flight >= cap:
            self._client_queue.append(flow)
            return
        self._send(flow)

    def _send(self, flow: _Flow) -> None:
        self._num_in_flight += 1
        flow.record.start_s = self.now
        if self.deployment.colocated:
            replica = self.routing.pick_replica(self.instances)
            flow.instance = replica
            request = self._add(replica, flow)
            if request is not None:
                replica.num_queued_prefill_tokens += len(flow.prompt_ids)
                replica.num_active += 1
                flow.request = request
        elif self.deployment.phase == "prefill":
            self._dispatch_prefill(flow, kv_peer=IDEAL_PEER)
        elif not self._reserve(flow):
            self._router_queue.append(flow)
            self.max_router_queue = max(self.max_router_queue, len(self._router_queue))

    def _request(self, flow: _Flow, instance: SimInstance, **kwargs) -> Request:
        n = flow.record.max_output_tokens
        params = self._params.get(n)
        if params is None:
            params = self._params[n] = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0)
        return Request(flow.record.request_id, flow.prompt_ids, params, (), instance.spec.max_model_len,
                       flow.conversation.tenant, arrival_time=self.now, **kwargs)

    def _add(self, instance: SimInstance, flow: _Flow, **kwargs) -> Request | None:
        """Add the flow's request to an instance; a request it refuses fails (None)."""
        try:
            request = self._request(flow, instance, **kwargs)
            instance.core.add_request(request)
        except (RequestTooLargeError, ValueError) as e:
            self._finish(flow, str(e))
            return None
        self._wake(instance)
        return request

    def _reserve(self, flow: _Flow) -> bool:
        """Reserve blocks on the best decode instance with room (False: none has room)."""
        for decode in self._decodes:
            decode.num_free_blocks_estimate_at(self.now)
        for decode in self.routing.decode_candidates(self._decodes):
            num_blocks = -(-(len(flow.prompt_ids) + 1) // decode.spec.block_size)
            early = (self.deployment.prefill_while_reserving and self.deployment.phase == "both"
                     and self.routing.prefill_while_reserving(decode, num_blocks))
            try:
                request = self._request(flow, decode, remote_prefill=True)
                decode.core.add_request(request)
            except NoKVSpaceError:
                continue
            except (RequestTooLargeError, ValueError) as e:
                self._finish(flow, str(e))
                return True
            decode.num_active += 1
            decode.num_blocks_reserved_since_poll += num_blocks
            flow.decode, flow.request = decode, request
            self._wake(decode)
            if early:
                flow.prefill_sent = True
                self._dispatch_prefill(flow, kv_peer=decode.name)
            return True
        return False

    def _retry_router_queue(self) -> None:
        timeout = self.deployment.instance_timeout_s
        while self._router_queue:
            flow = self._router_queue[0]
            if self.now - flow.record.start_s > timeout:
                self._router_queue.popleft()
                self._finish(flow, f"no decode instance could take request {flow.record.request_id} within "
                                   f"{timeout:.0f}s (all are out of free KV blocks)")
                continue
            if not self._reserve(flow):
                return
            self._router_queue.popleft()

    def _dispatch_prefill(self, flow: _Flow, kv_peer: str) -> None:
        prefill = self.routing.pick_prefill(self.instances)
        flow.instance = prefill
        request = self._add(prefill, flow, kv_peer=kv_peer)
        if request is not None:
            prefill.num_queued_prefill_tokens += len(flow.prompt_ids)
            flow.prefill_request = request

    # ---- outputs ----
    def _on_replica_output(self, replica: SimInstance, flow: _Flow, output: EngineCoreOutput) -> None:
        record = flow.record
        if output.new_token_ids:
            if not record.token_times_s:
                replica.num_queued_prefill_tokens -= len(flow.prompt_ids)
                record.prefill_scheduled_s = flow.request.first_scheduled_time
            record.token_times_s.append(self.now)
        if output.finished:
            if not record.token_times_s:
                replica.num_queued_prefill_tokens -= len(flow.prompt_ids)
            replica.num_active -= 1
            record.num_preemptions = flow.request.num_preemptions
            self._finish(flow, _error_of(output))

    def _on_prefill_output(self, prefill: SimInstance, flow: _Flow, output: EngineCoreOutput) -> None:
        if not output.finished:
            return
        flow.prefill_answered = True
        if flow.decode is not None and not flow.accepted:  # the router reads it once D has accepted
            flow.held_first = output
            return
        record = flow.record
        prefill.num_queued_prefill_tokens -= len(flow.prompt_ids)
        record.prefill_scheduled_s = flow.prefill_request.first_scheduled_time
        if output.new_token_ids:
            record.token_times_s.append(self.now)  # the client has its first token now
        decode = flow.decode
        if output.finish_reason == "remote_decode":
            if decode is None:  # the prefill phase alone: its decode side is ideal
                self._finish(flow, "")
                return
            decode.core.set_first_token(record.request_id, output.new_token_ids[0])
            self._wake(decode)
            return
        # a real stop at the first token (max_tokens 1), or an error: _finish drops the decode reservation
        self._finish(flow, _error_of(output))

    def _on_decode_output(self, decode: SimInstance, flow: _Flow, output: EngineCoreOutput) -> None:
        record = flow.record
        if output.accepted:
            record.reserved_s = self.now
            flow.accepted = True
            if self.deployment.phase == "decode":  # the decode phase alone: the prompt's KV is there
                record.token_times_s.append(self.now)
                self.network.deliver_now(decode.moves, record.request_id, self.now)
            elif not flow.prefill_sent:
                flow.prefill_sent = True
                self._dispatch_prefill(flow, kv_peer=decode.name)
            elif flow.held_first is not None:
                held, flow.held_first = flow.held_first, None
                self._on_prefill_output(flow.instance, flow, held)
            return
        if output.new_token_ids:
            if record.decode_scheduled_s is None:
                record.decode_scheduled_s = flow.request.first_scheduled_time
            record.token_times_s.append(self.now)
        if output.finished:
            decode.num_active -= 1
            record.kv_transfer = output.kv_transfer or ""
            record.num_preemptions = flow.request.num_preemptions
            record.kv_arrived_s = self.network.done_time(record.request_id)
            self._finish(flow, _error_of(output))

    def _finish(self, flow: _Flow, error: str) -> None:
        if flow.done:
            return
        flow.done = True
        record = flow.record
        record.error = error
        decode = flow.decode
        if decode is not None and record.request_id in decode.scheduler.requests:
            # it ends before its decode instance ran it (a stop at the first token, a prefill that
            # refused it): the router aborts the reservation there, freeing its blocks
            decode.core.abort_requests([record.request_id])
            decode.num_active -= 1
            self._wake(decode)
        prefill = flow.instance
        if flow.held_first is not None:  # answered, never read: the router closes that stream
            prefill.num_queued_prefill_tokens -= len(flow.prompt_ids)
        if decode is not None and prefill is not None and flow.prefill_request is not None and not flow.prefill_answered:
            # it ends before its prefill answered (started while the decode instance reserved): the
            # router closes that stream, which aborts the prompt there
            prefill.core.abort_requests([record.request_id])
            prefill.num_queued_prefill_tokens -= len(flow.prompt_ids)
            self._wake(prefill)
        record.decode_instance = flow.decode.name if flow.decode else ""
        record.instance = flow.instance.name if flow.instance else ""
        del self._flows[record.request_id]
        self.records.append(record)
        if self._on_done is not None:
            self._on_done(record)
        self._num_in_flight -= 1
        if self._client_queue:
            self._send(self._client_queue.popleft())
        conversation = flow.conversation
        next_turn = record.turn_index + 1
        if next_turn < len(conversation.turns):
            if record.success:
                self._at(self.now + conversation.think_time_s, self._arrive, conversation, next_turn, flow)
            else:
                self._skip_rest(conversation, next_turn, record)

    def _skip_rest(self, conversation: SimConversation, first_unsent: int, failed: SimRecord) -> None:
        """Later turns of a conversation whose turn failed are never sent (as bench counts them)."""
        for index in range(first_unsent, len(conversation.turns)):
            record = SimRecord(f"sim-{conversation.conversation_id}-{index}", conversation.conversation_id, index,
                               conversation.tenant, 0, conversation.turns[index].num_output_tokens, self.now,
                               self.now, error=f"not sent: turn {failed.turn_index} of this conversation failed")
            self.records.append(record)
            if self._on_done is not None:
                self._on_done(record)

    # ---- results ----
    def _instance_stats(self) -> dict[str, InstanceStats]:
        return {i.name: InstanceStats(i.role, i.spec.node, i.num_steps, i.busy_seconds, i.scheduler.num_preemptions,
                                      i.spec.num_blocks, i.max_num_waiting)
                for i in self.instances}


def _error_of(output: EngineCoreOutput) -> str:
    if output.finish_reason in ("error", "abort"):
        return output.error or f"the request ended with finish reason {output.finish_reason}"
    return ""


def simulate(deployment: SimDeployment, conversations: list[SimConversation],
             on_done: Callable[[SimRecord], None] | None = None) -> SimResult:
    return Simulator(deployment).run(conversations, on_done)
