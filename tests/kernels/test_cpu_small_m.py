"""pdserve's small-M CPU linear kernel (kernels/cpu_small_m.py, kernels/csrc/cpu_small_m_linear.cpp)
against a float64 torch reference on fresh random inputs; its weight layout; its build, and what a
machine that cannot build it gets."""
import logging
import os
import subprocess
import sys

import pytest
import torch

from kernels import cpu_small_m

# (K, N): the small model's layers, N not a multiple of the 32-column tile, K not a multiple of 16
# (the vector width), tiny and odd sizes.
SHAPES = [(768, 1280), (2048, 768), (768, 4096), (33, 17), (1100, 5), (5, 100), (16, 32), (1, 1)]


@pytest.fixture(scope="module")
def lib():
    lib = cpu_small_m.library()
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
    tiled = cpu_small_m.tile_weight(weight)
    assert tiled.shape == (-(-n // cpu_small_m.TILE), k, cpu_small_m.TILE)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in range(1, cpu_small_m.MAX_ROWS + 1):
            x = torch.randn(m, k, generator=gen)
            for b in (None, bias):
                out = cpu_small_m.linear(lib, x, tiled, b, n)
                expected = x.double() @ weight.double().T + (0 if b is None else b.double())
                assert out.shape == (m, n) and out.dtype == torch.float32
                torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5,
                                           msg=lambda text: f"M={m} K={k} N={n} seed={seed}: {text}")
    finally:
        torch.set_num_threads(previous)


def test_a_row_view_and_a_strided_input_are_read_right(lib):
    weight = torch.randn(64, 48)
    tiled = cpu_small_m.tile_weight(weight)
    wide = torch.randn(3, 96)
    x = wide[:, ::2]  # not contiguous
    torch.testing.assert_close(cpu_small_m.linear(lib, x, tiled, None, 64), x @ weight.T, atol=1e-5, rtol=1e-5)


def test_tiling_round_trips_bit_exactly():
    for k, n in SHAPES:
        weight = torch.randn(n, k)
        tiled = cpu_small_m.tile_weight(weight)
        assert torch.equal(cpu_small_m.untile_weight(tiled, n), weight)
        assert not tiled.view(-1, k, cpu_small_m.TILE)[-1, :, n % cpu_small_m.TILE or cpu_small_m.TILE:].any()


def test_sizes_it_does_not_serve_are_refused(lib):
    tiled = cpu_small_m.tile_weight(torch.randn(8, 16))
    for bad in (torch.randn(0, 16), torch.randn(cpu_small_m.MAX_ROWS + 1, 16), torch.randn(2, 15),
                torch.randn(2, 16, dtype=torch.float64)):
        with pytest.raises(ValueError, match="small-M linear takes"):
            cpu_small_m.linear(lib, bad, tiled, None, 8)


def test_a_failed_build_says_why_and_leaves_torch_paths(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_small_m, "FLAGS", [*cpu_small_m.FLAGS, "-fno-such-flag-at-all"])
    monkeypatch.setattr(cpu_small_m, "_state", {})
    with caplog.at_level(logging.WARNING, logger="kernels.cpu_small_m"):
        assert cpu_small_m.library() is None
    assert "could not be built" in caplog.text and "no-such-flag-at-all" in caplog.text
    assert not list((tmp_path / "kernels").glob("*.so*"))  # no half-written library left behind


def test_no_compiler_and_the_switch_off_give_none(monkeypatch, caplog):
    monkeypatch.setattr(cpu_small_m, "_state", {})
    monkeypatch.setattr(cpu_small_m, "compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="kernels.cpu_small_m"):
        assert cpu_small_m.library() is None
    assert "no C++ compiler found (set CXX, or install g++)" in caplog.text
    monkeypatch.setattr(cpu_small_m, "_state", {})
    monkeypatch.setenv("PDSERVE_CPU_KERNELS", "0")
    assert cpu_small_m.library() is None


def test_a_fresh_cache_builds_and_a_second_process_reuses_it(tmp_path):
    env = {**os.environ, "PDSERVE_CACHE_DIR": str(tmp_path)}
    compiled = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "kernels.cpu_small_m"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0 and "ready" in done.stdout, done.stderr
        compiled.append("compiling pdserve's CPU linear kernel" in done.stderr)
    assert compiled == [True, False]
    assert len(list((tmp_path / "kernels").glob("*.so*"))) == 1
