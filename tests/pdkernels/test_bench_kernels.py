"""bench.kernels wiring on CPU at tiny sizes: every kernel measured, and each kernel's output agrees
with its torch baseline (a benchmark that times the wrong computation is worse than none)."""

import torch

from bench.kernels import KernelBenchSizes, format_table, run

TINY = KernelBenchSizes(num_tokens=32, hidden_size=64, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4,
                        decode_batch=3, decode_context=37, prefill_tokens=45, pack_layers=2, pack_blocks=5,
                        copy_mib=1, matmul_n=64)


def test_bench_runs_every_kernel_and_matches_baselines():
    report = run(torch.device("cpu"), TINY, num_warmup=0, num_iters=1)
    names = [r["kernel"] for r in report["results"]]
    assert names == ["paged_decode_attention", "paged_attention (prefill)", "pack_kv", "unpack_kv",
                     "rms_norm (+residual)", "rotary_embedding", "write_kv"]
    for r in report["results"]:
        assert r["max_abs_diff_vs_baseline"] < 1e-4, r
        assert r["kernel_ms"] > 0 and r["baseline_ms"] > 0
        assert (r["num_bytes"] is None) != (r["num_flops"] is None)
    assert "paged_decode_attention" in format_table(report)
