# compute-only time: every table entry names block 0 (K/V stay in L1/L2), vs the scattered case
import tempfile, torch
from pathlib import Path
from bench import cpu_attention as ca
torch.set_num_threads(1)
with tempfile.TemporaryDirectory() as tmp:
    lib = ca.compile_revision(None, Path(tmp))
    for batch, ctx in [(8, 256), (8, 1024)]:
        gen = torch.Generator().manual_seed(0)
        inp = ca.case_inputs(batch, ctx, 12, gen)
        out = torch.empty(batch, ca.Q_HEADS, ca.HEAD_DIM)
        cold = ca.best_of(lambda: ca.run_layers(lib, inp, out))
        hot_inp = dict(inp, k=[inp["k"][0]] * 12, v=[inp["v"][0]] * 12, tables=torch.zeros_like(inp["tables"]))
        hot = ca.best_of(lambda: ca.run_layers(lib, hot_inp, out))
        print(f"{batch} x {ctx}: scattered {cold*1e3:.2f} ms, one block (cache-resident) {hot*1e3:.2f} ms")
