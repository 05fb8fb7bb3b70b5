"""pdserve's CPU kernels (pdkernels/cpu_native.py, pdkernels/csrc/): the small-M linear kernel against a
float64 torch reference and decode attention against the loop reference, on fresh random inputs; the
linear kernel's weight layout; the build, and what a machine that cannot build it gets."""
import logging
import os
import subprocess
import sys

import pytest
import torch

from pdkernels import cpu_native

# (K, N): the small model's layers, N not a multiple of the 16/32-column tile, K not a multiple of 16
# (the vector width), tiny and odd sizes.
SHAPES = [(768, 1280), (2048, 768), (768, 4096), (33, 17), (1100, 5), (5, 100), (16, 32), (1, 1)]


@pytest.fixture(scope="module")
def lib():
    lib = cpu_native.library()
    if lib is None:
        pytest.fail("the kernel library did not build on this machine (g++ and OpenMP are part of the setup: "
                    "the warning above says why)")
    return lib


@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_the_float64_reference(lib, k, n, threads):
    gen = torch.Generator().manual_seed(torch.seed())  # fresh inputs every run; the seed is in the message
    seed = gen.initial_seed()
    weight = torch.randn(n, k, generator=gen) / k ** 0.5
    bias = torch.randn(n, generator=gen)
    tiled = cpu_native.tile_weight(weight)
    assert tiled.shape == (-(-n // cpu_native.tile_width()), k, cpu_native.tile_width())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in range(1, cpu_native.MAX_ROWS + 1):
            x = torch.randn(m, k, generator=gen)
            for b in (None, bias):
                out = cpu_native.linear(lib, x, tiled, b, n)
                expected = x.double() @ weight.double().T + (0 if b is None else b.double())
                assert out.shape == (m, n) and out.dtype == torch.float32
                torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5,
                                           msg=lambda text: f"M={m} K={k} N={n} seed={seed}: {text}")
    finally:
        torch.set_num_threads(previous)


def test_a_row_view_and_a_strided_input_are_read_right(lib):
    weight = torch.randn(64, 48)
    tiled = cpu_native.tile_weight(weight)
    wide = torch.randn(3, 96)
    x = wide[:, ::2]  # not contiguous
    torch.testing.assert_close(cpu_native.linear(lib, x, tiled, None, 64), x @ weight.T, atol=1e-5, rtol=1e-5)


# (num_q_heads, num_kv_heads, head_dim, block_size): the small model's (GQA 3:1, D 64), MHA with D 128,
# D below one vector and not a multiple of 16, GQA 4:1 with an odd block size; groups that pass 3 takes
# in several batches of query heads (5 = 4 + 1 at D 64, 8 = 2 + 2 + 2 + 2 at D 128, 7 at D 40)
ATTENTION_SHAPES = [(12, 4, 64, 16), (4, 4, 128, 16), (6, 2, 8, 4), (8, 2, 24, 5), (3, 1, 143, 7),
                    (10, 2, 64, 16), (16, 2, 128, 8), (7, 1, 40, 3)]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_matches_the_reference(lib, shape, threads):
    from pdkernels import reference
    from tests.pdkernels.helpers import make_paged_batch
    num_q_heads, num_kv_heads, head_dim, block_size = shape
    gen = torch.Generator().manual_seed(torch.seed())
    seed = gen.initial_seed()
    seq_lens = [1, 2, 15, 16, 17, 100, 333][: 3 + int(torch.randint(4, (1,), generator=gen))]
    batch = make_paged_batch([1] * len(seq_lens), seq_lens, num_q_heads, num_kv_heads, head_dim, block_size,
                             torch.float32, gen)
    batch["q"] *= 4.0  # peaked softmaxes as well as flat ones
    scale = head_dim ** -0.5
    expected = reference.paged_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                                         batch["seq_lens"], batch["query_start_loc"], scale)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_native.decode_attention(lib, batch["q"], batch["k_cache"], batch["v_cache"],
                                          batch["block_tables"], batch["seq_lens"], scale)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5, msg=lambda text: f"seed={seed}: {text}")


def test_decode_attention_softmax_holds_extreme_scores(lib):
    """Scores hundreds apart (exp underflows for all but the top one) and a long context."""
    from pdkernels import reference
    from tests.pdkernels.helpers import make_paged_batch
    gen = torch.Generator().manual_seed(torch.seed())
    batch = make_paged_batch([1, 1], [2049, 40], 4, 2, 32, 16, torch.float32, gen)
    batch["q"] *= 60.0
    expected = reference.paged_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                                         batch["seq_lens"], batch["query_start_loc"], 1.0)
    out = cpu_native.decode_attention(lib, batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                                      batch["seq_lens"], 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_decode_attention_refuses_what_it_does_not_serve(lib):
    q, cache = torch.randn(2, 4, 16), torch.randn(3, 4, 2, 16)
    tables, lens = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32), torch.tensor([5, 3], dtype=torch.int32)
    for bad_q, bad_cache, bad_tables in [(q.double(), cache, tables), (torch.randn(2, 3, 16), cache, tables),
                                         (q, cache.transpose(1, 2), tables), (q, cache, tables[:, :1])]:
        with pytest.raises(ValueError):
            cpu_native.decode_attention(lib, bad_q, bad_cache, bad_cache, bad_tables, lens, 0.25)
    zero = cpu_native.decode_attention(lib, q, cache, cache, tables, torch.tensor([0, 3], dtype=torch.int32), 0.25)
    assert torch.equal(zero[0], torch.zeros(4, 16))


def test_rms_norm_rotary_and_silu_on_fresh_inputs(lib):
    import torch.nn.functional as F
    from pdkernels import reference
    from pdkernels.rotary import compute_cos_sin_cache
    gen = torch.Generator().manual_seed(torch.seed())
    seed = gen.initial_seed()
    for tokens in (1, 3, 300):
        hidden = int(torch.randint(1, 1100, (1,), generator=gen))
        x, res = (torch.randn(tokens, hidden, generator=gen) * 3 for _ in range(2))
        weight = torch.randn(hidden, generator=gen)
        out, summed = cpu_native.rms_norm(lib, x, weight, 1e-6, res)
        ref_out, ref_summed = reference.rms_norm(x, weight, 1e-6, res)
        assert torch.equal(summed, ref_summed)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, msg=lambda t: f"seed={seed} H={hidden}: {t}")
        torch.testing.assert_close(cpu_native.rms_norm(lib, x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6),
                                   atol=1e-5, rtol=1e-5)
        # q and k as views of a fused qkv output: rows wider than their heads
        qkv = torch.randn(tokens, (6 + 2 + 2) * 64, generator=gen)
        q, k, _ = qkv.split([6 * 64, 2 * 64, 2 * 64], dim=-1)
        q, k = q.view(tokens, 6, 64), k.view(tokens, 2, 64)
        positions = torch.randint(0, 500, (tokens,), generator=gen)
        for rot_dim, is_neox in [(64, True), (32, False)]:
            table = compute_cos_sin_cache(rot_dim, 500, 10000.0)
            got = cpu_native.rotary_embedding(lib, positions, q, k, table, is_neox)
            want = reference.rotary_embedding(positions, q, k, table, is_neox)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda t: f"seed={seed}: {t}")
        gate_up = torch.randn(tokens, 2 * hidden, generator=gen) * 30  # exp far past float range both ways
        gate, up = gate_up.chunk(2, dim=-1)
        torch.testing.assert_close(cpu_native.silu_and_mul(lib, gate_up), F.silu(gate) * up, atol=1e-5, rtol=1e-5,
                                   msg=lambda t: f"seed={seed}: {t}")


def test_rotary_refuses_a_position_outside_the_table(lib):
    from pdkernels.rotary import compute_cos_sin_cache
    q, k = torch.randn(2, 4, 16), torch.randn(2, 2, 16)
    with pytest.raises(ValueError, match="outside the rotary table's 100 positions"):
        cpu_native.rotary_embedding(lib, torch.tensor([3, 100]), q, k, compute_cos_sin_cache(16, 100, 10000.0))


def test_write_kv_refuses_a_slot_past_the_cache_and_writes_nothing(lib):
    k_cache, v_cache = torch.zeros(4, 2, 2, 8), torch.zeros(4, 2, 2, 8)
    key = value = torch.ones(3, 2, 8)
    with pytest.raises(IndexError, match="past the cache's 8 slots"):
        cpu_native.write_kv(lib, key, value, k_cache, v_cache, torch.tensor([0, 5, 8]))
    assert not k_cache.any() and not v_cache.any()


@pytest.mark.parametrize("threads", [1, 2])
def test_read_sum_reads_every_element_once(lib, threads):
    gen = torch.Generator().manual_seed(torch.seed())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # blocks of 8 vectors (32-128 floats) and tails, per thread
        for n in (0, 1, 127, 128, 129, 1000, 3 * 128 + 5, 1 << 20):
            x = torch.randn(n, generator=gen)
            got = cpu_native.read_sum(lib, x)
            assert got == pytest.approx(float(x.double().sum()), abs=1e-3 + 1e-6 * n), \
                f"n={n} seed={gen.initial_seed()}"
            assert cpu_native.read_sum(lib, x + 1) == pytest.approx(got + n, abs=1e-2 + 1e-5 * n)
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu_native.read_sum(lib, torch.ones(8, 2)[:, 0])


@pytest.mark.parametrize("lanes, registers", [(16, 32), (8, 16), (4, 32), (4, 16)])
def test_every_vector_targets_blocking_computes_the_same(lanes, registers, tmp_path, monkeypatch):
    """The kernels' blocking follows the target's vector width and register count (vec.h: AVX-512's 16
    floats x 32 registers, AVX2's 8 x 16, NEON's 4 x 32, SSE's 4 x 16). Each target's, built for this
    host whichever it is, runs this file's checks of every kernel on fresh inputs."""
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_native, "FLAGS", [*cpu_native.FLAGS, f"-DPDSERVE_LANES={lanes}",
                                              f"-DPDSERVE_VEC_REGS={registers}"])
    monkeypatch.setattr(cpu_native, "_state", {})
    target = cpu_native.library()
    assert target is not None and cpu_native.tile_width() == 2 * lanes
    for k, n in [(768, 1280), (33, 17), (1100, 5)]:
        test_matches_the_float64_reference(target, k, n, threads=1)
    for shape in ATTENTION_SHAPES:
        test_decode_attention_matches_the_reference(target, shape, threads=2)
    test_decode_attention_softmax_holds_extreme_scores(target)
    test_rms_norm_rotary_and_silu_on_fresh_inputs(target)
    test_read_sum_reads_every_element_once(target, threads=2)


def test_tiling_round_trips_bit_exactly():
    for k, n in SHAPES:
        weight = torch.randn(n, k)
        tiled = cpu_native.tile_weight(weight)
        assert torch.equal(cpu_native.untile_weight(tiled, n), weight)
        tile = cpu_native.tile_width()
        assert not tiled.view(-1, k, tile)[-1, :, n % tile or tile:].any()


def test_sizes_it_does_not_serve_are_refused(lib):
    tiled = cpu_native.tile_weight(torch.randn(8, 16))
    for bad in (torch.randn(0, 16), torch.randn(cpu_native.MAX_ROWS + 1, 16), torch.randn(2, 15),
                torch.randn(2, 16, dtype=torch.float64)):
        with pytest.raises(ValueError, match="small-M linear takes"):
            cpu_native.linear(lib, bad, tiled, None, 8)


def test_a_failed_build_says_why_and_leaves_torch_paths(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_native, "FLAGS", [*cpu_native.FLAGS, "-fno-such-flag-at-all"])
    monkeypatch.setattr(cpu_native, "_state", {})
    with caplog.at_level(logging.WARNING, logger="pdkernels.cpu_native"):
        assert cpu_native.library() is None
    assert "could not be built" in caplog.text and "no-such-flag-at-all" in caplog.text
    assert not list((tmp_path / "kernels").glob("*.so*"))  # no half-written library left behind


def test_no_compiler_and_the_switch_off_give_none(monkeypatch, caplog):
    monkeypatch.setattr(cpu_native, "_state", {})
    monkeypatch.setattr(cpu_native, "compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="pdkernels.cpu_native"):
        assert cpu_native.library() is None
    assert "no C++ compiler found (set CXX, or install g++)" in caplog.text
    monkeypatch.setattr(cpu_native, "_state", {})
    monkeypatch.setenv("PDSERVE_CPU_KERNELS", "0")
    assert cpu_native.library() is None


def test_a_fresh_cache_builds_and_a_second_process_reuses_it(tmp_path):
    env = {**os.environ, "PDSERVE_CACHE_DIR": str(tmp_path)}
    compiled = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "pdkernels"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0 and "ready" in done.stdout, done.stderr
        compiled.append("compiling pdserve's CPU kernels" in done.stderr)
    assert compiled == [True, False]
    assert len(list((tmp_path / "kernels").glob("*.so*"))) == 1
