"""PNG plots: SLO attainment against request rate per system, and TTFT/TPOT CDFs.

Figures are built with matplotlib's object API on the Agg canvas, not pyplot, so plotting touches no
global state and needs no display.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_attainment(series: dict[str, list[tuple[float, float]]], target: float | None,
                    path: Path, title: str = "SLO attainment vs request rate",
                    xlabel: str = "request rate (req/s)") -> Path:
    """One line per system: (rate, attainment in [0, 1]) points, sorted by rate."""
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    for label, points in series.items():
        if points:
            rates, attainments = zip(*sorted(points))
            axes.plot(rates, [100 * a for a in attainments], marker="o", label=label)
    if target is not None:
        axes.axhline(100 * target, color="grey", linestyle="--", linewidth=1,
                     label=f"target {100 * target:g}%")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("SLO attainment (%)")
    axes.set_ylim(-2, 102)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_latency_cdfs(series: dict[str, dict[str, list[float]]], path: Path,
                      slos_ms: dict[str, float] | None = None) -> Path:
    """Two panels (TTFT, TPOT); `series[label]` holds "ttft" and "tpot" samples in milliseconds."""
    figure = Figure(figsize=(11, 4.2))
    for index, (metric, name) in enumerate((("ttft", "TTFT"), ("tpot", "TPOT"))):
        axes = figure.add_subplot(1, 2, index + 1)
        for label, samples in series.items():
            values = np.sort(np.asarray(samples.get(metric) or [], dtype=np.float64))
            if values.size:
                axes.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=label)
        if slos_ms and metric in slos_ms:
            axes.axvline(slos_ms[metric], color="grey", linestyle="--", linewidth=1,
                         label=f"SLO {slos_ms[metric]:g} ms")
        axes.set_xlabel(f"{name} (ms)")
        axes.set_ylabel("fraction of requests")
        axes.set_ylim(0, 1.02)
        axes.set_title(f"{name} CDF")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return _save(figure, path)


def cdf_samples(result: dict) -> dict[str, list[float]]:
    """TTFT and TPOT samples (ms) of the successful requests of one result dict."""
    ok = [not error for error in result["errors"]]
    out_lens = result["output_lens"]
    return {
        "ttft": [1000 * t for t, good in zip(result["ttfts"], ok) if good],
        "tpot": [1000 * t for t, good, n in zip(result["tpots"], ok, out_lens) if good and n > 1],
    }


def plot_process_series(series: dict[str, dict], path: Path, title: str = "Soak: memory and open files") -> Path:
    """Two panels over time, one line per process: RSS (MiB) and open file descriptors;
    `series[name]` holds "time_s", "rss_bytes" and "num_fds" lists (bench.processes.summarize)."""
    figure = Figure(figsize=(11, 4.2))
    rss_axes, fd_axes = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for name, samples in sorted(series.items()):
        minutes = np.asarray(samples["time_s"], dtype=np.float64) / 60.0
        rss_axes.plot(minutes, np.asarray(samples["rss_bytes"], dtype=np.float64) / 2**20, label=name)
        fd_axes.plot(minutes, samples["num_fds"], label=name)
    for axes, label in ((rss_axes, "RSS (MiB)"), (fd_axes, "open file descriptors")):
        axes.set_xlabel("time (min)")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(title)
    return _save(figure, path)
