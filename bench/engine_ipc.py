"""What the engine process boundary costs per step: the engine core on a thread of this process
(EngineThread) against the same engine in a process of its own (EngineProcess).

    python -m bench.engine_ipc --model DIR [--batch-sizes 1,64] [--prompt-len 32] [--output-len 64]
                               [--repeats 3] [--json out.json]

For each batch size, that many greedy requests (distinct prompts, ignore_eos) run together; the
decode time per step is measured where the API consumes it — from the step that gave every request
its first token to the step that finished the last — so it includes encoding, the socket, decoding
and the hop onto the event loop. Both backends live side by side and take turns, so a loaded
machine slows both alike; the ratio column is the median, over the repeats, of process over thread
measured back to back (1.00: the boundary is free).

It first times one OUTPUTS message of 1 and of 64 outputs alone (`--codec-only`: only that): its
encoding (the engine's cost per step), its decoding (the API's), and the whole trip through msgpack
+ zmq ipc (what EngineProcess uses) against pickle + a multiprocessing Pipe, sender and receiver in
two threads of one process (a pessimistic bound: they share a GIL).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pickle
import random
import statistics
import tempfile
import threading
import time

from scheduler.engine_core import EngineCoreOutput
from scheduler.sampling_params import SamplingParams


def make_prompts(batch: int, prompt_len: int, seed: int, vocab_size: int = 2048) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab_size) for _ in range(prompt_len)] for _ in range(batch)]


async def time_decode_steps(core, prompts: list[list[int]], output_len: int, tag: str) -> float:
    """Seconds per decode step as the API sees it."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    first: list[float] = []
    last: list[float] = []

    async def one(i: int) -> None:
        got_first = False
        async for output in core.generate(f"{tag}-{i}", prompts[i], params):
            if not got_first and output.new_token_ids:
                first.append(time.perf_counter())
                got_first = True
            if output.finished:
                last.append(time.perf_counter())

    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return (max(last) - max(first)) / (output_len - 1)


def make_core(kind: str, config):
    from serving.engine.engine import build_engine
    from serving.engine.engine_process import EngineProcess
    from serving.engine.engine_thread import EngineThread
    return EngineProcess(config) if kind == "process" else EngineThread(build_engine(config))


def bench_backends(args) -> list[dict]:
    """Both backends live at once and take turns (order flipped every repeat), so that a shared,
    loaded machine slows both alike; the idle one sleeps."""
    from serving.config import Config
    config = Config().replace(model=args.model, max_num_seqs=max(args.batch_sizes),
                              max_num_batched_tokens=max(2048, max(args.batch_sizes) * args.prompt_len),
                              enable_prefix_caching=False)
    cores = {kind: make_core(kind, config) for kind in ("thread", "process")}

    async def run() -> dict[tuple[str, int], list[float]]:
        for kind, core in cores.items():
            await time_decode_steps(core, make_prompts(4, args.prompt_len, 0), 8, f"warmup-{kind}")
        times: dict[tuple[str, int], list[float]] = {}
        for repeat in range(args.repeats):
            order = ["thread", "process"] if repeat % 2 == 0 else ["process", "thread"]
            for batch in args.batch_sizes:
                prompts = make_prompts(batch, args.prompt_len, 100 * repeat + batch)
                for kind in order:
                    seconds = await time_decode_steps(cores[kind], prompts, args.output_len, f"{kind}-{repeat}-{batch}")
                    times.setdefault((kind, batch), []).append(seconds)
        for core in cores.values():
            await core.shutdown()
        return times

    times = asyncio.run(run())
    cores["thread"].engine.close()
    return [{"backend": kind, "batch": batch, "ms_per_step": 1000 * statistics.median(values),
             "min_ms_per_step": 1000 * min(values), "all_ms": [round(1000 * v, 3) for v in values]}
            for (kind, batch), values in sorted(times.items())]


# ---- the message alone ----
def sample_outputs(batch: int) -> list[EngineCoreOutput]:
    return [EngineCoreOutput(f"cmpl-{i:08x}-0", [1000 + i], num_prompt_tokens=128, num_output_tokens=37)
            for i in range(batch)]


def bench_zmq_msgpack(outputs: list[EngineCoreOutput], count: int) -> tuple[float, int]:
    import zmq

    from serving.engine import core_messages as m
    with tempfile.TemporaryDirectory() as directory:
        address = f"ipc://{directory}/bench"
        context = zmq.Context()
        pull = context.socket(zmq.PULL)
        pull.bind(address)
        push = context.socket(zmq.PUSH)
        push.connect(address)
        size = len(m.outputs_message(outputs, None))

        def receive() -> None:
            for _ in range(count):
                [m.decode_output(v) for v in m.unpack(pull.recv(copy=False).buffer)[1]]

        receiver = threading.Thread(target=receive)
        started = time.perf_counter()
        receiver.start()
        for _ in range(count):
            push.send(m.outputs_message(outputs, None), copy=False)
        receiver.join()
        elapsed = time.perf_counter() - started
        push.close()
        pull.close()
        context.term()
    return elapsed / count, size


def bench_pipe_pickle(outputs: list[EngineCoreOutput], count: int) -> tuple[float, int]:
    receive_end, send_end = multiprocessing.Pipe(duplex=False)
    size = len(pickle.dumps(outputs, protocol=pickle.HIGHEST_PROTOCOL))

    def receive() -> None:
        for _ in range(count):
            receive_end.recv()

    receiver = threading.Thread(target=receive)
    started = time.perf_counter()
    receiver.start()
    for _ in range(count):
        send_end.send(outputs)
    receiver.join()
    elapsed = time.perf_counter() - started
    return elapsed / count, size


def bench_codec(batch: int, count: int) -> list[dict]:
    import timeit

    from serving.engine import core_messages as m
    outputs = sample_outputs(batch)
    data = m.outputs_message(outputs, None)
    number = max(10, count // 4)
    encode = min(timeit.repeat(lambda: m.outputs_message(outputs, None), number=number, repeat=5)) / number
    decode = min(timeit.repeat(lambda: [m.decode_output(v) for v in m.unpack(data)[1]], number=number,
                               repeat=5)) / number
    rows = [{"transport": "msgpack encode (engine side)", "batch": batch, "us_per_message": 1e6 * encode,
             "bytes": len(data)},
            {"transport": "msgpack decode (API side)", "batch": batch, "us_per_message": 1e6 * decode,
             "bytes": len(data)}]
    for name, fn in (("zmq ipc + msgpack", bench_zmq_msgpack), ("multiprocessing Pipe + pickle", bench_pipe_pickle)):
        seconds, size = min((fn(outputs, count) for _ in range(3)), key=lambda r: r[0])
        rows.append({"transport": name, "batch": batch, "us_per_message": 1e6 * seconds, "bytes": size})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_ipc")
    parser.add_argument("--model", help="model directory (not needed with --codec-only)")
    parser.add_argument("--batch-sizes", default="1,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codec-only", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result: dict = {"load_before": os.getloadavg(), "codec": bench_codec(1, 2000) + bench_codec(64, 2000)}
    for row in result["codec"]:
        print(f"{row['transport']:<32} batch {row['batch']:>3}: {row['us_per_message']:8.1f} us/message, "
              f"{row['bytes']} bytes")
    if not args.codec_only:
        if not args.model:
            parser.error("--model is needed unless --codec-only")
        rows = result["steps"] = bench_backends(args)
        by_key = {(r["backend"], r["batch"]): r for r in rows}
        print(f"{'batch':>5} {'thread ms/step':>15} {'process ms/step':>16} {'ratio':>6}   (median [min]; ratio: "
              "median of the back-to-back pairs)")
        for batch in args.batch_sizes:
            thread, process = by_key[("thread", batch)], by_key[("process", batch)]
            pairs = [p / t for p, t in zip(process["all_ms"], thread["all_ms"])]
            process["paired_ratio"] = statistics.median(pairs)
            print(f"{batch:>5} {thread['ms_per_step']:>8.2f} [{thread['min_ms_per_step']:5.2f}] "
                  f"{process['ms_per_step']:>8.2f} [{process['min_ms_per_step']:5.2f}] "
                  f"{process['paired_ratio']:>6.2f}")
    result["load_after"] = os.getloadavg()
    print(f"load average before {result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
