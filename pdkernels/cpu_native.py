"""pdserve's float32 CPU kernels, compiled on first use: linear layers at decode sizes (1-8 rows) and
decode attention over the paged KV cache.

torch ships no matmul that streams a weight from memory at full speed for a few rows: MKL's sgemm
re-packs the weight on every call, oneDNN's kernel for a packed weight reads 11-18 GB/s at 1-8 rows
where a plain `sum` reads 23-27 GB/s on one core here (docs/kernels.md, "Decode-size linear layers").
`pdkernels/csrc/cpu_small_m_linear.cpp` does: the weight laid out once in tiles two vector registers wide
(32 output columns with AVX-512, 16 with AVX2), each tile one contiguous run, every row of x multiplied
by each weight as it streams by.

    weight [N, K] --tile_weight (once, at load)--> tiled [ceil(N/T), K, T]     T = 32 (AVX-512), 16 (AVX2), 8
    linear(x [M, K], tiled, bias, N) -> y [M, N]          1 <= M <= MAX_ROWS

The small per-layer ops (`pdkernels/csrc/cpu_elementwise.cpp`: RMSNorm with the residual add fused,
rotary embedding, K/V into the paged cache, SiLU-and-multiply) are one call each where torch
dispatches several ops (an RMSNorm of one row costs ~50 us through aten).

Decode attention (`pdkernels/csrc/cpu_decode_attention.cpp`) reads each request's K and V straight from
its cache blocks, once, per (request, KV head) task, where the torch path gathers them into new tensors
and runs several ops per layer (pdkernels/cpu_attention.py).

    decode_attention(q [B, Hq, D], k_cache, v_cache [blocks, block_size, Hkv, D], block_tables [B, *]
                     int32, seq_lens [B] int32, scale) -> [B, Hq, D]      D <= MAX_HEAD_DIM

The library (both sources) is compiled with the machine's C++ compiler (`$CXX`, else `c++`/`g++`/`clang++`;
`-O3 -march=native -fopenmp`, 5-12 seconds) into `$PDSERVE_CACHE_DIR/kernels` (default
`~/.cache/pdserve/kernels`), keyed by the source, the flags, the compiler and the CPU's features, and
loaded with ctypes (no torch headers; the call releases the GIL; its OpenMP threads are torch's, the
one libgomp of the process). Where it cannot be built (no compiler, no OpenMP) `library()` returns
None once with a warning and callers keep torch's paths; `PDSERVE_CPU_KERNELS=0` turns it off.
`python -m pdkernels` builds it ahead of time (make install does).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
SOURCES = [_CSRC / name for name in ("cpu_small_m_linear.cpp", "cpu_decode_attention.cpp", "cpu_elementwise.cpp",
                                     "cpu_decode_layers.cpp", "cpu_shm_collectives.cpp")]
HEADERS = [_CSRC / "vec.h", _CSRC / "kernels.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-Wno-psabi"]
MAX_ROWS = 8    # the largest M the kernel serves (pdserve_max_rows)
MAX_HEAD_DIM = 143  # the largest head_dim decode attention serves (pdserve_decode_attention_max_head_dim)
BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
_state: dict[str, object] = {}  # "library": CDLL or None once decided


def enabled() -> bool:
    return os.environ.get("PDSERVE_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("PDSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pdserve")
    return Path(root) / "kernels"


def compiler() -> str | None:
    for name in [os.environ.get("CXX"), "c++", "g++", "clang++"]:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    sources = [source.read_text() for source in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*sources, " ".join(FLAGS), version, _cpu_features()]).encode())
    return cache_dir() / f"libpdserve_cpu_{key.hexdigest()[:16]}.so"


def build(cxx: str) -> Path:
    """Compile the library unless a build for this source, compiler and CPU is cached; its path.
    Raises RuntimeError with the compiler's message."""
    path = _library_path(cxx)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("compiling pdserve's CPU kernels (once per machine): %s", path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)  # atomic: processes building at once each leave a whole file
        for stale in path.parent.glob("libpdserve_cpu*.so"):  # builds of other sources (a process that
            if stale != path:                                  # mapped one keeps its copy)
                stale.unlink(missing_ok=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.pdserve_small_m_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.pdserve_small_m_linear.restype = ctypes.c_int
    lib.pdserve_decode_attention.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_void_p] * 2
                                             + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int])
    lib.pdserve_decode_attention.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.pdserve_rms_norm.argtypes = [ptr] * 5 + [i64, i64, ctypes.c_float, ctypes.c_int]
    lib.pdserve_rms_norm.restype = None
    lib.pdserve_rotary.argtypes = [ptr, ptr, i64, ptr, i64, ptr, i64, ptr, ptr] + [i64] * 5 + [ctypes.c_int]
    lib.pdserve_rotary.restype = ctypes.c_int
    lib.pdserve_write_kv.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64]
    lib.pdserve_write_kv.restype = ctypes.c_int
    lib.pdserve_silu_and_mul.argtypes = [ptr, ptr, i64, i64, ctypes.c_int]
    lib.pdserve_silu_and_mul.restype = None
    lib.pdserve_read_sum.argtypes = [ptr, i64, ctypes.c_int]
    lib.pdserve_read_sum.restype = ctypes.c_double
    lib.pdserve_decode_layers_scratch.argtypes = [ptr, i64]
    lib.pdserve_decode_layers_scratch.restype = i64
    lib.pdserve_decode_layers.argtypes = ([ptr, i64, ptr, i64, ptr, ptr, ctypes.c_int] + [ptr] * 3
                                          + [i64] + [ptr] * 3 + [ctypes.c_int, ptr])
    lib.pdserve_decode_layers.restype = ctypes.c_int
    lib.pdserve_shm_header_bytes.restype = i64
    lib.pdserve_shm_init.argtypes = [ptr, ctypes.c_int, ctypes.c_int, i64, ctypes.c_int32]
    lib.pdserve_shm_init.restype = ctypes.c_int
    lib.pdserve_shm_all_reduce.argtypes = [ptr, ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ptr, i64, ctypes.c_double]
    lib.pdserve_shm_all_reduce.restype = ctypes.c_int
    lib.pdserve_shm_all_gather.argtypes = [ptr, ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ptr, i64, ptr,
                                           ctypes.c_double]
    lib.pdserve_shm_all_gather.restype = ctypes.c_int
    if (lib.pdserve_tile_width() not in (8, 16, 32) or lib.pdserve_max_rows() != MAX_ROWS
            or lib.pdserve_decode_attention_max_head_dim() != MAX_HEAD_DIM):
        raise RuntimeError(f"{path} does not match pdkernels/cpu_native.py")
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None where it is turned off or cannot be built
    (then a warning says why, once per process)."""
    if "library" in _state:
        return _state["library"]  # type: ignore[return-value]
    with _lock:
        if "library" not in _state:
            _state["library"] = _build_and_load()
    return _state["library"]  # type: ignore[return-value]


def _build_and_load() -> ctypes.CDLL | None:
    if not enabled():
        logger.info("PDSERVE_CPU_KERNELS=0: CPU linear layers and attention use torch's paths only")
        return None
    cxx = compiler()
    if cxx is None:
        logger.warning("no C++ compiler found (set CXX, or install g++): CPU decode steps fall back to "
                       "torch's paths (linear layers 1.3-2x slower, attention slower)")
        return None
    try:
        path = build(cxx)
        lib = _load(path)
        logger.info("pdserve CPU kernels loaded: %s", path)
        return lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("pdserve's CPU kernels could not be built or loaded; CPU decode steps fall back to "
                       "torch's paths (linear layers 1.3-2x slower, attention slower). %s", e)
        return None


def tile_width() -> int:
    """Output columns per tile of the loaded library (kTile in the source: two vector registers, 32 floats
    with AVX-512, 16 with AVX2, 8 with NEON); 32 where no library is loaded."""
    lib = library()
    return int(lib.pdserve_tile_width()) if lib is not None else 32


def tile_weight(weight: Tensor) -> Tensor:
    """[N, K] float32 -> [ceil(N / T), K, T], T = tile_width(): tile t holds output columns tT..tT+T-1,
    zero-padded."""
    tile = tile_width()
    n, k = weight.shape
    padded = torch.zeros(-(-n // tile) * tile, k, dtype=weight.dtype) if n % tile else None
    if padded is not None:
        padded[:n] = weight
    source = weight if padded is None else padded
    return source.view(-1, tile, k).transpose(1, 2).contiguous()


def untile_weight(tiled: Tensor, out_features: int) -> Tensor:
    """The inverse of tile_weight: [N, K], bit-identical to the weight it came from."""
    num_tiles, k, tile = tiled.shape
    return tiled.transpose(1, 2).reshape(num_tiles * tile, k)[:out_features].contiguous()


def linear(lib: ctypes.CDLL, x: Tensor, tiled: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """x [M, K] float32 (1 <= M <= MAX_ROWS) @ weight.T + bias -> [M, N], from tile_weight(weight)."""
    rows = x.contiguous()
    m, k = rows.shape
    if not (1 <= m <= MAX_ROWS) or tiled.shape[1] != k or rows.dtype != torch.float32:
        raise ValueError(f"small-M linear takes 1-{MAX_ROWS} float32 rows of {tiled.shape[1]}, got {tuple(rows.shape)} "
                         f"{rows.dtype}")
    out = torch.empty(m, out_features, dtype=torch.float32)
    status = lib.pdserve_small_m_linear(rows.data_ptr(), tiled.data_ptr(),
                                        None if bias is None else bias.data_ptr(), out.data_ptr(),
                                        m, k, out_features, torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"pdserve_small_m_linear returned {status} for M={m}")
    return out


def decode_attention_supported(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    return (q.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and q.device.type == "cpu"
            and q.shape[-1] <= MAX_HEAD_DIM and k_cache.is_contiguous() and v_cache.is_contiguous())


def decode_attention(lib: ctypes.CDLL, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                     seq_lens: Tensor, scale: float) -> Tensor:
    """q [B, Hq, D] float32 over seq_lens[b] positions of the paged cache -> [B, Hq, D]; a request with
    seq_len 0 gets zeros. Table entries past a request's last block are never read."""
    num_seqs, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if not decode_attention_supported(q, k_cache, v_cache) or cache_head_dim != head_dim \
            or v_cache.shape != k_cache.shape or num_q_heads % num_kv_heads:
        raise ValueError(f"decode attention takes float32 q [B, Hq, D<={MAX_HEAD_DIM}] and contiguous caches "
                         f"[blocks, block_size, Hkv, D] with Hkv dividing Hq; got q {tuple(q.shape)} {q.dtype}, "
                         f"caches {tuple(k_cache.shape)} {k_cache.dtype}")
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    needed = -(-int(lens.max()) // block_size) if num_seqs else 0
    if tables.shape[0] != num_seqs or lens.shape[0] != num_seqs or tables.shape[1] < needed:
        raise ValueError(f"block_tables {tuple(tables.shape)} and seq_lens {tuple(lens.shape)} do not cover "
                         f"{num_seqs} requests of up to {needed} blocks")
    queries = q.contiguous()
    out = torch.empty_like(queries)
    status = lib.pdserve_decode_attention(queries.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                          tables.data_ptr(), tables.shape[1], lens.data_ptr(), out.data_ptr(),
                                          num_seqs, num_q_heads, num_kv_heads, head_dim, block_size, scale,
                                          torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"pdserve_decode_attention returned {status}")
    return out


def float32_cpu(*tensors: Tensor) -> bool:
    """Every tensor float32 on the CPU: what these kernels take (pdkernels/ops.py dispatches on it)."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def rms_norm(lib: ctypes.CDLL, x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
             ) -> Tensor | tuple[Tensor, Tensor]:
    """pdkernels.ops.rms_norm for float32 [T, H] on CPU: rms_norm(x (+ residual)) * weight, and with a
    residual also the sum. Inputs are not modified."""
    rows = x.contiguous()
    hidden = rows.shape[-1]
    res = residual.contiguous() if residual is not None else None
    w = weight.contiguous()
    if not float32_cpu(rows, w, *([res] if res is not None else [])) or w.numel() != hidden \
            or (res is not None and res.shape != rows.shape):
        raise ValueError(f"rms_norm takes float32 CPU x [.., H] and weight [H]; got {tuple(x.shape)} {x.dtype}, "
                         f"weight {tuple(weight.shape)} {weight.dtype}")
    out = torch.empty_like(rows)
    summed = torch.empty_like(rows) if res is not None else None
    lib.pdserve_rms_norm(rows.data_ptr(), None if res is None else res.data_ptr(), w.data_ptr(), out.data_ptr(),
                         None if summed is None else summed.data_ptr(), rows.numel() // hidden if hidden else 0,
                         hidden, eps, torch.get_num_threads())
    return out if summed is None else (out, summed)


def _rows(t: Tensor) -> tuple[Tensor, int]:
    """t [T, heads, D] as a tensor whose tokens are rows of heads * D contiguous elements, and the row
    stride in elements (a view of a fused qkv output has a stride wider than its row)."""
    if t.shape[0] > 0 and not (t.stride(2) == 1 and t.stride(1) == t.shape[2]):
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 0 else 0)


def rotary_embedding(lib: ctypes.CDLL, positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor,
                     is_neox: bool = True) -> tuple[Tensor, Tensor]:
    """pdkernels.ops.rotary_embedding for float32 on CPU: new rotated q [T, Hq, D] and k [T, Hkv, D]."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, rot_dim = k.shape[1], cos_sin_cache.shape[1]
    table = cos_sin_cache.contiguous()
    if not float32_cpu(q, k, table) or k.shape[0] != num_tokens or k.shape[2] != head_dim \
            or rot_dim > head_dim or rot_dim % 2:
        raise ValueError(f"rotary takes float32 CPU q [T, Hq, D], k [T, Hkv, D] and a table [P, rot_dim <= D]; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(cos_sin_cache.shape)}")
    (qs, q_stride), (ks, k_stride) = _rows(q), _rows(k)
    pos = positions.to(torch.int64).contiguous()
    q_out = torch.empty(num_tokens, num_q_heads, head_dim)
    k_out = torch.empty(num_tokens, num_kv_heads, head_dim)
    status = lib.pdserve_rotary(pos.data_ptr(), qs.data_ptr(), q_stride, ks.data_ptr(), k_stride, table.data_ptr(),
                                table.shape[0], q_out.data_ptr(), k_out.data_ptr(), num_tokens, num_q_heads,
                                num_kv_heads, head_dim, rot_dim, int(is_neox))
    if status != 0:
        raise ValueError(f"a position is outside the rotary table's {table.shape[0]} positions")
    return q_out, k_out


def write_kv(lib: ctypes.CDLL, key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot_mapping: Tensor) -> None:
    """pdkernels.ops.write_kv for float32 on CPU: key/value [T, Hkv, D] into slot_mapping [T] of the
    contiguous caches [blocks, block_size, Hkv, D]; slot < 0 skips; a slot past the cache is an error
    and writes nothing."""
    if not (float32_cpu(key, value, k_cache, v_cache) and k_cache.is_contiguous() and v_cache.is_contiguous()
            and k_cache.shape == v_cache.shape and key.shape == value.shape and key.shape[1:] == k_cache.shape[2:]):
        raise ValueError(f"write_kv takes float32 CPU key/value [T, Hkv, D] and contiguous caches "
                         f"[blocks, block_size, Hkv, D]; got {tuple(key.shape)}, {tuple(k_cache.shape)}")
    (ks, k_stride), (vs, v_stride) = _rows(key), _rows(value)
    slots = slot_mapping.to(torch.int64).contiguous()
    row = key.shape[1] * key.shape[2]
    status = lib.pdserve_write_kv(ks.data_ptr(), k_stride, vs.data_ptr(), v_stride, k_cache.data_ptr(),
                                  v_cache.data_ptr(), slots.data_ptr(), key.shape[0], row,
                                  k_cache.shape[0] * k_cache.shape[1])
    if status != 0:
        raise IndexError(f"a slot in slot_mapping is past the cache's {k_cache.shape[0] * k_cache.shape[1]} slots")


def silu_and_mul(lib: ctypes.CDLL, gate_up: Tensor) -> Tensor:
    """silu(gate) * up for float32 gate_up [..., 2I] (gate first) on CPU -> [..., I]."""
    rows = gate_up.contiguous()
    if not float32_cpu(rows) or rows.shape[-1] % 2:
        raise ValueError(f"silu_and_mul takes float32 CPU [..., 2I]; got {tuple(gate_up.shape)} {gate_up.dtype}")
    inter = rows.shape[-1] // 2
    out = torch.empty(*rows.shape[:-1], inter)
    lib.pdserve_silu_and_mul(rows.data_ptr(), out.data_ptr(), rows.numel() // rows.shape[-1] if inter else 0, inter,
                             torch.get_num_threads())
    return out


def read_sum(lib: ctypes.CDLL, x: Tensor) -> float:
    """The sum of a contiguous float32 CPU tensor, read once front to back as fast as the cores stream
    memory (torch.get_num_threads() threads): the probe of a benchmark's memory bound."""
    if not (float32_cpu(x) and x.is_contiguous()):
        raise ValueError(f"read_sum takes a contiguous float32 CPU tensor; got {tuple(x.shape)} {x.dtype}")
    return lib.pdserve_read_sum(x.data_ptr(), x.numel(), torch.get_num_threads())
