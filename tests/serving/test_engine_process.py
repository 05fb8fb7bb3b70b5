"""The engine core in its own process (serving/engine/engine_process.py and its parts).

What crosses the boundary survives the trip; outputs through the process equal outputs in-process;
errors at start reach the parent with their message; a killed engine process (kill -9) fails what it
held at once with a clear error and comes back (colocated: restarted by AsyncLLM, through the real
HTTP server too; 1P1D: the instance says unhealthy and the router replaces it); it never outlives
its parent.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from scheduler.engine_core import EngineCoreOutput
from scheduler.sampling_params import SamplingParams
from serving.config import Config
from serving.engine import core_messages as m
from serving.engine.protocol import EngineDeadError, EngineStats, RequestRejectedError, TokenLogprob
from tests.servers import StreamedCompletion, free_port, log_tail, start_server, stop_server, wait_until
from tests.serving.test_disagg_support import children_running

# bounds that only a broken engine reaches (the box is slow and shared); never what a test measures
DEADLINE_S = 180.0
ENGINE_PROC = b"serving.engine.engine_core_proc"


def greedy(max_tokens: int, **changes) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **changes)


def engine_children(parent_pid: int) -> list[int]:
    """Live engine processes whose parent is parent_pid."""
    return children_running(parent_pid, ENGINE_PROC)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def make_llm(model_dir: str, **changes):
    from serving.engine.async_llm import AsyncLLM
    return AsyncLLM.from_config(Config().replace(model=model_dir, **changes))


async def tokens_of(llm, request_id: str, prompt: list[int], params: SamplingParams) -> list[int]:
    return [t async for o in llm.generate(request_id, prompt, params) for t in o.new_token_ids]


async def long_streams_under_way(llm, prompt: list[int], count: int) -> list[asyncio.Future]:
    """count streams of 2000 greedy tokens each, returned once every one has produced 2 tokens."""
    progress: dict[str, int] = {}

    async def stream(rid):
        async for output in llm.generate(rid, prompt, greedy(2000)):
            progress[rid] = progress.get(rid, 0) + len(output.new_token_ids)

    tasks = [asyncio.ensure_future(stream(f"long-{i}")) for i in range(count)]
    while len(progress) < count or min(progress.values()) < 2:
        assert not any(t.done() for t in tasks)
        await asyncio.sleep(0.01)
    return tasks


# ---- the messages ----
def test_outputs_params_and_stats_survive_the_trip():
    outputs = [
        EngineCoreOutput("a", [5], [TokenLogprob(5, -0.25, [(5, -0.25), (9, -1.5)])], num_prompt_tokens=3,
                         num_output_tokens=1, queue_time_s=0.125),
        EngineCoreOutput("b", [], finished=True, finish_reason="stop", stop_reason="\n\n", num_cached_tokens=16,
                         kv_transfer="recomputed: the KV never came"),
        EngineCoreOutput("c", [], accepted=True),
        EngineCoreOutput("d", [7], finished=True, finish_reason="error", stop_reason=7, error="boom"),
    ]
    stats = EngineStats(num_running=2, kv_cache_usage=0.5, extra={"kv_transfer": {"num_bytes_sent": 10.0}})
    message = m.unpack(m.outputs_message(outputs, stats))
    assert message[0] == m.OUTPUTS
    assert [m.decode_output(values) for values in message[1]] == outputs
    assert m.decode_stats(message[2]) == stats
    params = SamplingParams(n=1, temperature=0.7, top_k=5, seed=3, stop=["x", "yz"], stop_token_ids=[4],
                            logprobs=2, min_tokens=1, max_tokens=None)
    add = m.unpack(m.add_message("r", [1, 2, 3], params, {"client_id": "alice", "priority": 2}))
    assert add[:3] == [m.ADD, "r", [1, 2, 3]] and m.decode_params(add[3]) == params
    assert add[4] == {"client_id": "alice", "priority": 2}
    error = m.load_exception(m.dump_exception(RequestRejectedError("too long")))
    assert type(error) is RequestRejectedError and str(error) == "too long"


# ---- the same engine, another process ----
def test_outputs_through_the_process_equal_outputs_in_process(tiny_model_dir):
    prompts = [[5, 6, 7], list(range(10, 60)), [300] * 17, list(range(100, 133))]
    cases = [greedy(12), greedy(30, logprobs=2), greedy(5, stop_token_ids=[0]), greedy(20)]

    async def run(llm):
        async def one(i):
            return [(o.new_token_ids, o.new_text, o.finish_reason,
                     [(lp.token_id, lp.logprob, [t for t, _ in lp.top]) for lp in o.new_logprobs or []])
                    async for o in llm.generate(f"r{i}", prompts[i], cases[i])]
        results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        integrity = await llm.call(lambda engine: engine.check_integrity())
        await llm.shutdown()
        return results, integrity

    import torch
    threads = torch.get_num_threads()  # earlier tests may have changed this process's count
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # what the engine process computes with (nobind)
    try:
        in_process = asyncio.run(run(make_llm(tiny_model_dir, engine_process=False)))
    finally:
        torch.set_num_threads(threads)
    separate = make_llm(tiny_model_dir)
    assert separate.core.pid != os.getpid()
    through, integrity = asyncio.run(asyncio.wait_for(run(separate), DEADLINE_S))
    # tokens, text, finish reasons and top-k ids are equal; a logprob may differ in its last float32 bits
    # (requests batch differently when the timing differs, and a batch's matmul sums in another order)
    assert (without_logprobs(through), integrity) == (without_logprobs(in_process[0]), in_process[1])
    assert logprobs_of(through) == pytest.approx(logprobs_of(in_process[0]), abs=1e-4)


def without_logprobs(results):
    return [[(ids, text, reason, [(t, top) for t, _, top in lps]) for ids, text, reason, lps in r] for r in results]


def logprobs_of(results):
    return [lp for r in results for *_, lps in r for _, lp, _ in lps]


def test_errors_at_start_reach_the_parent_with_their_message(tiny_model_dir, tmp_path):
    from serving.engine.engine_process import EngineProcess

    too_small = Config().replace(model=tiny_model_dir, block_size=16, num_blocks_override=4, max_model_len=1024)
    with pytest.raises(ValueError, match=r"max seq len \(1024\) is larger .* \(64: 4 blocks of 16 tokens\)"):
        EngineProcess(too_small)  # a ValueError: `pdserve serve` prints it and exits 2
    corrupt = tmp_path / "corrupt-weights"
    shutil.copytree(tiny_model_dir, corrupt)
    for weights in corrupt.glob("*.safetensors"):
        weights.write_bytes(b"\xff" * 100)
    with pytest.raises(RuntimeError, match="the engine failed to start: .*header"):
        EngineProcess(Config().replace(model=str(corrupt)))  # not a config error: no exit 2
    assert engine_children(os.getpid()) == []  # neither is left running


def test_call_errors_and_rejections_keep_their_type(tiny_model_dir):
    llm = make_llm(tiny_model_dir)

    async def main():
        with pytest.raises(ZeroDivisionError):
            await llm.call(lambda engine: 1 / 0)
        with pytest.raises(RequestRejectedError, match="outside the vocabulary"):
            await tokens_of(llm, "bad", [5, 999999], greedy(2))
        assert await llm.call(lambda engine: engine.scheduler.num_waiting) == 0
        healthy = llm.is_healthy()
        await llm.shutdown()
        return healthy

    assert asyncio.run(asyncio.wait_for(main(), DEADLINE_S))


def test_the_engine_process_freezes_its_startup_heap_and_still_collects_what_comes_later(tiny_model_dir):
    """After startup the engine process's heap is out of the cyclic collector's reach (vLLM's
    freeze_gc_heap: a full collection over it took 158 ms); cycles made while serving are still freed;
    the parent's heap is left alone."""
    import gc
    llm = make_llm(tiny_model_dir)

    def probe(engine):
        import gc
        import weakref

        class Cycle:
            pass
        later = Cycle()
        later.me = later
        ref = weakref.ref(later)
        del later
        gc.collect()
        return gc.get_freeze_count(), ref() is None, gc.is_tracked(engine) and not any(
            obj is engine for obj in gc.get_objects())

    async def main():
        assert await tokens_of(llm, "r", [5, 6, 7], greedy(3))
        result = await llm.call(probe)
        await llm.shutdown()
        return result

    frozen, cycle_freed, engine_frozen = asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    assert frozen > 10_000, frozen  # the modules and libraries, not a handful
    assert engine_frozen and cycle_freed
    assert gc.get_freeze_count() == 0  # the test's (a user's) process is not frozen


def test_calls_whose_caller_gave_up_are_skipped(tiny_model_dir, tmp_path):
    """A client that disconnects cancels calls still queued behind a slow one; the engine process
    skips them (the parent told it), and serves on."""
    llm = make_llm(tiny_model_dir)
    gate = str(tmp_path / "gate")

    def wait_for_gate(engine):
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return engine.scheduler.num_waiting

    async def main():
        blocker = asyncio.ensure_future(llm.call(wait_for_gate))
        await asyncio.sleep(0.2)
        given_up = [asyncio.ensure_future(llm.call(lambda engine: engine.scheduler.requests)) for _ in range(3)]

        async def first_output(rid):
            async for out in llm.generate(rid, [5, 6, 7], greedy(4)):
                return out

        gone = [asyncio.ensure_future(first_output(f"gone-{i}")) for i in range(3)]
        await asyncio.sleep(0.05)
        for task in given_up + gone:
            task.cancel()
        await asyncio.gather(*given_up, *gone, return_exceptions=True)
        Path(gate).touch()
        await blocker
        outputs = [o async for o in llm.generate("after", [5, 6, 7], greedy(4))]
        await llm.call(lambda engine: engine.check_integrity())
        free, total = await llm.call(lambda engine: (engine.kv.pool.num_free_blocks, engine.kv.pool.num_blocks))
        healthy = llm.is_healthy()
        await llm.shutdown()
        return outputs, healthy, free, total

    outputs, healthy, free, total = asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    assert healthy and outputs[-1].finished and outputs[-1].num_output_tokens == 4
    assert free == total
    assert llm.core.num_cancelled_calls >= 3


# ---- failures ----
def test_killed_engine_process_fails_its_requests_at_once_and_is_restarted(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    prompt = [5, 6, 7]

    async def main():
        reference = await tokens_of(llm, "reference", prompt, greedy(8))
        tasks = await long_streams_under_way(llm, prompt, 3)
        pid = llm.core.pid
        os.kill(pid, signal.SIGKILL)
        errors = await asyncio.gather(*tasks, return_exceptions=True)
        unhealthy = not llm.is_healthy()
        during = None
        if unhealthy:  # model load takes seconds: a request now fails at once, it does not wait
            with pytest.raises(EngineDeadError) as refused:
                await tokens_of(llm, "during", prompt, greedy(4))
            during = str(refused.value)
        while not llm.is_healthy():
            await asyncio.sleep(0.1)
        after = await tokens_of(llm, "after", prompt, greedy(8))
        await llm.call(lambda engine: engine.check_integrity())
        await llm.shutdown()
        return pid, reference, errors, unhealthy, during, after

    pid, reference, errors, unhealthy, during, after = asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    for error in errors:
        assert isinstance(error, EngineDeadError), error
        assert f"the engine process (pid {pid}) died (killed by SIGKILL)" in str(error)
        assert "being restarted: retry shortly" in str(error)
    assert unhealthy and "being restarted" in during
    assert after == reference
    assert llm.core.num_restarts == 1 and llm.core.pid != pid and not alive(pid)


def test_a_restart_that_fails_leaves_the_engine_dead_saying_why(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    llm = make_llm(str(model_dir))
    pid = llm.core.pid
    shutil.rmtree(model_dir)  # the restart cannot load it again
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: "restarting it failed" in (llm.core.dead_reason or ""), "the restart to fail", DEADLINE_S)
    reason = llm.core.dead_reason
    assert reason.startswith(f"the engine process (pid {pid}) died (killed by SIGKILL), and restarting it failed (")
    assert "retry shortly" not in reason and not llm.is_healthy()

    async def refused():
        with pytest.raises(EngineDeadError, match="restarting it failed"):
            await tokens_of(llm, "late", [5, 6, 7], greedy(2))
        await llm.shutdown()
    asyncio.run(asyncio.wait_for(refused(), DEADLINE_S))


def test_internal_error_in_the_engine_loop_is_reported_then_restarted(tiny_model_dir):
    from serving.api.errors import to_api_error

    llm = make_llm(tiny_model_dir)

    def broken_schedule():
        raise KeyError("secret internal state")

    async def main():
        await llm.call(lambda engine: setattr(engine.scheduler, "schedule", broken_schedule))
        with pytest.raises(EngineDeadError) as error:
            await tokens_of(llm, "running", [5, 6, 7], greedy(4))
        while not llm.is_healthy():
            await asyncio.sleep(0.1)
        after = await tokens_of(llm, "after", [5, 6, 7], greedy(4))
        await llm.shutdown()
        return error.value, after

    error, after = asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    message = str(error)
    assert "internal error (KeyError)" in message and "being restarted" in message
    assert "secret" not in message
    assert to_api_error(error, "/v1/completions").status == 503
    assert len(after) == 4 and llm.core.num_restarts == 1


def test_engine_process_exits_when_its_parent_dies(tiny_model_dir, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, threading\n"
        "from serving.config import Config\n"
        "from serving.engine.engine_process import EngineProcess\n"
        f"core = EngineProcess(Config().replace(model={tiny_model_dir!r}))\n"
        "print(core.pid, flush=True)\n"
        "threading.Event().wait()\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        engine_pid = int(parent.stdout.readline())
        assert alive(engine_pid)
        parent.kill()
        parent.wait()
        wait_until(lambda: not alive(engine_pid), "the orphaned engine process to exit", DEADLINE_S)
    finally:
        if parent.poll() is None:
            parent.kill()


# ---- through the real HTTP server ----
@pytest.mark.slow
def test_http_server_survives_a_killed_engine_process(tiny_model_dir, tmp_path):
    port = free_port()
    log_path = tmp_path / "server.log"
    process = start_server(["--model", tiny_model_dir, "--served-model-name", "tiny", "--max-model-len", "2048"],
                           port, log_path, DEADLINE_S)
    base_url = f"http://127.0.0.1:{port}"
    try:
        [engine_pid] = engine_children(process.pid)
        body = {"model": "tiny", "prompt": "Tell me a long story", "max_tokens": 2000, "ignore_eos": True,
                "temperature": 0}
        streams = [StreamedCompletion(base_url, body, DEADLINE_S) for _ in range(2)]
        wait_until(lambda: all(len(s.events) >= 3 for s in streams), "the streams to begin", DEADLINE_S)
        os.kill(engine_pid, signal.SIGKILL)
        for stream in streams:
            stream.join(DEADLINE_S)
            assert stream.events[-1] == "[DONE]"
            error = stream.events[-2]["error"]
            assert error["type"] == "service_unavailable", error
            assert f"the engine process (pid {engine_pid}) died (killed by SIGKILL)" in error["message"]
        assert httpx.get(f"{base_url}/health", timeout=30).status_code == 503  # restarting: seconds
        wait_until(lambda: httpx.get(f"{base_url}/health", timeout=30).status_code == 200,
                   "/health to say 200 again", DEADLINE_S, interval_s=0.2)
        answer = httpx.post(f"{base_url}/v1/completions", json={**body, "max_tokens": 8}, timeout=DEADLINE_S)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 8
        [new_pid] = engine_children(process.pid)
        assert new_pid != engine_pid and not alive(engine_pid)
        log = log_path.read_text(errors="replace")
        assert "engine process restarted" in log, log_tail(log_path)
    finally:
        stop_server(process)


# ---- one instance of a 1P1D deployment ----
@pytest.mark.slow
@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_instance_whose_engine_process_dies_is_replaced(tiny_model_dir, role):
    from serving.router.engine_client import build_disaggregated_client
    from tests.serving.test_disagg_support import (LoopThread, assert_no_leaks, collect_all, make_cases,
                                                   reference_outputs, tiny_config, token_ids, wait_until_drained)

    loop = LoopThread()
    config = tiny_config(tiny_model_dir, mode="disaggregated", max_num_batched_tokens=64)
    client = build_disaggregated_client(config)
    name = f"{role}-0"

    async def find_state():  # the pool belongs to the loop that first used it
        return next(s for s in client.pool.instances if s.name == name)
    try:
        state = loop.run(find_state())
        [engine_pid] = engine_children(state.launched.info.pid)
        # decode: long streams die with it; prefill: a stream of prompts that keep it busy
        cases = make_cases(f"{role}-kill", 11, [20, 40, 60] * (1 if role == "decode" else 4),
                           [1500] if role == "decode" else [1])
        progress = {c.request_id: 0 for c in cases}

        async def stream(case):
            async for output in client.generate(case.request_id, case.prompt_token_ids, case.params):
                progress[case.request_id] += len(output.new_token_ids)

        async def run():
            tasks = [asyncio.ensure_future(stream(c)) for c in cases]
            if role == "decode":
                while min(progress.values()) < 3:
                    assert not any(t.done() for t in tasks)
                    await asyncio.sleep(0.01)
            os.kill(engine_pid, signal.SIGKILL)
            return await asyncio.gather(*tasks, return_exceptions=True)

        results = loop.run(run())
        failed = [r for r in results if isinstance(r, BaseException)]
        if role == "decode":  # every stream was on decode-0, and each says why it ended
            assert len(failed) == len(cases)
            for error in failed:
                assert isinstance(error, EngineDeadError), error
                assert f"decode instance {name} failed" in str(error), error
                assert f"the engine process (pid {engine_pid}) died (killed by SIGKILL)" in str(error), error
        # prefill: whatever was queued there is re-routed or failed with a clear error, never hangs
        for error in failed:
            assert isinstance(error, EngineDeadError), error

        async def wait_replaced():
            while not (state.up and state.num_restarts == 1):
                await asyncio.sleep(0.1)
        loop.run(asyncio.wait_for(wait_replaced(), DEADLINE_S))
        router = client.get_stats().extra["router"]
        assert router["num_instance_failures_total"] == 1 and router["num_instance_restarts_total"] == 1
        later = make_cases(f"after-{role}-kill", 12, [30, 31, 32], [8])
        got = loop.run(collect_all(client, later))
        expected = reference_outputs(tiny_config(tiny_model_dir, max_num_batched_tokens=64), later)
        for case in later:
            assert token_ids(got[case.request_id]) == token_ids(expected[case.request_id])
        assert_no_leaks(loop.run(wait_until_drained(client)))
        assert not alive(engine_pid)
    finally:
        loop.run(client.shutdown())
        loop.close()



# ---- where the engine process computes (--cpu-threads-bind) ----
def _thread_affinity(pid: int) -> dict[tuple[int, str], set[int]]:
    """(thread id, name) -> the cores it may run on, for every thread of pid."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                found[int(tid), f.read().strip()] = os.sched_getaffinity(int(tid))
        except OSError:
            continue
    return found


def test_cpu_threads_bind_parses_and_refuses_what_cannot_work():
    from serving.config import parse_cores
    from serving.engine.cpu_placement import engine_placement
    assert parse_cores("0-2,5") == (0, 1, 2, 5)
    for bad in ("x", "1-", "0,0", "-1", ""):
        with pytest.raises(ValueError, match="cpu-threads-bind"):
            parse_cores(bad)
    with pytest.raises(ValueError, match="may only use cores"):
        engine_placement(bind="4096")
    with pytest.raises(ValueError, match="colocated"):
        Config.from_dict({"deploy": {"mode": "disaggregated", "cpu_threads_bind": "0"}})
    allowed = sorted(os.sched_getaffinity(0))
    auto = engine_placement(bind="auto")
    assert auto.pin and auto.cores == (tuple(allowed[:-1]) if len(allowed) > 1 else tuple(allowed))
    assert auto.num_threads == len(auto.cores)
    nobind = engine_placement(bind="nobind")
    assert not nobind.pin and nobind.num_threads == len(allowed)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores: one to compute, one left over")
def test_auto_bind_pins_the_compute_thread_and_moves_the_rest_off_its_core(tiny_model_dir):
    """auto: the engine loop (the compute thread, OpenMP's master) on the first core alone; zmq's I/O
    thread and the input thread, born on that core, moved to the core left to the API server; the
    outputs are those of an unbound engine process."""
    allowed = sorted(os.sched_getaffinity(0))

    async def run(llm):
        try:
            tokens = [o.new_token_ids async for o in llm.generate("r", list(range(10, 60)), greedy(8))]
            return tokens, _thread_affinity(llm.core.pid), llm.core.pid
        finally:
            await llm.shutdown()

    tokens, threads, pid = asyncio.run(asyncio.wait_for(run(make_llm(tiny_model_dir, cpu_threads_bind="auto")),
                                                   DEADLINE_S))
    names = {name for _, name in threads}
    assert {"pdserve-eng-in", "ZMQbg/IO/0"} <= names, names
    for (tid, name), cores in threads.items():  # the engine loop (the main thread) computes; the rest moved
        assert cores == ({allowed[0]} if tid == pid else {allowed[-1]}), f"thread {tid} ({name}): {cores}"
    unbound_tokens, unbound, _ = asyncio.run(asyncio.wait_for(
        run(make_llm(tiny_model_dir, cpu_threads_bind="nobind")), DEADLINE_S))
    assert all(cores == set(allowed) for cores in unbound.values()), unbound
    assert tokens == unbound_tokens
