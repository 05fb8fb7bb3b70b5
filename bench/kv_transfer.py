"""KV transfer benchmark: gRPC (and shared-memory) transfer vs a raw TCP socket, and how much of the
transfer layer-wise streaming hides behind prefill compute.

    python -m bench.kv_transfer [--json results.json] [--model-dir DIR]

(a) Throughput, per prompt length of the `small` model (its KV: 24 KiB per token): one request's
    KV moved from a prefill-side kv_cache to a receiver process's kv_cache (in shared memory) through
    KVSender / KVReceiver: gRPC payloads, shared-memory slabs (shm), and one-sided writes into the
    receiver's pool (one_sided), with the receiver process's CPU time per GB moved (from
    /proc/<pid>/task/*/schedstat); against a raw TCP socket on loopback
    moving the same number of bytes from one buffer to another. For reference also: the same socket
    with pack_kv / unpack_kv around it (tcp+pack), and the gRPC transport alone (grpc_wire: the
    same PushChunk messages, prebuilt, to an endpoint that drops them). Methods run interleaved, each repetition in a
    fresh order, so machine noise hits them alike; the table gives medians and the median of the
    per-repetition ratios to raw TCP.
(b) Hidden share: prefill of the small model alone (t_prefill), the transfer alone (t_transfer),
    and prefill sending each layer as it finishes (t_streamed, up to the acknowledgement):
    hidden = 1 - (t_streamed - t_prefill) / t_transfer.
(c) 1P1D with a busy decode process (bench/kv_transfer_1p1d.py): a decode engine process keeps a
    batch decoding while a prefill engine sends each prompt's KV (~6 MiB) to it; transfer time and
    TTFT per path, and their ratios, from one run.
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import random
import socket
import statistics
import struct
import tempfile
import threading
import time
from concurrent import futures

import grpc
import torch
from tqdm import tqdm

from pdkernels.ops import pack_kv, unpack_kv, write_kv
from kvcache.transfer import KVLayout, KVReceiver, KVSender, ReceiverServer, TransferConfig, wire
from kvcache.transfer._proto import kv_transfer_pb2 as pb

PIPE_TIMEOUT_S = 120.0
_SINK_SERVICE = "pdserve.bench.Sink"
_HEADER = struct.Struct("!QB")  # payload bytes, mode (0: raw bytes, 1: unpack into the cache)
# TransferConfig changes that pick each KV path (the receiver's pool is in shared memory)
PATH_CONFIG = {"grpc": {"enable_shm": False}, "shm": {"one_sided": False}, "one_sided": {}}


# ---- receiver processes ----
class _FreeingAllocator:
    """Decode-side allocator for the benchmark: blocks return to the pool as soon as a transfer ends."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.lock = threading.Lock()
        self.free = list(range(num_blocks))
        self.owned: dict[str, list[int]] = {}

    def reserve(self, request_id, num_tokens):
        num_blocks = -(-num_tokens // self.block_size)
        with self.lock:
            if num_blocks > len(self.free):
                return None
            self.owned[request_id], self.free = self.free[:num_blocks], self.free[num_blocks:]
            return list(self.owned[request_id])

    def release(self, request_id):
        with self.lock:
            self.free.extend(self.owned.pop(request_id))

    def on_transfer_complete(self, request_id, first_token_id=None):
        self.release(request_id)

    def on_transfer_failed(self, request_id, reason):
        pass


def _sink(message: bytes, context) -> bytes:
    """Transport-only endpoint: parse a chunk in place and drop it."""
    _, payload = wire.parse_chunk(message)
    return pb.ChunkAck(num_bytes_written=len(payload)).SerializeToString()


def _kv_receiver_main(conn, layout: KVLayout, num_blocks: int, config: TransferConfig) -> None:
    # One torch thread: copies are memory-bound, and idle OpenMP workers spinning after each copy
    # would take the second core from the peer process. Same for every process in part (a).
    torch.set_num_threads(1)
    pool = layout.cache_layout.allocate_shared(num_blocks)  # as a decode instance's: one-sided writes possible
    server = ReceiverServer(KVReceiver(pool.tensor, layout, _FreeingAllocator(num_blocks, layout.block_size), config,
                                       pool=pool))
    server.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SINK_SERVICE, {
        "Push": grpc.unary_unary_rpc_method_handler(_sink, wire.identity, wire.identity)}),))
    server.start()
    conn.send(server.address)
    conn.poll(24 * 3600.0)  # until the parent says stop (or dies: the pipe closes)
    server.stop(grace_s=0.5)


def _tcp_receiver_main(conn, layout: KVLayout, num_blocks: int) -> None:
    """Receive [header][payload] messages into one preallocated buffer; mode 1 also unpacks them."""
    torch.set_num_threads(1)
    kv_cache = torch.zeros(layout.num_layers, 2, num_blocks, *layout.block_shape, dtype=layout.torch_dtype)
    buffer = bytearray(kv_cache.numel() * kv_cache.element_size())
    view = memoryview(buffer)
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname()[1])
    peer, _ = listener.accept()
    with peer:
        while True:
            header = peer.recv(_HEADER.size, socket.MSG_WAITALL)
            if len(header) < _HEADER.size:
                return
            num_bytes, mode = _HEADER.unpack(header)
            num_received = 0
            while num_received < num_bytes:
                num_received += peer.recv_into(view[num_received:num_bytes])
            if mode == 1:
                num_layer_blocks = num_bytes // layout.num_bytes_per_layer_block
                packed = torch.frombuffer(buffer, dtype=layout.torch_dtype, count=num_bytes // layout.torch_dtype.itemsize)
                packed = packed.view(layout.num_layers, 2, num_layer_blocks // layout.num_layers, *layout.block_shape)
                unpack_kv(packed, kv_cache, torch.arange(packed.shape[2]))
            peer.sendall(b"k")


def process_cpu_s(pid: int) -> float:
    """CPU time (user + system) of every live thread of a process, in seconds, at ns resolution."""
    total_ns = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total_ns += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread exited meanwhile
    return total_ns / 1e9


def _spawn(target, *args):
    context = mp.get_context("spawn")
    parent_conn, child_conn = context.Pipe()
    process = context.Process(target=target, args=(child_conn, *args), daemon=True)
    process.start()
    deadline = time.monotonic() + PIPE_TIMEOUT_S
    while not parent_conn.poll(0.5):
        if not process.is_alive() or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{target.__name__} died or did not start within {PIPE_TIMEOUT_S:g} s")
    return process, parent_conn, parent_conn.recv()


def _stop(process, conn) -> None:
    conn.send("stop")
    process.join(PIPE_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join(PIPE_TIMEOUT_S)


class _WireSender:
    """The transport alone: prebuilt PushChunk messages sent to the sink, no pack/unpack, no
    reservation; same channels, message size and concurrency as KVSender."""

    def __init__(self, address: str, config: TransferConfig) -> None:
        options = wire.grpc_options(config) + [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.insecure_channel(address, options=options) for _ in range(config.num_channels)]
        self.calls = [c.unary_unary(f"/{_SINK_SERVICE}/Push", wire.identity, wire.identity) for c in self.channels]
        self.executor = futures.ThreadPoolExecutor(config.num_streams)
        self.max_chunk_bytes = config.max_chunk_bytes

    def build(self, packed: torch.Tensor) -> list[bytes]:
        flat = packed.view(-1).view(torch.uint8)                                      # [num_bytes]
        messages = []
        for start in range(0, flat.numel(), self.max_chunk_bytes):
            piece = flat[start:start + self.max_chunk_bytes]
            message, payload = wire.new_chunk_message(pb.ChunkHeader(num_bytes=piece.numel()))
            payload.copy_(piece)
            messages.append(message)
        return messages

    def time_send(self, messages: list[bytes]) -> float:
        start = time.perf_counter()
        sent = [self.executor.submit(self.calls[i % len(self.calls)], m, timeout=600.0)
                for i, m in enumerate(messages)]
        for future in sent:
            future.result()
        return time.perf_counter() - start

    def close(self) -> None:
        self.executor.shutdown()
        for channel in self.channels:
            channel.close()


# ---- one measurement each ----
def _time_kv_transfer(sender: KVSender, request_id: str, num_tokens: int, block_ids: list[int],
                      timeout_s: float = 600.0) -> float:
    start = time.perf_counter()
    handle = sender.begin(request_id, num_tokens, block_ids)
    handle.send_layers(0, sender.layout.num_layers)
    result = handle.finish(timeout_s)
    if not result.ok:
        raise RuntimeError(f"transfer {request_id} failed: {result.reason}")
    return time.perf_counter() - start


def _time_tcp(sock: socket.socket, payload: memoryview, mode: int, pack=lambda: None) -> float:
    start = time.perf_counter()
    pack()
    sock.sendall(_HEADER.pack(len(payload), mode))
    sock.sendall(payload)
    if sock.recv(1) != b"k":
        raise RuntimeError("the TCP receiver closed the connection")
    return time.perf_counter() - start


def run_throughput(layout: KVLayout, token_counts: list[int], num_reps: int, config: TransferConfig) -> list[dict]:
    max_blocks = layout.num_blocks_for(max(token_counts))
    src = torch.randn(layout.num_layers, 2, max_blocks, *layout.block_shape).to(layout.torch_dtype)
    kv_process, kv_conn, kv_address = _spawn(_kv_receiver_main, layout, max_blocks, config)
    tcp_process, tcp_conn, tcp_port = _spawn(_tcp_receiver_main, layout, max_blocks)
    paths = PATH_CONFIG
    senders = {path: KVSender(src, layout, kv_address, lambda rid: None,
                              TransferConfig(**{**config.__dict__, **changes})).connect()
               for path, changes in paths.items()}
    assert senders["one_sided"].one_sided and senders["shm"].uses_shm and not senders["grpc"].uses_shm
    wire_sender = _WireSender(kv_address, config)
    sock = socket.create_connection(("127.0.0.1", tcp_port))
    rows = []
    try:
        progress = tqdm(total=len(token_counts) * num_reps, desc="kv-transfer throughput", unit="rep")
        for num_tokens in token_counts:
            num_blocks = layout.num_blocks_for(num_tokens)
            block_ids = random.Random(num_tokens).sample(range(max_blocks), num_blocks)  # holes, any order
            num_bytes = num_blocks * layout.num_layers * layout.num_bytes_per_layer_block
            packed = torch.empty(layout.num_layers, 2, num_blocks, *layout.block_shape, dtype=layout.torch_dtype)
            raw = memoryview(packed.numpy()).cast("B")
            ids = torch.tensor(block_ids)
            messages = wire_sender.build(pack_kv(src, ids))
            methods = {
                "grpc_wire": lambda: wire_sender.time_send(messages),
                "tcp_raw": lambda: _time_tcp(sock, raw, 0),
                "tcp_pack": lambda: _time_tcp(sock, raw, 1, lambda: pack_kv(src, ids, out=packed)),
                **{path: (lambda rep, path=path: _time_kv_transfer(senders[path], f"{path}{num_tokens}-{rep}",
                                                                     num_tokens, block_ids)) for path in paths},
            }
            seconds = {name: [] for name in methods}
            receiver_cpu_s = {path: 0.0 for path in paths}
            for rep in range(num_reps + 1):  # rep 0 warms up every path (page faults, connections)
                order = list(methods)
                random.Random(rep).shuffle(order)
                for name in order:
                    fn = methods[name]
                    cpu_before = process_cpu_s(kv_process.pid)
                    elapsed = fn(rep) if name in paths else fn()
                    if rep:
                        seconds[name].append(elapsed)
                        if name in paths:
                            receiver_cpu_s[name] += process_cpu_s(kv_process.pid) - cpu_before
                if rep:
                    progress.update()
            row = _throughput_row(num_tokens, num_bytes, seconds)
            for path, cpu_s in receiver_cpu_s.items():  # receiver CPU seconds per GB moved
                row[f"{path}_receiver_cpu_s_per_gb"] = cpu_s / (num_bytes * num_reps / 1e9)
            rows.append(row)
        progress.close()
    finally:
        sock.close()
        wire_sender.close()
        for sender in senders.values():
            sender.close()
        _stop(kv_process, kv_conn)
        tcp_process.join(PIPE_TIMEOUT_S)
        tcp_conn.close()
    return rows


def _throughput_row(num_tokens: int, num_bytes: int, seconds: dict[str, list[float]]) -> dict:
    row = {"num_tokens": num_tokens, "num_bytes": num_bytes, "mib": num_bytes / 1024**2}
    for name, times in seconds.items():
        row[f"{name}_gbps"] = num_bytes / statistics.median(times) / 1e9
        for baseline in ("tcp_raw", "tcp_pack"):
            if name != baseline:  # same-repetition ratios: both saw the same machine load
                row[f"{name}_pct_of_{baseline}"] = 100 * statistics.median(
                    t_base / t for t_base, t in zip(seconds[baseline], times))
    return row


# ---- (b) layer-wise streaming behind prefill ----
class _PrefillAttention:
    """attn(layer_idx, q, k, v) for one prompt: writes k/v into the paged cache, causal attention."""

    def __init__(self, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int) -> None:
        self.kv_cache = kv_cache
        self.slot_mapping = slot_mapping      # [T] int64
        self.num_heads = num_heads

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        write_kv(k, v, self.kv_cache[layer_idx, 0], self.kv_cache[layer_idx, 1], self.slot_mapping)
        group = self.num_heads // k.shape[1]
        q_, k_, v_ = (x.transpose(0, 1) for x in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
        out = torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, is_causal=True)   # [Hq, T, D]
        return out.transpose(0, 1)                                                           # [T, Hq, D]


def _prefill(model, kv_cache: torch.Tensor, block_ids: list[int], num_tokens: int, on_layer_done) -> None:
    config = model.config
    block_size = kv_cache.shape[3]
    positions = torch.arange(num_tokens)
    slots = torch.tensor(block_ids)[positions // block_size] * block_size + positions % block_size   # [T]
    attn = _PrefillAttention(kv_cache, slots, config.num_heads)
    input_ids = torch.randint(0, config.vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(num_tokens))
    hidden, residual = None, None
    with torch.inference_mode():
        for layer in range(config.num_layers):
            hidden, residual = model.forward(input_ids, positions, attn, layer, layer + 1, hidden, residual)
            on_layer_done(layer)


def run_hidden_share(model_dir: str, prompt_lens: list[int], num_reps: int, config: TransferConfig,
                     paths: list[str], prefill_threads: list[int]) -> list[dict]:
    from serving.models import load_model  # serving is only needed for this part
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    default_threads = torch.get_num_threads()
    arch = model.config
    max_blocks = -(-max(prompt_lens) // 16)
    kv_cache = torch.zeros(arch.num_layers, 2, max_blocks, 16, arch.num_kv_heads, arch.head_dim)
    layout = KVLayout.from_kv_cache(kv_cache, f"small:{model_dir}")
    kv_process, kv_conn, kv_address = _spawn(_kv_receiver_main, layout, max_blocks, config)
    senders = {path: KVSender(kv_cache, layout, kv_address, lambda rid: None,
                              TransferConfig(**{**config.__dict__, **PATH_CONFIG[path]})).connect()
               for path in paths}
    rows = []
    try:
        progress = tqdm(total=len(prompt_lens) * len(paths) * len(prefill_threads) * num_reps,
                        desc="kv-transfer hidden share", unit="rep")
        for num_threads in prefill_threads:
            torch.set_num_threads(num_threads)
            for num_tokens in prompt_lens:
                block_ids = random.Random(num_tokens).sample(range(max_blocks), layout.num_blocks_for(num_tokens))
                for path, sender in senders.items():
                    row = _hidden_share_row(model, kv_cache, sender, path, num_tokens, block_ids, num_reps, progress)
                    rows.append({"prefill_threads": num_threads, **row})
        progress.close()
    finally:
        torch.set_num_threads(default_threads)
        for sender in senders.values():
            sender.close()
        _stop(kv_process, kv_conn)
    return rows


def _hidden_share_row(model, kv_cache, sender, path, num_tokens, block_ids, num_reps, progress) -> dict:
    def prefill_alone() -> float:
        start = time.perf_counter()
        _prefill(model, kv_cache, block_ids, num_tokens, lambda layer: None)
        return time.perf_counter() - start

    def streamed(rid: str) -> float:
        start = time.perf_counter()
        handle = sender.begin(rid, num_tokens, block_ids)
        _prefill(model, kv_cache, block_ids, num_tokens, lambda layer: handle.send_layers(layer, layer + 1))
        compute_end = time.perf_counter()
        result = handle.finish(600.0)
        if not result.ok:
            raise RuntimeError(f"streamed transfer {rid} failed: {result.reason}")
        end = time.perf_counter()
        times["tail"].append(end - compute_end)
        return end - start

    times = {"prefill": [], "transfer": [], "streamed": [], "tail": []}
    prefill_alone()  # warm-up: allocator, thread pools, page faults
    for rep in range(num_reps):
        runs = {"prefill": prefill_alone,
                "transfer": lambda: _time_kv_transfer(sender, f"t{path}{num_tokens}-{rep}", num_tokens, block_ids),
                "streamed": lambda: streamed(f"s{path}{num_tokens}-{rep}")}
        order = list(runs)
        random.Random(rep).shuffle(order)
        for name in order:
            times[name].append(runs[name]())
        progress.update()
    t_prefill, t_transfer, t_streamed, t_tail = (statistics.median(times[k])
                                                 for k in ("prefill", "transfer", "streamed", "tail"))
    # Exposed time from same-repetition pairs (run back to back), less sensitive to load drifting.
    pairs = [s - p for s, p in zip(times["streamed"], times["prefill"])]
    exposed = statistics.median(pairs)
    return {"path": path, "num_tokens": num_tokens, "t_prefill_s": t_prefill, "t_transfer_s": t_transfer,
            "t_streamed_s": t_streamed, "exposed_s": exposed, "hidden_pct": 100 * (1 - exposed / t_transfer),
            # The resolution of exposed_s: how much prefill alone varies between repetitions.
            "prefill_spread_s": max(times["prefill"]) - min(times["prefill"]),
            # Measured inside the streamed run: acknowledgement minus end of the last layer's compute.
            "tail_s": t_tail, "hidden_tail_pct": 100 * (1 - t_tail / t_transfer)}


# ---- report ----
def _print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    print(f"\n{title}")
    print(" | ".join(f"{header:>{max(len(header), 9)}}" for header, _, _ in columns))
    for row in rows:
        print(" | ".join(f"{format(row[key], fmt):>{max(len(header), 9)}}" for header, key, fmt in columns))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 2048, 4096],
                        help="prompt lengths whose KV (small model layout) part (a) moves")
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[1024, 2048, 4096],
                        help="prompt lengths prefilled in part (b)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per point in part (a)")
    parser.add_argument("--hidden-reps", type=int, default=3, help="repetitions per point in part (b)")
    parser.add_argument("--prefill-threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="torch threads for part (b); 1 leaves a core free for the transfer, as an "
                             "accelerator would leave the host CPU free")
    parser.add_argument("--paths", nargs="+", default=["grpc"], choices=list(PATH_CONFIG),
                        help="transfer paths timed in part (b)")
    parser.add_argument("--chunk-mib", type=float, default=TransferConfig.max_chunk_bytes / 1024**2,
                        help="TransferConfig.max_chunk_bytes in MiB")
    parser.add_argument("--num-streams", type=int, default=TransferConfig.num_streams)
    parser.add_argument("--num-channels", type=int, default=TransferConfig.num_channels)
    parser.add_argument("--model-dir", help="the small model (made with `pdserve make-model --size small`); "
                                            "default: made in a temporary directory")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-hidden", action="store_true")
    parser.add_argument("--skip-busy", action="store_true", help="skip part (c), 1P1D with a busy decode process")
    from bench.kv_transfer_1p1d import add_arguments
    add_arguments(parser, list(PATH_CONFIG))
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    default_threads = torch.get_num_threads()
    config = TransferConfig(max_chunk_bytes=int(args.chunk_mib * 1024**2), num_streams=args.num_streams,
                            num_channels=args.num_channels, rpc_timeout_s=60.0)
    results: dict = {"config": {k: v for k, v in config.__dict__.items()}, "argv": argv}
    with tempfile.TemporaryDirectory(prefix="pdserve-small-") as tmp_dir:
        model_dir = args.model_dir or _make_small_model(tmp_dir)
        from serving.models import ModelArchConfig
        arch = ModelArchConfig.from_model_dir(model_dir)
        layout = KVLayout("small", "float32", 16, arch.num_layers, arch.num_kv_heads, arch.head_dim)
        if not args.skip_throughput:
            torch.set_num_threads(1)  # as in the receiver processes
            results["throughput"] = run_throughput(layout, args.tokens, args.reps, config)
            _print_table("(a) throughput, one request's KV (GB/s; % of raw TCP = median same-rep ratio)",
                         results["throughput"], [
                             ("tokens", "num_tokens", "d"), ("MiB", "mib", ".0f"),
                             ("tcp_raw", "tcp_raw_gbps", ".2f"), ("tcp+pack", "tcp_pack_gbps", ".2f"),
                             ("grpc_wire", "grpc_wire_gbps", ".2f"), ("wire %tcp", "grpc_wire_pct_of_tcp_raw", ".0f"),
                             ("grpc", "grpc_gbps", ".2f"), ("grpc %tcp", "grpc_pct_of_tcp_raw", ".0f"),
                             ("grpc %tcp+pack", "grpc_pct_of_tcp_pack", ".0f"),
                             ("shm", "shm_gbps", ".2f"), ("shm %tcp", "shm_pct_of_tcp_raw", ".0f"),
                             ("1-sided", "one_sided_gbps", ".2f"), ("1-sided %tcp", "one_sided_pct_of_tcp_raw", ".0f"),
                             ("rcv cpu s/GB grpc", "grpc_receiver_cpu_s_per_gb", ".3f"),
                             ("shm", "shm_receiver_cpu_s_per_gb", ".3f"),
                             ("1-sided", "one_sided_receiver_cpu_s_per_gb", ".3f"),
                             ("tcp+pack %tcp", "tcp_pack_pct_of_tcp_raw", ".0f")])
        if not args.skip_hidden:
            torch.set_num_threads(default_threads)
            results["hidden_share"] = run_hidden_share(model_dir, args.prompt_lens, args.hidden_reps, config,
                                                       args.paths, args.prefill_threads)
            _print_table("(b) layer-wise streaming behind prefill (seconds; exposed = median same-rep "
                         "t_streamed - t_prefill, hidden = 1 - exposed / t_transfer; tail = ack - end of "
                         "compute in the streamed run, hidden tail = 1 - tail / t_transfer)",
                         results["hidden_share"], [
                             ("threads", "prefill_threads", "d"), ("path", "path", "s"),
                             ("tokens", "num_tokens", "d"), ("prefill", "t_prefill_s", ".3f"),
                             ("transfer", "t_transfer_s", ".3f"), ("streamed", "t_streamed_s", ".3f"),
                             ("exposed", "exposed_s", ".3f"), ("± spread", "prefill_spread_s", ".3f"),
                             ("hidden %", "hidden_pct", ".0f"), ("tail", "tail_s", ".3f"),
                             ("hidden tail %", "hidden_tail_pct", ".0f")])
        if not args.skip_busy:
            from bench.kv_transfer_1p1d import BUSY_COLUMNS, run_from_args
            results["busy_decode"] = run_from_args(args, model_dir)
            _print_table("(c) 1P1D, decode process busy decoding a batch (seconds; medians unless marked; "
                         "x = ratio to one_sided, same run)", results["busy_decode"]["summary"], BUSY_COLUMNS)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _make_small_model(out_dir: str) -> str:
    from serving.models.make_model import make_model
    return make_model("small", out_dir)


if __name__ == "__main__":
    raise SystemExit(main())
