"""The scheduler half of each placement mode, with a stand-in executor: remote prefill (decode side),
remote decode (prefill side), and the bookkeeping of moves of every kind (a finished request keeps its
blocks while a move is in flight, and gets them back when it ends)."""
import pytest

from scheduler import RequestStatus
from scheduler.connectors import RemoteDecode, RemotePrefill
from scheduler.errors import NoKVSpaceError
from scheduler.kv_moves import (ACTIVE, FAILED, FINISHED, STARTED, AdoptKV, CancelKV, MoveResult, RecvKV,
                                SendKV, SwapIn, SwapOut)
from tests.scheduler.helpers import Runner, make_request, make_scheduler, step

BLOCK = 4


# ---- decode side: the prompt's KV comes from elsewhere ----
def decode_side(policy="recompute", num_blocks=32, **kw):
    sched = make_scheduler(num_blocks=num_blocks, block_size=BLOCK,
                           connector=RemotePrefill(stall_timeout_s=5.0, failure_policy=policy), **kw)
    return sched, Runner()


def test_remote_prefill_reserves_registers_and_joins_decoding():
    sched, runner = decode_side()
    sched.add_request(make_request("r", prompt_len=10, max_tokens=4, remote_prefill=True))
    assert len(sched.kv.block_ids("r")) == 3  # 10 prompt tokens + the first output token
    assert sched.kv.pool.num_free_blocks == 29
    plan, update = step(sched, runner)
    assert plan.kv_moves == [RecvKV("r", sched.kv.block_ids("r")[:3], 10)]
    assert plan.is_empty and not update.accepted
    runner.results = [MoveResult("r", "recv", STARTED)]
    plan, update = step(sched, runner)
    assert [r.request_id for r in update.accepted] == ["r"]  # the router may start the prefill now
    sched.set_first_token("r", 11)
    runner.results = [MoveResult("r", "recv", ACTIVE), MoveResult("r", "recv", FINISHED)]
    step(sched, runner)
    plan, update = step(sched, runner)  # now it runs: one token, its prompt's KV counted as computed
    assert plan.new_requests[0].num_computed_tokens == 10 and plan.num_scheduled_tokens == {"r": 1}
    assert plan.new_requests[0].token_ids[-1] == 11
    runner.tokens["r"] = plan.new_requests[0].token_ids  # as a runner whose cache holds the KV
    while sched.has_unfinished():
        step(sched, runner)
    sched.check_integrity()
    assert sched.kv.pool.num_free_blocks == 32
    assert sched.connector.counters()["num_kv_received"] == 1


def test_the_commit_can_carry_the_first_token():
    sched, runner = decode_side()
    sched.add_request(make_request("r", prompt_len=6, max_tokens=3, remote_prefill=True))
    step(sched, runner)
    runner.results = [MoveResult("r", "recv", STARTED), MoveResult("r", "recv", FINISHED, first_token_id=7)]
    step(sched, runner)
    plan, _ = step(sched, runner)
    assert plan.num_scheduled_tokens == {"r": 1} and plan.new_requests[0].token_ids[-1] == 7


def test_no_room_refuses_and_holds_nothing():
    sched, _ = decode_side(num_blocks=4)
    sched.add_request(make_request("a", prompt_len=10, max_tokens=2, remote_prefill=True))
    with pytest.raises(NoKVSpaceError):
        sched.add_request(make_request("b", prompt_len=10, max_tokens=2, remote_prefill=True))
    assert "b" not in sched.requests and sched.kv.block_ids("b") == []
    sched.check_integrity()


def test_failed_receive_recomputes_prompt_and_first_token():
    sched, runner = decode_side("recompute")
    sched.add_request(make_request("r", prompt_len=10, max_tokens=3, remote_prefill=True))
    step(sched, runner)
    sched.set_first_token("r", 11)
    runner.results = [MoveResult("r", "recv", FAILED, "the sender gave up")]
    step(sched, runner)
    plan, _ = step(sched, runner)
    assert plan.new_requests[0].num_computed_tokens == 0 and plan.num_scheduled_tokens == {"r": 11}
    assert sched.connector.counters()["num_recompute_fallbacks"] == 1


def test_failed_receive_fails_the_request_by_policy():
    sched, runner = decode_side("fail")
    sched.add_request(make_request("r", prompt_len=10, max_tokens=3, remote_prefill=True))
    step(sched, runner)
    runner.results = [MoveResult("r", "recv", FAILED, "the sender gave up")]
    _, update = step(sched, runner)
    assert [r.request_id for r in update.finished] == ["r"]
    request = update.finished[0]
    assert request.status is RequestStatus.FINISHED_ERROR and "the sender gave up" in request.error
    assert sched.kv.pool.num_free_blocks == 32 and not sched.has_unfinished()


def test_kv_that_never_starts_after_the_prefill_is_cancelled_at_the_deadline():
    sched, runner = decode_side("recompute")
    sched.add_request(make_request("r", prompt_len=10, max_tokens=3, remote_prefill=True))
    step(sched, runner)
    sched.set_first_token("r", 11)
    sched.clock.advance(4.0)
    plan, _ = step(sched, runner)
    assert not any(isinstance(m, CancelKV) for m in plan.kv_moves)
    sched.clock.advance(2.0)
    plan, _ = step(sched, runner)
    assert [m for m in plan.kv_moves if isinstance(m, CancelKV)][0].request_id == "r"
    assert sched.kv.block_ids("r")  # nothing freed until the worker confirms
    runner.results = [MoveResult("r", "recv", FAILED, "cancelled")]
    step(sched, runner)
    plan, _ = step(sched, runner)
    assert plan.num_scheduled_tokens == {"r": 11}  # recomputed here
    assert sched.connector.counters()["num_never_sent"] == 1


def test_an_active_transfer_has_no_handoff_deadline():
    sched, runner = decode_side()
    sched.add_request(make_request("r", prompt_len=10, max_tokens=3, remote_prefill=True))
    step(sched, runner)
    runner.results = [MoveResult("r", "recv", STARTED), MoveResult("r", "recv", ACTIVE)]
    step(sched, runner)
    sched.set_first_token("r", 11)
    sched.clock.advance(60.0)
    plan, _ = step(sched, runner)
    assert not plan.kv_moves  # the receiver's own progress timer owns an active transfer


def test_an_aborted_receive_keeps_its_blocks_until_the_worker_lets_go():
    sched, runner = decode_side()
    sched.add_request(make_request("r", prompt_len=10, max_tokens=3, remote_prefill=True))
    step(sched, runner)
    sched.finish_requests(["r"], RequestStatus.FINISHED_ABORTED)
    assert sched.kv.pool.num_free_blocks == 29 and "r" in sched.held
    sched.check_integrity()
    plan, _ = step(sched, runner)
    assert CancelKV("r", "the request finished (finished_aborted)") in plan.kv_moves
    assert sched.kv.pool.num_free_blocks == 29  # a receiver thread may still be writing
    runner.results = [MoveResult("r", "recv", FAILED, "cancelled")]
    step(sched, runner)
    assert sched.kv.pool.num_free_blocks == 32 and not sched.held and not sched.has_unfinished()
    sched.check_integrity()


# ---- prefill side: the prompt's KV goes elsewhere ----
def prefill_side(num_blocks=32, lease_ttl_s=10.0, **kw):
    sched = make_scheduler(num_blocks=num_blocks, block_size=BLOCK,
                           connector=RemoteDecode(lease_ttl_s, num_layers=4, layers_per_group=1), **kw)
    return sched, Runner()


def test_remote_decode_sends_in_layer_groups_and_holds_blocks_until_acknowledged():
    sched, runner = prefill_side(budget=8)
    sched.add_request(make_request("r", prompt_len=10, max_tokens=50, kv_peer="decode:1"))
    plan, _ = step(sched, runner)  # first chunk: no send yet
    assert not plan.kv_moves and [(s.layer_start, s.layer_end) for s in plan.segments] == [(0, None)]
    plan, update = step(sched, runner)  # the prompt completes: send, in 4 layer groups
    assert plan.kv_moves == [SendKV("r", sched.kv.block_ids("r")[:3], 10, "decode:1")]
    assert [(s.request_ids, s.layer_start, s.layer_end) for s in plan.segments] == \
        [(["r"], 0, 1), (["r"], 1, 2), (["r"], 2, 3), (["r"], 3, 4)]
    request = update.updated[0]
    assert request.status is RequestStatus.FINISHED_REMOTE_DECODE and len(request.output_token_ids) == 1
    assert "r" in sched.held and sched.kv.pool.num_free_blocks == 29  # leased
    sched.check_integrity()
    runner.results = [MoveResult("r", "send", FINISHED)]
    step(sched, runner)
    assert sched.kv.pool.num_free_blocks == 32 and not sched.has_unfinished()


def test_a_send_acknowledged_within_its_step_frees_at_once():
    sched, runner = prefill_side()
    sched.add_request(make_request("r", prompt_len=6, max_tokens=5, kv_peer="decode:1"))
    runner.results = [MoveResult("r", "send", FINISHED)]  # acked before the step's result came back
    step(sched, runner)
    assert sched.kv.pool.num_free_blocks == 32 and not sched.has_unfinished()


def test_an_expired_lease_cancels_the_send_counted():
    sched, runner = prefill_side(lease_ttl_s=3.0)
    sched.add_request(make_request("r", prompt_len=6, max_tokens=5, kv_peer="decode:1"))
    step(sched, runner)
    sched.clock.advance(2.0)
    plan, _ = step(sched, runner)
    assert not plan.kv_moves
    sched.clock.advance(2.0)
    plan, _ = step(sched, runner)
    assert plan.kv_moves == [CancelKV("r", "KV lease expired after 3s")]
    assert sched.connector.counters()["num_leases_expired"] == 1
    assert sched.kv.pool.num_free_blocks == 30  # until no copy reads the blocks
    runner.results = [MoveResult("r", "send", FAILED, "cancelled")]
    step(sched, runner)
    assert sched.kv.pool.num_free_blocks == 32 and not sched.has_unfinished()


def test_a_stop_at_the_first_token_cancels_the_send():
    sched, runner = prefill_side()
    sched.add_request(make_request("r", prompt_len=6, max_tokens=5, kv_peer="decode:1", stop_token_ids=[7]))
    _, update = step(sched, runner)  # the stand-in samples 7: a stop token
    assert update.updated[0].status is RequestStatus.FINISHED_STOPPED
    plan, _ = step(sched, runner)
    assert plan.kv_moves == [CancelKV("r", "the request finished (finished_stopped)")]


# ---- every move kind: blocks stay while a move is in flight ----
class IssueOnce:
    """A connector policy that issues one move of a given kind for each request as it first runs."""

    def __init__(self, make_move):
        self.make_move = make_move
        self.results = []

    def admit(self, scheduler, request):
        return False

    def before_schedule(self, scheduler, plan, now):
        pass

    def after_schedule(self, scheduler, plan, now):
        for new in plan.new_requests:
            plan.kv_moves.append(self.make_move(new.request_id, new.block_ids))

    def finish_status(self, request):
        return None

    def on_move(self, scheduler, result, now):
        self.results.append(result)

    def on_finish(self, scheduler, request):
        pass

    def set_first_token(self, scheduler, request_id, token_id, now):
        pass

    def num_pending(self):
        return 0

    def counters(self):
        return {}


MOVES = {"send": lambda rid, b: SendKV(rid, b, 4, "peer"), "recv": lambda rid, b: RecvKV(rid, b, 4),
         "swap_out": lambda rid, b: SwapOut(rid, b, list(range(len(b)))),
         "swap_in": lambda rid, b: SwapIn(rid, list(range(len(b))), b), "adopt": lambda rid, b: AdoptKV(rid, b)}


@pytest.mark.parametrize("kind", sorted(MOVES))
def test_move_bookkeeping(kind):
    policy = IssueOnce(MOVES[kind])
    sched = make_scheduler(num_blocks=16, block_size=BLOCK, connector=policy)
    runner = Runner()
    sched.add_request(make_request("done", prompt_len=6, max_tokens=2))
    sched.add_request(make_request("gone", prompt_len=6, max_tokens=20))
    step(sched, runner)
    assert sched.moves.has("done", kind) and sched.moves.has("gone", kind)
    # a move that ends while its request lives changes nothing about its blocks
    runner.results = [MoveResult("done", kind, FINISHED)]
    step(sched, runner)
    assert not sched.moves.has("done", kind) and policy.results[-1].state == FINISHED
    # a request aborted mid-move: held, its move cancelled, its blocks back only once it ended
    sched.finish_requests(["gone"], RequestStatus.FINISHED_ABORTED)
    num_free = sched.kv.pool.num_free_blocks
    plan, _ = step(sched, runner)
    assert CancelKV("gone", "the request finished (finished_aborted)") in plan.kv_moves
    assert sched.kv.pool.num_free_blocks == num_free and "gone" in sched.held
    runner.results = [MoveResult("gone", kind, FAILED, "cancelled"), MoveResult("gone", kind, FINISHED)]
    step(sched, runner)  # a second report of the same move (a completion racing the cancel) is dropped
    assert "gone" not in sched.held and [r.state for r in policy.results[-1:]] == [FAILED]
    while sched.has_unfinished():
        step(sched, runner)
    sched.check_integrity()
    assert sched.kv.pool.num_free_blocks == 16
    assert sched.moves.num_started[kind] == 2 and sched.moves.num_failed[kind] == 1


def test_a_request_aborted_before_its_receive_was_planned_never_registers_it():
    """A client gone between the reservation and the next step: its blocks are free at once and no
    RecvKV for it ever reaches the worker (the receiver would write blocks someone else owns)."""
    sched, runner = decode_side()
    sched.add_request(make_request("r", prompt_len=10, max_tokens=3, remote_prefill=True))
    sched.finish_requests(["r"], RequestStatus.FINISHED_ABORTED)
    assert sched.kv.pool.num_free_blocks == 32 and not sched.held
    plan, _ = step(sched, runner)
    assert not plan.kv_moves and not runner.moves
    sched.check_integrity()
    assert not sched.has_unfinished()
