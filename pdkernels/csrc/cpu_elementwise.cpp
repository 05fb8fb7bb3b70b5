// The small per-layer ops of a float32 CPU step, one pass each: RMSNorm (with the residual add fused),
// rotary embedding, writing K/V into the paged cache, SiLU-and-multiply. At decode sizes torch spends
// far longer dispatching these (an RMSNorm of one 768-wide row is ~50 us through aten, six ops) than
// computing them; here each is one call. Same math as pdkernels/ops.py's torch paths, in float32.
// Also a streaming read, the memory bound benchmarks measure steps against.
#include <cmath>
#include <cstdint>
#include <cstring>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "vec.h"

namespace {

using namespace pdserve;

// work this small runs on the calling thread: a parallel region costs more than it saves
constexpr int64_t kParallelMinElements = 1 << 16;

}  // namespace

extern "C" {

// out = rms_norm(s) * weight with s = x (+ residual, written to summed); rows of H, contiguous
void pdserve_rms_norm(const float* x, const float* residual, const float* weight, float* out, float* summed,
                      int64_t num_rows, int64_t hidden, float eps, int threads) {
    const bool parallel = threads > 1 && num_rows * hidden >= kParallelMinElements;
#pragma omp parallel for num_threads(threads) if (parallel) schedule(static)
    for (int64_t t = 0; t < num_rows; ++t) {
        const float* xr = x + t * hidden;
        float* src = nullptr;
        if (residual) {
            const float* rr = residual + t * hidden;
            src = summed + t * hidden;
            for (int64_t i = 0; i < hidden; ++i) src[i] = xr[i] + rr[i];
        }
        const float* s = residual ? src : xr;
        vf acc = vf{};
        int64_t i = 0;
        for (; i + kLanes <= hidden; i += kLanes) {
            const vf v = loadv(s + i);
            acc += v * v;
        }
        float total = sum_lanes(acc);
        for (; i < hidden; ++i) total += s[i] * s[i];
        const float inv = 1.0f / std::sqrt(total / float(hidden) + eps);
        float* o = out + t * hidden;
        for (int64_t j = 0; j < hidden; ++j) o[j] = (s[j] * inv) * weight[j];
    }
}

// q_out [T, Hq, D], k_out [T, Hkv, D] (contiguous) = rotated q, k; q and k rows of heads*D contiguous
// elements, token t at q + t * q_stride. Only the first rot_dim of D rotate (the rest are copied).
// Neox style rotates halves, GPT-J style interleaved pairs. Returns -1 for a position outside the table.
int pdserve_rotary(const int64_t* positions, const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                   const float* cos_sin, int64_t max_position, float* q_out, float* k_out, int64_t num_tokens,
                   int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t rot_dim, int is_neox) {
    for (int64_t t = 0; t < num_tokens; ++t)
        if (positions[t] < 0 || positions[t] >= max_position) return -1;
    const int64_t half = rot_dim / 2;
    for (int64_t t = 0; t < num_tokens; ++t) {
        const float* cos = cos_sin + positions[t] * rot_dim;
        const float* sin = cos + half;
        for (int which = 0; which < 2; ++which) {
            const int64_t heads = which == 0 ? num_q_heads : num_kv_heads;
            const float* src_row = which == 0 ? q + t * q_stride : k + t * k_stride;
            float* dst_row = which == 0 ? q_out + t * num_q_heads * head_dim : k_out + t * num_kv_heads * head_dim;
            for (int64_t h = 0; h < heads; ++h) {
                const float* x = src_row + h * head_dim;
                float* y = dst_row + h * head_dim;
                if (is_neox) {
                    for (int64_t i = 0; i < half; ++i) {
                        const float x1 = x[i], x2 = x[i + half];
                        y[i] = x1 * cos[i] - x2 * sin[i];
                        y[i + half] = x2 * cos[i] + x1 * sin[i];
                    }
                } else {
                    for (int64_t i = 0; i < half; ++i) {
                        const float x1 = x[2 * i], x2 = x[2 * i + 1];
                        y[2 * i] = x1 * cos[i] - x2 * sin[i];
                        y[2 * i + 1] = x2 * cos[i] + x1 * sin[i];
                    }
                }
                for (int64_t i = rot_dim; i < head_dim; ++i) y[i] = x[i];
            }
        }
    }
    return 0;
}

// k_cache/v_cache viewed as [num_slots, row] rows; token t's key (row elements) at key + t * key_stride.
// slot < 0 skips the token. Returns -1 (writing nothing) for a slot outside the cache.
int pdserve_write_kv(const float* key, int64_t key_stride, const float* value, int64_t value_stride,
                     float* k_cache, float* v_cache, const int64_t* slots, int64_t num_tokens, int64_t row,
                     int64_t num_slots) {
    for (int64_t t = 0; t < num_tokens; ++t)
        if (slots[t] >= num_slots) return -1;
    for (int64_t t = 0; t < num_tokens; ++t) {
        if (slots[t] < 0) continue;
        std::memcpy(k_cache + slots[t] * row, key + t * key_stride, row * sizeof(float));
        std::memcpy(v_cache + slots[t] * row, value + t * value_stride, row * sizeof(float));
    }
    return 0;
}

// out [T, I] = silu(gate) * up with gate_up [T, 2I] (gate first), contiguous
void pdserve_silu_and_mul(const float* gate_up, float* out, int64_t num_rows, int64_t inter, int threads) {
    const bool parallel = threads > 1 && num_rows * inter >= kParallelMinElements;
#pragma omp parallel for num_threads(threads) if (parallel) schedule(static)
    for (int64_t t = 0; t < num_rows; ++t) {
        const float* g = gate_up + t * 2 * inter;
        const float* u = g + inter;
        float* o = out + t * inter;
        int64_t i = 0;
        for (; i + kLanes <= inter; i += kLanes) {
            const vf gv = loadv(g + i);
            storev(o + i, gv / (1.0f + expv(-gv)) * loadv(u + i));
        }
        for (; i < inter; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
}

// the sum of x[0, n), read once front to back, eight vector sums in flight: a streaming read as fast as
// a core pulls memory, the bound bench/cpu_step.py holds decode steps to (torch.sum and amax read 20-30%
// slower on the 2-core box). Threads take contiguous thirds, halves, ... of x.
double pdserve_read_sum(const float* x, int64_t n, int threads) {
    constexpr int64_t kBlock = 8 * kLanes;  // floats per iteration: 8 vectors
    double total = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(+ : total)
    {
        int64_t begin = 0, end = n;
#ifdef _OPENMP
        const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        begin = n / kBlock * me / team * kBlock;
        end = me + 1 == team ? n : n / kBlock * (me + 1) / team * kBlock;
#endif
        vf acc[8] = {};
        int64_t i = begin;
        for (; i + kBlock <= end; i += kBlock)
            for (int j = 0; j < 8; ++j) acc[j] += loadv(x + i + kLanes * j);
        vf sum = vf{};
        for (int j = 0; j < 8; ++j) sum += acc[j];
        double part = sum_lanes(sum);
        for (; i < end; ++i) part += x[i];
        total += part;
    }
    return total;
}

}
