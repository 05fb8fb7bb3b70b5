"""Part (c) of bench/kv_transfer.py: 1P1D on one host with a decode process kept busy.

The decode instance is an engine process (build_engine(role="decode"), the small model, its KV pool
in shared memory) that keeps a batch of `num_busy` requests decoding all the time, as a loaded decode
instance does. Two measurements against it, per KV path (gRPC payloads, shared-memory slabs,
one-sided writes), the paths alternating in a fresh order each round so that machine noise hits them
alike:

1. The transfer alone: a KVSender in this process hands one prompt's KV (`prompt_len` tokens: 256 are
   6 MiB) over at once, `num_requests` times per round; raw_s = begin() -> acknowledgement.
2. 1P1D: one prefill engine per path in this process; bursts of `num_requests` prompts arrive every
   `interval_s`, and the prefill engine sends each prompt's KV to the busy decode engine. Per request:

    ttft_s       arrival -> the prefill engine's first token
    transfer_s   begin() -> acknowledgement (includes the prefill forward the sends stream behind)
    tail_s       last layers handed to the transfer -> acknowledgement: what the transfer adds after
                 the forward (all of the transfer when it is sent in one group)

and per burst the decode process's tokens/s. The prefill's KV pool holds `prefill_pool_prompts`
prompts, so that KV leased to slow transfers holds new prefills back, as on a real instance.
`layers_per_group` 12 (the whole small model, the default here) sends the KV once the forward is
done, so that tail_s is the whole transfer; 1 streams it layer by layer behind the forward.
`python_thread` adds a pure-Python thread to the decode process (it holds the GIL but at switch
intervals), standing for a decode loop heavy on Python: the condition the issue describes, where
landing a chunk waits for the decode process's GIL.
"""
from __future__ import annotations

import multiprocessing as mp
import random
import statistics
import time

import torch

PIPE_TIMEOUT_S = 300.0
MAX_MODEL_LEN = 1024
KV_BYTES_PER_TOKEN = 12 * 2 * 4 * 64 * 4  # small model, float32: 24 KiB


def _config(model_dir: str, kv_tokens: int, **deploy):
    from serving.config import Config
    return Config.from_dict({"model": model_dir, "max_model_len": MAX_MODEL_LEN, "log_level": "warning",
                             "kv_cache_memory_bytes": kv_tokens * KV_BYTES_PER_TOKEN, "max_num_seqs": 64,
                             "max_num_batched_tokens": 1024, "enable_prefix_caching": False,
                             "kv_transfer_stall_timeout_s": 120.0, "kv_transfer_rpc_timeout_s": 60.0, **deploy})


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(100, 30000) for _ in range(length)]


# ---- the decode process ----
def _python_bound_work() -> None:
    """Pure-Python work that holds the GIL except at switch intervals (5 ms): what a decode loop
    heavy on Python (scheduling, sampling, detokenizing big batches) does to its process's threads."""
    total = 0
    while True:
        for i in range(10_000):
            total += i


def _decode_main(conn, model_dir: str, num_busy: int, busy_prompt_len: int, busy_max_tokens: int,
                 kv_tokens: int, python_thread: bool) -> None:
    import threading
    from scheduler.sampling_params import SamplingParams
    from serving.engine.engine import build_engine
    torch.set_num_threads(1)
    if python_thread:
        threading.Thread(target=_python_bound_work, name="python-bound-work", daemon=True).start()
    engine = build_engine(_config(model_dir, kv_tokens), "decode")
    conn.send((engine.connector.address, engine.kv_layout))
    rng = random.Random(0)
    busy = SamplingParams(temperature=0.0, max_tokens=busy_max_tokens, ignore_eos=True)
    num_busy_added = num_tokens = 0

    def add_busy() -> None:
        nonlocal num_busy_added
        engine.add_request(f"busy-{num_busy_added}", _prompt(rng, busy_prompt_len), busy)
        num_busy_added += 1

    for _ in range(num_busy):
        add_busy()
    while True:
        while conn.poll(0):
            command = conn.recv()
            if command[0] == "stop":
                engine.close()
                conn.send("stopped")
                return
            if command[0] == "expect":  # what the router does first: reserve blocks for a remote prefill
                _, request_id, prompt, max_tokens = command
                engine.add_request(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                      ignore_eos=True), remote_prefill=True)
            elif command[0] == "tokens":
                conn.send(num_tokens)
            elif command[0] == "first_token":  # what the router hands over when the commit did not
                engine.set_first_token(command[1], command[2])
        for output in engine.step():
            num_tokens += len(output.new_token_ids)
            if output.accepted:
                conn.send(("accepted", output.request_id))
            if output.finished and output.request_id.startswith("busy-"):
                add_busy()  # the batch stays busy
            elif output.finished:
                conn.send(("done", output.request_id, output.kv_transfer))
        if engine.last_step_idle:
            time.sleep(0.001)


class _Decode:
    def __init__(self, model_dir: str, num_busy: int, kv_tokens: int, python_thread: bool) -> None:
        context = mp.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_decode_main, daemon=True,
                                       args=(child_conn, model_dir, num_busy, 128, 256, kv_tokens, python_thread))
        self.process.start()
        if not self.conn.poll(PIPE_TIMEOUT_S):
            raise RuntimeError("the decode process did not start")
        self.address, self.kv_layout = self.conn.recv()
        self.events: list = []

    def expect(self, requests: dict[str, list[int]], max_tokens: int) -> None:
        for request_id, prompt in requests.items():
            self.conn.send(("expect", request_id, prompt, max_tokens))
        self._wait(lambda: {e[1] for e in self.events if e[0] == "accepted"} >= set(requests))

    def wait_done(self, request_ids) -> dict[str, str]:
        self._wait(lambda: {e[1] for e in self.events if e[0] == "done"} >= set(request_ids))
        return {e[1]: e[2] for e in self.events if e[0] == "done" and e[1] in request_ids}

    def set_first_token(self, request_id: str, token_id: int) -> None:
        self.conn.send(("first_token", request_id, token_id))

    def num_tokens(self) -> int:
        self.conn.send(("tokens",))
        self._wait(lambda: self.events and isinstance(self.events[-1], int))
        return self.events.pop()

    def _wait(self, ready) -> None:
        deadline = time.monotonic() + PIPE_TIMEOUT_S
        while not ready():
            if not self.conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("the decode process stopped answering")
            self.events.append(self.conn.recv())

    def stop(self) -> None:
        self.conn.send(("stop",))
        self.process.join(PIPE_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()


# ---- the transfer alone: a KVSender in this process, all layers at once, into the busy decode ----
def _raw_transfers(decode: _Decode, paths: list[str], num_rounds: int, num_requests: int, prompt_len: int,
                   rng: random.Random) -> list[dict]:
    """begin() -> acknowledgement of one prompt's KV (all layers handed over at once) into the busy
    decode engine, per path: the time a finished prefill waits for its KV to land."""
    from bench.kv_transfer import PATH_CONFIG
    from kvcache.transfer import KVSender, TransferConfig
    layout = decode.kv_layout
    num_blocks = layout.num_blocks_for(prompt_len)
    src = torch.randn(layout.num_layers, 2, 2 * num_blocks, *layout.block_shape)
    senders = {path: KVSender(src, layout, decode.address, lambda rid: None,
                              TransferConfig(rpc_timeout_s=60.0, **PATH_CONFIG[path])).connect() for path in paths}
    rows = []
    try:
        for round_index in range(num_rounds + 1):  # round 0 warms up
            order = list(paths)
            random.Random(round_index).shuffle(order)
            for path in order:
                prompts = {f"raw-{path}-{round_index}-{i}": _prompt(rng, prompt_len) for i in range(num_requests)}
                decode.expect(prompts, max_tokens=2)
                for request_id in prompts:
                    handle = senders[path].begin(request_id, prompt_len, rng.sample(range(2 * num_blocks), num_blocks))
                    handle.send_layers(0, layout.num_layers)
                    result = handle.finish(60.0)
                    decode.set_first_token(request_id, 1)
                    if round_index:
                        rows.append({"path": path, "seconds": result.seconds, "num_bytes": result.num_bytes,
                                     "ok": result.ok})
                decode.wait_done(list(prompts))
    finally:
        for sender in senders.values():
            sender.close()
    return rows


# ---- the prefill side, in this process ----
def _prefill_engine(model_dir: str, path: str, kv_tokens: int, layers_per_group: int):
    from bench.kv_transfer import PATH_CONFIG
    from serving.engine.engine import build_engine
    config = _config(model_dir, kv_tokens, kv_transfer_enable_shm=path != "grpc",
                     kv_transfer_layers_per_group=layers_per_group)
    engine = build_engine(config, "prefill")
    sends = engine.connector.sends
    sends.config = type(sends.config)(**{**sends.config.__dict__, **PATH_CONFIG[path]})
    # request id -> [time its last layers were handed to the transfer, ack time, begin->ack seconds, ok]
    acks: dict[str, list] = {}
    on_done, layers_done = sends._on_done, sends.layers_done
    num_layers = engine.kv_layout.num_layers

    def record_layers(request_ids, layer_start, layer_end) -> None:
        if layer_end == num_layers:
            for request_id in request_ids:
                acks.setdefault(request_id, [None, None, None, None])[0] = time.monotonic()
        layers_done(request_ids, layer_start, layer_end)

    def record_ack(result) -> None:  # the transfer's own timing, per request
        acks.setdefault(result.request_id, [None, None, None, None])[1:] = [time.monotonic(), result.seconds,
                                                                             result.ok]
        on_done(result)
    sends.layers_done, sends._on_done = record_layers, record_ack
    return engine, acks


def _burst(engine, acks, decode: _Decode, path: str, tag: str, num_requests: int, prompt_len: int,
           interval_s: float, rng: random.Random) -> list[dict]:
    from scheduler.sampling_params import SamplingParams
    prompts = {f"{tag}-{i}": _prompt(rng, prompt_len) for i in range(num_requests)}
    decode.expect(prompts, max_tokens=4)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    tokens_before, start = decode.num_tokens(), time.monotonic()
    arrivals = {rid: start + i * interval_s for i, rid in enumerate(prompts)}
    added, first = set(), {}
    while (len(first) < num_requests or any(acks.get(rid, [None, None])[1] is None for rid in prompts)
           or engine.scheduler.held):
        now = time.monotonic()
        for rid in [r for r in prompts if r not in added and arrivals[r] <= now]:
            engine.add_request(rid, prompts[rid], params, kv_peer=decode.address)
            added.add(rid)
        for output in engine.step():
            if output.new_token_ids and output.request_id not in first:
                first[output.request_id] = time.monotonic()
        if engine.last_step_idle:
            time.sleep(0.001)
        if now - start > PIPE_TIMEOUT_S:
            raise RuntimeError(f"burst {tag} did not finish")
    decode_tok_s = (decode.num_tokens() - tokens_before) / (time.monotonic() - start)
    outcomes = decode.wait_done(list(prompts))
    return [{"path": path, "request_id": rid, "ttft_s": first[rid] - arrivals[rid], "transfer_s": acks[rid][2],
             "tail_s": acks[rid][1] - acks[rid][0], "ok": acks[rid][3] and outcomes[rid] == "transferred",
             "decode_tok_s": decode_tok_s} for rid in prompts]


def run_busy_decode(model_dir: str, paths: list[str], num_rounds: int, num_requests: int, prompt_len: int,
                    interval_s: float, num_busy: int, prefill_pool_prompts: int, layers_per_group: int = 12,
                    python_thread: bool = False) -> dict:
    torch.set_num_threads(1)
    decode_kv_tokens = num_busy * 400 + len(paths) * num_requests * (prompt_len + 8) + MAX_MODEL_LEN
    decode = _Decode(model_dir, num_busy, decode_kv_tokens, python_thread)
    engines = {path: _prefill_engine(model_dir, path, max(MAX_MODEL_LEN, prefill_pool_prompts * prompt_len),
                                     layers_per_group) for path in paths}
    rows: list[dict] = []
    rng = random.Random(1)
    try:
        raw = _raw_transfers(decode, paths, num_rounds, num_requests, prompt_len, rng)
        for path, (engine, acks) in engines.items():  # warm-up: connections, page faults
            _burst(engine, acks, decode, path, f"warm-{path}", 2, prompt_len, interval_s, rng)
        for round_index in range(num_rounds):
            order = list(paths)
            random.Random(round_index).shuffle(order)
            for path in order:
                engine, acks = engines[path]
                rows += _burst(engine, acks, decode, path, f"{path}-{round_index}", num_requests, prompt_len,
                               interval_s, rng)
    finally:
        for engine, _ in engines.values():
            engine.close()
        decode.stop()
    return {"requests": rows, "raw_transfers": raw, "summary": summarize(rows, raw, paths)}


def summarize(rows: list[dict], raw: list[dict], paths: list[str]) -> list[dict]:
    summary = []
    for path in paths:
        mine = [r for r in rows if r["path"] == path]
        alone = [r["seconds"] for r in raw if r["path"] == path]
        num_bytes = max(r["num_bytes"] for r in raw if r["path"] == path)

        def stat(key: str, fn=statistics.median) -> float:
            return fn([r[key] for r in mine])
        summary.append({"path": path, "num_requests": len(mine), "num_ok": sum(r["ok"] for r in mine),
                        "raw_median_s": statistics.median(alone), "raw_p90_s": _p90(alone),
                        "raw_gbps": num_bytes / statistics.median(alone) / 1e9,
                        "ttft_median_s": stat("ttft_s"), "ttft_mean_s": stat("ttft_s", statistics.mean),
                        "ttft_p90_s": _p90([r["ttft_s"] for r in mine]),
                        "transfer_median_s": stat("transfer_s"), "transfer_mean_s": stat("transfer_s", statistics.mean),
                        "tail_median_s": stat("tail_s"), "tail_p90_s": _p90([r["tail_s"] for r in mine]),
                        "decode_tok_s": stat("decode_tok_s")})
    if "one_sided" in paths:
        base = next(s for s in summary if s["path"] == "one_sided")
        for row in summary:
            for key in ("raw_median_s", "ttft_mean_s", "transfer_mean_s", "tail_median_s"):
                row[f"{key}_vs_one_sided"] = row[key] / base[key] if base[key] else float("nan")
    return summary


# (header, key, format) of the summary table
BUSY_COLUMNS = [("path", "path", "s"), ("alone", "raw_median_s", ".3f"), ("alone p90", "raw_p90_s", ".3f"),
                ("GB/s", "raw_gbps", ".2f"), ("x", "raw_median_s_vs_one_sided", ".2f"),
                ("ok", "num_ok", "d"), ("of", "num_requests", "d"),
                ("ttft", "ttft_median_s", ".3f"), ("ttft mean", "ttft_mean_s", ".3f"), ("ttft p90", "ttft_p90_s", ".3f"),
                ("x", "ttft_mean_s_vs_one_sided", ".2f"), ("transfer", "transfer_median_s", ".3f"),
                ("transfer mean", "transfer_mean_s", ".3f"), ("x", "transfer_mean_s_vs_one_sided", ".2f"),
                ("tail", "tail_median_s", ".3f"), ("tail p90", "tail_p90_s", ".3f"),
                ("x", "tail_median_s_vs_one_sided", ".2f"), ("decode tok/s", "decode_tok_s", ".0f")]


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def add_arguments(parser, paths: list[str]) -> None:
    parser.add_argument("--busy-paths", nargs="+", default=paths, choices=paths)
    parser.add_argument("--busy-rounds", type=int, default=3, help="bursts per path in part (c)")
    parser.add_argument("--busy-requests", type=int, default=4, help="prompts per burst in part (c)")
    parser.add_argument("--busy-prompt-len", type=int, default=256, help="256 tokens: 6 MiB of KV")
    parser.add_argument("--busy-interval-s", type=float, default=2.5,
                        help="between arrivals in a burst; above the prefill time, so that TTFT is not queueing")
    parser.add_argument("--busy-batch", type=int, default=16, help="requests the decode process keeps decoding")
    parser.add_argument("--busy-layers-per-group", type=int, default=12,
                        help="--kv-transfer-layers-per-group of the prefill in part (c); 12 (all layers of the "
                             "small model): the transfer starts after the forward, all of it exposed")
    parser.add_argument("--busy-python-thread", action="store_true",
                        help="part (c): the decode process also runs a pure-Python thread (a GIL-bound decode loop)")
    parser.add_argument("--prefill-pool-prompts", type=int, default=4,
                        help="prompts the prefill engine's KV pool holds (leased KV holds new prefills back)")


def run_from_args(args, model_dir: str) -> dict:
    return run_busy_decode(model_dir, args.busy_paths, args.busy_rounds, args.busy_requests, args.busy_prompt_len,
                           args.busy_interval_s, args.busy_batch, args.prefill_pool_prompts,
                           args.busy_layers_per_group, args.busy_python_thread)
