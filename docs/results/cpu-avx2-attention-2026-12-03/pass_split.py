"""Where decode attention's time goes: the kernel at `--rev` (default: the tree) against copies of it with
pass 3 (P.V) or pass 1 (Q.K) cut out, on the small model's shapes at 8 x 1024, scattered blocks (from
memory) and every table entry naming one block (cache-resident); one thread. Run from the repository root."""
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench import cpu_attention as ca

SRC = "pdkernels/csrc/cpu_decode_attention.cpp"
CUTS = {
    "no-pv": ("    for (int64_t i = 0; i < num_heads * head_dim; ++i) out[i] = 0.0f;\n"
              "    for (int64_t c0 = 0; c0 < seq_len; c0 += chunk) {",
              "    for (int64_t i = 0; i < num_heads * head_dim; ++i) out[i] = 0.0f;\n"
              "    for (int64_t c0 = 0; c0 < 0; c0 += chunk) {"),
    "no-qk": ("    const int64_t chunk = chunk_positions(width);\n    for (int64_t c0 = 0; c0 < seq_len; c0 += chunk) {",
              "    const int64_t chunk = chunk_positions(width);\n"
              "    for (int64_t i = 0; i < num_heads * seq_len; ++i) scores[i] = 0.0f;\n"
              "    for (int64_t c0 = 0; c0 < 0; c0 += chunk) {"),
}
torch.set_num_threads(1)
with tempfile.TemporaryDirectory() as tmp:
    libs = {"full": ca.compile_revision(None, Path(tmp), label="full")}
    for name, (old, new) in CUTS.items():
        tree = Path(tmp) / f"tree-{name}"
        (tree / "pdkernels" / "csrc").mkdir(parents=True)
        for f in [ca.SOURCE, *ca.HEADERS]:
            (tree / f).write_text(Path(f).read_text())
        text = (tree / SRC).read_text()
        assert text.count(old) == 1, name
        (tree / SRC).write_text(text.replace(old, new))
        libs[name] = ca.compile_revision(None, Path(tmp), tree, name)
    inp = ca.case_inputs(8, 1024, 12, torch.Generator().manual_seed(0))
    hot = dict(inp, k=[inp["k"][0]] * 12, v=[inp["v"][0]] * 12, tables=torch.zeros_like(inp["tables"]))
    out = torch.empty(8, ca.Q_HEADS, ca.HEAD_DIM)
    for r in range(2):
        for name, lib in libs.items():
            cold = ca.best_of(lambda: ca.run_layers(lib, inp, out))
            h = ca.best_of(lambda: ca.run_layers(lib, hot, out))
            print(f"round {r + 1} {name:6s} scattered {cold * 1e3:6.2f} ms  cache-resident {h * 1e3:6.2f} ms")
