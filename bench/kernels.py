"""Kernel micro-benchmark: each pdkernels.ops entry point against the device's own copy bandwidth and
matmul rate (measured in the same run) and against a plain torch baseline.

    python -m bench.kernels                          # CUDA, bfloat16, the target sizes of docs/kernels.md
    python -m bench.kernels --device cpu --small     # reduced sizes, float32, the torch CPU paths
    python -m bench.kernels --out results/kernels.json

Baselines: SDPA on KV already gathered into contiguous tensors (decode and prefill attention), torch
indexing (pack, unpack, KV write) and unfused torch ops (RMSNorm, rotary).
"""

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pdkernels import ops
from pdkernels.rotary import compute_cos_sin_cache


@dataclass(frozen=True)
class KernelBenchSizes:
    num_tokens: int          # rows for RMSNorm / rotary / KV write
    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    decode_batch: int
    decode_context: int
    prefill_tokens: int
    pack_layers: int
    pack_blocks: int
    copy_mib: int            # buffer size for the copy-bandwidth reference
    matmul_n: int            # square matmul size for the FLOP-rate reference

    def __post_init__(self):
        if self.num_q_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_q_heads {self.num_q_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if min(asdict(self).values()) <= 0:
            raise ValueError(f"every benchmark size must be positive: {self}")


# Targets (docs/kernels.md): decode batch 64 x 4096, 32 q / 8 KV heads, head_dim 128, block 16.
FULL_SIZES = KernelBenchSizes(8192, 4096, 32, 8, 128, 16, 64, 4096, 4096, 32, 256, 1024, 8192)
SMALL_SIZES = KernelBenchSizes(256, 1024, 8, 2, 64, 16, 8, 512, 512, 4, 64, 64, 1024)


class Timer:
    """Median seconds per call: CUDA events on CUDA, perf_counter on CPU."""

    def __init__(self, device: torch.device, num_warmup: int, num_iters: int):
        self.device, self.num_warmup, self.num_iters = device, num_warmup, num_iters

    def __call__(self, fn) -> float:
        for _ in range(self.num_warmup):
            fn()
        samples = []
        for _ in range(self.num_iters):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
        return statistics.median(samples)


def device_peaks(sizes: KernelBenchSizes, dtype: torch.dtype, device: torch.device, timer: Timer) -> dict:
    """What this device does on the simplest workloads: a big copy (bytes read + written per second)
    and a square matmul (FLOP/s). The kernels are judged against these, not against a spec sheet."""
    num_elems = sizes.copy_mib * 2**20 // torch.finfo(dtype).bits * 8
    src, dst = torch.randn(num_elems, device=device, dtype=dtype), torch.empty(num_elems, device=device, dtype=dtype)
    copy_s = timer(lambda: dst.copy_(src))
    a = torch.randn(sizes.matmul_n, sizes.matmul_n, device=device, dtype=dtype)
    matmul_s = timer(lambda: a @ a)
    return dict(copy_bytes_per_s=2 * src.numel() * src.element_size() / copy_s,
                matmul_flop_per_s=2 * sizes.matmul_n**3 / matmul_s)


class Rand:
    """Seeded random tensors made on the target device (a 2 GB cache should not be built on the host)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device, dtype=self.dtype)

    def randperm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.gen, device=self.device)

    def randint(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=self.gen, device=self.device)


def _paged_cache(num_seqs: int, context: int, sizes: KernelBenchSizes, rand: Rand):
    """K/V caches [num_blocks, block_size, Hkv, D] and block tables with blocks scattered at random."""
    blocks_per_seq = -(-context // sizes.block_size)
    num_blocks = num_seqs * blocks_per_seq
    shape = (num_blocks, sizes.block_size, sizes.num_kv_heads, sizes.head_dim)
    k_cache, v_cache = rand.randn(*shape), rand.randn(*shape)
    block_tables = rand.randperm(num_blocks).view(num_seqs, blocks_per_seq).int()
    seq_lens = torch.full((num_seqs,), context, dtype=torch.int32, device=rand.device)
    return k_cache, v_cache, block_tables, seq_lens


def _gathered(cache, block_tables, context: int):
    """[B, Hkv, context, D] contiguous: the KV a torch baseline would attend over."""
    return cache[block_tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()


def bench_decode(sizes: KernelBenchSizes, rand: Rand, timer: Timer) -> dict:
    batch, context, group = sizes.decode_batch, sizes.decode_context, sizes.num_q_heads // sizes.num_kv_heads
    k_cache, v_cache, block_tables, seq_lens = _paged_cache(batch, context, sizes, rand)
    q = rand.randn(batch, sizes.num_q_heads, sizes.head_dim)
    scale = sizes.head_dim ** -0.5
    keys, values = _gathered(k_cache, block_tables, context), _gathered(v_cache, block_tables, context)
    q4 = q.view(batch, sizes.num_kv_heads, group, sizes.head_dim)
    kernel = lambda: ops.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, context)
    baseline = lambda: F.scaled_dot_product_attention(q4, keys, values, scale=scale).view_as(q)
    kv_bytes = 2 * batch * context * sizes.num_kv_heads * sizes.head_dim * q.element_size()
    return _result("paged_decode_attention", kernel, baseline, "SDPA on gathered KV", timer,
                   num_bytes=kv_bytes + 2 * q.numel() * q.element_size())


def bench_prefill(sizes: KernelBenchSizes, rand: Rand, timer: Timer) -> dict:
    num_tokens, group = sizes.prefill_tokens, sizes.num_q_heads // sizes.num_kv_heads
    k_cache, v_cache, block_tables, seq_lens = _paged_cache(1, num_tokens, sizes, rand)
    q = rand.randn(num_tokens, sizes.num_q_heads, sizes.head_dim)
    query_start_loc = torch.tensor([0, num_tokens], dtype=torch.int32, device=rand.device)
    scale = sizes.head_dim ** -0.5
    # Baseline heads are expanded up front so SDPA picks its fastest (flash) path.
    keys = _gathered(k_cache, block_tables, num_tokens).repeat_interleave(group, dim=1)
    values = _gathered(v_cache, block_tables, num_tokens).repeat_interleave(group, dim=1)
    q_heads_first = q.transpose(0, 1)[None].contiguous()                     # [1, Hq, L, D]
    kernel = lambda: ops.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                         num_tokens, num_tokens)
    baseline = lambda: F.scaled_dot_product_attention(q_heads_first, keys, values, is_causal=True,
                                                      scale=scale)[0].transpose(0, 1)
    causal_pairs = num_tokens * (num_tokens + 1) // 2
    return _result("paged_attention (prefill)", kernel, baseline, "SDPA causal, contiguous KV", timer,
                   num_flops=4 * causal_pairs * sizes.num_q_heads * sizes.head_dim)


def bench_pack(sizes: KernelBenchSizes, rand: Rand, timer: Timer) -> list[dict]:
    shape = (sizes.pack_layers, 2, 4 * sizes.pack_blocks, sizes.block_size, sizes.num_kv_heads, sizes.head_dim)
    kv_cache = rand.randn(*shape)
    block_ids = rand.randperm(shape[2])[:sizes.pack_blocks]
    buffer = ops.pack_kv(kv_cache, block_ids)
    num_bytes = 2 * buffer.numel() * buffer.element_size()
    pack = _result("pack_kv", lambda: ops.pack_kv(kv_cache, block_ids, out=buffer),
                   lambda: kv_cache[:, :, block_ids], "torch indexing", timer, num_bytes=num_bytes)

    def unpack_baseline():
        kv_cache[:, :, block_ids] = buffer
        return kv_cache
    unpack = _result("unpack_kv", lambda: (ops.unpack_kv(buffer, kv_cache, block_ids), kv_cache)[1],
                     unpack_baseline, "torch index_put", timer, num_bytes=num_bytes)
    return [pack, unpack]


def bench_token_ops(sizes: KernelBenchSizes, rand: Rand, timer: Timer) -> list[dict]:
    dtype, device, randn = rand.dtype, rand.device, rand.randn
    x, residual = randn(sizes.num_tokens, sizes.hidden_size), randn(sizes.num_tokens, sizes.hidden_size)
    weight = randn(sizes.hidden_size)

    def norm_baseline():
        summed = x + residual
        s32 = summed.float()
        return (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.float()).to(dtype), summed
    norm = _result("rms_norm (+residual)", lambda: ops.rms_norm(x, weight, 1e-5, residual), norm_baseline,
                   "unfused torch", timer, num_bytes=4 * x.numel() * x.element_size())

    q = randn(sizes.num_tokens, sizes.num_q_heads, sizes.head_dim)
    k = randn(sizes.num_tokens, sizes.num_kv_heads, sizes.head_dim)
    positions = rand.randint(8192, sizes.num_tokens)
    cos_sin = compute_cos_sin_cache(sizes.head_dim, 8192, 500000.0).to(device)

    def rope_baseline():
        cos, sin = (t[:, None] for t in cos_sin[positions].chunk(2, dim=-1))   # [T, 1, D/2]

        def rotate(t):
            t1, t2 = t.float().chunk(2, dim=-1)
            return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1).to(dtype)
        return rotate(q), rotate(k)
    rope = _result("rotary_embedding", lambda: ops.rotary_embedding(positions, q, k, cos_sin), rope_baseline,
                   "unfused torch", timer, num_bytes=2 * (q.numel() + k.numel()) * q.element_size())

    k_cache = randn(4 * sizes.num_tokens // sizes.block_size + 1, sizes.block_size, sizes.num_kv_heads, sizes.head_dim)
    v_cache = torch.zeros_like(k_cache)
    slots = rand.randperm(k_cache.shape[0] * sizes.block_size)[:sizes.num_tokens]

    def write_baseline():
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k
        v_cache.view(-1, *v_cache.shape[2:])[slots] = k
        return k_cache, v_cache
    write = _result("write_kv", lambda: (ops.write_kv(k, k, k_cache, v_cache, slots), (k_cache, v_cache))[1],
                    write_baseline, "torch index_put", timer, num_bytes=4 * k.numel() * k.element_size())
    return [norm, rope, write]


def _result(name, kernel, baseline, baseline_name, timer, num_bytes=None, num_flops=None) -> dict:
    max_abs_diff = max((a.float() - b.float()).abs().max().item()
                       for a, b in zip(_as_tuple(kernel()), _as_tuple(baseline())))
    kernel_s, baseline_s = timer(kernel), timer(baseline)
    return dict(kernel=name, kernel_ms=kernel_s * 1e3, baseline=baseline_name, baseline_ms=baseline_s * 1e3,
                num_bytes=num_bytes, num_flops=num_flops, max_abs_diff_vs_baseline=max_abs_diff)


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def run(device: torch.device, sizes: KernelBenchSizes, num_warmup: int, num_iters: int) -> dict:
    # bf16 matmul on CPU runs at ~1 GFLOP/s (docs/DESIGN.md): CPU runs measure float32.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = Timer(device, num_warmup, num_iters)
    rand = Rand(device, dtype)
    peaks = device_peaks(sizes, dtype, device, timer)
    results = []
    for bench in tqdm([bench_decode, bench_prefill, bench_pack, bench_token_ops], desc="kernels", unit="group"):
        out = bench(sizes, rand, timer)
        results.extend(out if isinstance(out, list) else [out])
    for r in results:
        r["speedup_vs_baseline"] = r["baseline_ms"] / r["kernel_ms"]
        if r["num_bytes"]:
            r["gb_per_s"] = r["num_bytes"] / r["kernel_ms"] / 1e6
            r["fraction_of_copy_bandwidth"] = r["gb_per_s"] * 1e9 / peaks["copy_bytes_per_s"]
        if r["num_flops"]:
            r["tflop_per_s"] = r["num_flops"] / r["kernel_ms"] / 1e9
            r["fraction_of_matmul_rate"] = r["tflop_per_s"] * 1e12 / peaks["matmul_flop_per_s"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(device=device_name, dtype=str(dtype), sizes=asdict(sizes), peaks=peaks, results=results,
                torch_threads=torch.get_num_threads())


def format_table(report: dict) -> str:
    peaks = report["peaks"]
    lines = [f"device {report['device']} ({report['dtype']}): copy {peaks['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
             f"matmul {peaks['matmul_flop_per_s'] / 1e12:.2f} TFLOP/s",
             "| kernel | ms | GB/s | % copy bw | TFLOP/s | % matmul | baseline | baseline ms | speedup |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        bw = (f"{r['gb_per_s']:.1f} | {100 * r['fraction_of_copy_bandwidth']:.0f}%" if r.get("gb_per_s")
              else "- | -")
        fl = (f"{r['tflop_per_s']:.2f} | {100 * r['fraction_of_matmul_rate']:.0f}%" if r.get("tflop_per_s")
              else "- | -")
        lines.append(f"| {r['kernel']} | {r['kernel_ms']:.3f} | {bw} | {fl} | {r['baseline']} | "
                     f"{r['baseline_ms']:.3f} | {r['speedup_vs_baseline']:.2f}x |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (Triton kernels) or cpu (torch paths)")
    parser.add_argument("--small", action="store_true", help="reduced sizes, for CPU or a quick check")
    parser.add_argument("--num-warmup", type=int, default=3)
    parser.add_argument("--num-iters", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path, help="also write the full report as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.kernels: no CUDA device here; pass --device cpu --small to measure the torch CPU paths",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(device, SMALL_SIZES if args.small else FULL_SIZES, args.num_warmup, args.num_iters)
    print(format_table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
