// y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]) for a few rows of x (decode): float32, CPU.
//
// A decode step's linear layers are bound by reading each weight once from memory: 2*M flops per
// weight element. The weight is re-laid once, at load, into tiles of T output columns (two vector
// registers: T = 32 with AVX-512, 16 with AVX2, 8 with NEON):
//
//     w [N, K] (row-major)  ->  tiled [ceil(N / T)][K][T]      (zero-padded to whole tiles)
//
// so a tile is one contiguous run of K * T * 4 bytes that the kernel reads front to back (what the
// hardware prefetcher streams best), and for each k the T weights of the tile multiply the broadcast
// x[m, k] of every row m: M x T accumulators stay in registers, no horizontal sums. Several tiles
// are read at once when M is small, so there are enough independent accumulators to hide the FMA
// latency. Written with GCC/Clang vector extensions in vec.h's vf (one hardware register). Threads:
// OpenMP over tiles (the process's libgomp, which is torch's).
//
// Built and loaded by pdkernels/cpu_native.py (ctypes; no torch headers, compiles in seconds), which
// also lays the weight out (tile_weight).
#include <cstdint>
#include <cstring>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "vec.h"

namespace {
using namespace pdserve;

// Register blocking follows the vector registers -march=native gives (vec.h: kLanes floats each,
// kVecRegs of them). A tile is two registers wide (32 columns with AVX-512, 16 with AVX2, 8 with NEON),
// and every row of a group keeps one accumulator per register of each tile in flight, so a group's
// accumulators must fit the register file: with 32 registers all 8 rows at once; with AVX2's 16, at most
// 4 rows at once (M = 5-8 as two groups of rows over the same chunk of tiles, the second reading it from
// L2). Until 2026-12-03 the kernel was written for AVX-512 alone (16-float vectors, tiles of 32): on an
// AVX2 host GCC kept those vectors on the stack and the kernel ran at 0.15-0.73x torch's F.linear.
constexpr int kTileVecs = 2;
constexpr int kMaxGroupRows = kVecRegs >= 32 ? 8 : 4;
constexpr int kTile = kLanes * kTileVecs;  // output columns per tile
// each tile's weights are requested this many k (x kTile floats: 2-4 KiB) ahead of the FMAs that use them.
// The hardware prefetcher alone let the stream fall behind once the FMAs per weight grew: one thread
// at M = 8 streamed 7 GB/s against 12 at M = 1 on a 10 GB/s host; with this 9-12 GB/s at every M
// (25-35% faster at M = 7-8, a few percent at M = 1-4; prefetches into L1 without L2 (NTA) were 2x
// slower at M = 1; docs/benchmarks.md, "Software prefetch in the small-M kernel")
constexpr int64_t kPrefetchAhead = 32;

// k in [k0, k1) of tiles [t, t + P) against the M rows of x; the first chunk starts the sums, the last
// adds the bias, the others add to what y holds
template <int M, int P>
inline void tiles(const float* __restrict x, const float* __restrict tiled, const float* __restrict bias,
                  float* __restrict y, int64_t K, int64_t N, int64_t t, int64_t k0, int64_t k1) {
    constexpr int V = kTileVecs;
    vf acc[M][P][V];
    float staged[M][P][kTile];  // y's values for a partial last tile, or a chunk's partial sums
    for (int p = 0; p < P; ++p) {
        const int64_t n0 = (t + p) * kTile;
        const int64_t width = N - n0 < kTile ? N - n0 : kTile;  // the last tile may be partly padding
        for (int m = 0; m < M; ++m) {
            if (k0 == 0) {
                for (int v = 0; v < V; ++v) acc[m][p][v] = vf{};
            } else {
                std::memset(staged[m][p], 0, sizeof(staged[m][p]));
                std::memcpy(staged[m][p], y + m * N + n0, width * sizeof(float));
                for (int v = 0; v < V; ++v) acc[m][p][v] = loadv(staged[m][p] + kLanes * v);
            }
        }
    }
    const float* wt[P];
    for (int p = 0; p < P; ++p) wt[p] = tiled + (t + p) * K * kTile;
    for (int64_t k = k0; k < k1; ++k) {
        vf w[P][V];
        for (int p = 0; p < P; ++p) {
            for (int v = 0; v < V; ++v) {
                if (kLanes * v % 16 == 0)  // once per 64-byte line, into L2; never faults
                    __builtin_prefetch(wt[p] + (k + kPrefetchAhead) * kTile + kLanes * v, 0, 1);
                w[p][v] = loadv(wt[p] + k * kTile + kLanes * v);
            }
        }
        for (int m = 0; m < M; ++m) {
            const float xv = x[m * K + k];
            for (int p = 0; p < P; ++p)
                for (int v = 0; v < V; ++v) acc[m][p][v] += xv * w[p][v];
        }
    }
    for (int p = 0; p < P; ++p) {
        const int64_t n0 = (t + p) * kTile;
        const int64_t width = N - n0 < kTile ? N - n0 : kTile;
        vf b[V];
        for (int v = 0; v < V; ++v) b[v] = vf{};
        if (bias && k1 == K) {
            float padded[kTile] = {};
            std::memcpy(padded, bias + n0, width * sizeof(float));
            for (int v = 0; v < V; ++v) b[v] = loadv(padded + kLanes * v);
        }
        for (int m = 0; m < M; ++m) {
            if (width == kTile) {
                for (int v = 0; v < V; ++v) storev(y + m * N + n0 + kLanes * v, acc[m][p][v] + b[v]);
            } else {
                for (int v = 0; v < V; ++v) storev(staged[m][p] + kLanes * v, acc[m][p][v] + b[v]);
                std::memcpy(y + m * N + n0, staged[m][p], width * sizeof(float));
            }
        }
    }
}

// tiles read at once by a group of R rows. AVX-512: 8-24 independent accumulators (of 32 vector
// registers; the compiler takes the weight as the FMAs' memory operand, so the rest hold the broadcast
// x); more tiles in flight kept M = 3-6 nearer the memory bound (9-20% faster than 2 tiles at M = 3-4
// and 1 at M = 5-6, one core). AVX2's 16: 8 accumulators at 1-2 rows, 6-8 at 3-4.
template <int R> constexpr int tiles_at_once() {
    if (kVecRegs >= 32) return R <= 3 ? 4 : R == 4 ? 3 : R <= 6 ? 2 : 1;
    return R == 1 ? 4 : R == 2 ? 2 : 1;
}

// k is walked in chunks whose slice of x (M rows) fits in 24 of a 32 KiB L1 cache, so every tile
// reads x from L1; a chunk's run of a tile is still contiguous (chunk * kTile * 4 bytes)
constexpr int64_t kChunkFloats = 6144;

// rows [r0, r0 + R) of x against tile groups [first, last) (P tiles each) for k in [k0, k1)
template <int R, int P>
inline void row_group(const float* x, const float* tiled, const float* bias, float* y, int64_t K, int64_t N,
                      int64_t r0, int64_t first, int64_t last, int64_t k0, int64_t k1) {
    const int64_t num_tiles = (N + kTile - 1) / kTile;
    for (int64_t g = first; g < last; ++g) {
        if ((g + 1) * P <= num_tiles) {
            tiles<R, P>(x + r0 * K, tiled, bias, y + r0 * N, K, N, g * P, k0, k1);
        } else {
            for (int64_t t = g * P; t < num_tiles; ++t)
                tiles<R, 1>(x + r0 * K, tiled, bias, y + r0 * N, K, N, t, k0, k1);
        }
    }
}

template <int M>
void run(const float* x, const float* tiled, const float* bias, float* y, int64_t K, int64_t N, int threads) {
    // M rows as one group, or as two (the first the larger) where one would not fit the registers; both
    // groups' tiles are grouped alike, so a thread's share of the weight is the same for each
    constexpr int R0 = M <= kMaxGroupRows ? M : (M + 1) / 2, R1 = M - R0;
    constexpr int P = tiles_at_once<R0>();
    const int64_t num_tiles = (N + kTile - 1) / kTile;
    const int64_t num_groups = (num_tiles + P - 1) / P;
    const int64_t chunk = kChunkFloats / M;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t first = 0, last = num_groups;
#ifdef _OPENMP
        const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        first = num_groups * me / team;
        last = num_groups * (me + 1) / team;
#endif
        for (int64_t k0 = 0; k0 < K; k0 += chunk) {
            const int64_t k1 = K - k0 < chunk ? K : k0 + chunk;
            if constexpr (R1 == 0) {
                row_group<R0, P>(x, tiled, bias, y, K, N, 0, first, last, k0, k1);
            } else {  // tile group by tile group, so the second group of rows finds the tiles in L2
                for (int64_t g = first; g < last; ++g) {
                    row_group<R0, P>(x, tiled, bias, y, K, N, 0, g, g + 1, k0, k1);
                    row_group<R1, P>(x, tiled, bias, y, K, N, R0, g, g + 1, k0, k1);
                }
            }
        }
    }
}

}  // namespace

extern "C" {

int pdserve_tile_width() { return kTile; }

int pdserve_max_rows() { return 8; }

// returns 0, or -1 for an M it does not serve (1..pdserve_max_rows())
int pdserve_small_m_linear(const float* x, const float* tiled, const float* bias, float* y, int64_t M, int64_t K,
                           int64_t N, int threads) {
    switch (M) {
        case 1: run<1>(x, tiled, bias, y, K, N, threads); return 0;
        case 2: run<2>(x, tiled, bias, y, K, N, threads); return 0;
        case 3: run<3>(x, tiled, bias, y, K, N, threads); return 0;
        case 4: run<4>(x, tiled, bias, y, K, N, threads); return 0;
        case 5: run<5>(x, tiled, bias, y, K, N, threads); return 0;
        case 6: run<6>(x, tiled, bias, y, K, N, threads); return 0;
        case 7: run<7>(x, tiled, bias, y, K, N, threads); return 0;
        case 8: run<8>(x, tiled, bias, y, K, N, threads); return 0;
        default: return -1;
    }
}

}
