// Decode attention over the paged KV cache, float32, CPU: one query token per request.
//
//   q [B, Hq, D], k_cache/v_cache [num_blocks, block_size, Hkv, D], block_tables [B, table_stride]
//   int32, seq_lens [B] int32  ->  out [B, Hq, D]
//
// One task per request (or per range of its KV heads, when there are fewer requests than threads):
// its query heads read K and V straight from the cache blocks the table names (no gathered copy), a
// position's rows for the task's heads being one contiguous run. Pass 1 the scores of every position
// per query head (a vector's width of positions' dot products reduced together), pass 2 a softmax per
// query head, pass 3
// the weighted sum of V for up to 4 query heads of a KV head at once; positions in chunks that stay in
// L1 across query heads. The torch path gathers K/V
// into a new tensor first and runs several ops per layer (pdkernels/cpu_attention.py). Tasks are
// spread over OpenMP threads (torch's libgomp). Written with GCC/Clang vector extensions, in vec.h's vf:
// one hardware register (kLanes floats), so the blocking follows the host's registers.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec.h"

namespace {

using namespace pdserve;

// transpose_sum(dot): lane i of the result = the sum of dot(i)'s lanes, for as many vectors as lanes,
// by rounds of pairwise shuffles and adds (for 16: 30 shuffles and 15 adds, where 16 separate horizontal
// sums take ~4x as many). Depth first: dot(i) is called in order and each pair reduced as soon as both
// are there, so ~log2(lanes) partial sums are live beside the caller's registers, not a whole vector's
// width of dot products (with AVX2's 16 registers, 8 of them held q at D = 64: the 8 dots spilled).
template <class Dot>
inline v4 transpose_sum4(Dot dot) {
    auto pair = [&](int i) {  // lanes 0-1: partial sums of dot(i), 2-3: of dot(i + 1)
        const v4 x = dot(i), y = dot(i + 1);
        return __builtin_shufflevector(x, y, 0, 1, 4, 5) + __builtin_shufflevector(x, y, 2, 3, 6, 7);
    };
    const v4 a0 = pair(0), a1 = pair(2);
    return __builtin_shufflevector(a0, a1, 0, 2, 4, 6) + __builtin_shufflevector(a0, a1, 1, 3, 5, 7);
}

// AVX2: the two rounds inside each 128-bit half first (vshufps, cheap), one round across the halves
// last (vperm2f128: 8 micro-ops on Zen 1; the round order that crosses first took 8 of them per call)
template <class Dot>
inline v8 transpose_sum8(Dot dot) {
    auto pair = [&](int i) {  // per half: [x0+x2, x1+x3, y0+y2, y1+y3] of x = dot(i), y = dot(i + 1)
        const v8 x = dot(i), y = dot(i + 1);
        return __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
    };
    auto quad = [&](int i) {  // per half: the half's sum of dot(i) .. dot(i + 3)
        const v8 a = pair(i), b = pair(i + 2);
        return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
               __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
    };
    const v8 b0 = quad(0), b1 = quad(4);
    return __builtin_shufflevector(b0, b1, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(b0, b1, 4, 5, 6, 7, 12, 13, 14, 15);
}

// AVX-512: the rounds and their order as before depth first (the same sums, bit for bit)
template <class Dot>
inline v16 transpose_sum16(Dot dot) {
    auto pair = [&](int i) {  // lanes 0-7: partial sums of dot(i), 8-15 of dot(i + 1)
        const v16 x = dot(i), y = dot(i + 1);
        return __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    };
    auto quad = [&](int i) {  // four lanes each of dot(i) .. dot(i + 3)
        const v16 a = pair(i), b = pair(i + 2);
        return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    };
    auto oct = [&](int i) {  // two lanes each of dot(i) .. dot(i + 7)
        const v16 a = quad(i), b = quad(i + 4);
        return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    };
    const v16 c0 = oct(0), c1 = oct(8);
    return __builtin_shufflevector(c0, c1, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(c0, c1, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

template <class Dot>
inline vf transpose_sum(Dot dot) {
    if constexpr (kLanes == 16) return transpose_sum16(dot);
    else if constexpr (kLanes == 8) return transpose_sum8(dot);
    else return transpose_sum4(dot);
}

// A task's rows of K (and V) for its heads are contiguous within a position; positions jump through
// the block table, so the task asks for the chunk kAhead chunks on itself while it computes this one:
// every cache line (not every other one, leaving the rest to the adjacent-line prefetcher), into L2
// (more misses in flight than L1 allows). Measured on 12 layers' K/V at 8 x 256 positions, one thread:
// one chunk ahead every other line 6.0-7.5 ms, two ahead every line 5.0-5.5 ms. The chunk's prefetches
// are spread over its query heads' work (part j of `parts`: every parts-th position), not issued at once:
// a chunk is ~256 lines and a core tracks ~20 misses, so a burst of prefetches stalls the core until most
// have landed and the reads stop overlapping the math (on Zen 1 spreading them made the kernel 1.3-1.4x).
constexpr int64_t kAhead = 2;
inline void prefetch_rows(const float* cache, const int64_t* rows, int64_t first, int64_t seq_len, int64_t chunk,
                          int64_t width, int64_t part = 0, int64_t parts = 1) {
    const int64_t last = first + chunk < seq_len ? first + chunk : seq_len;
    for (int64_t s = first + part; s < last; s += parts)
        for (int64_t d = 0; d < width; d += 16) __builtin_prefetch(cache + rows[s] + d, 0, 2);
}

// Positions are taken in chunks whose K (or V) rows for the task's heads fit in half a 32 KiB L1
// cache: each query head after the first reads the chunk from L1.
inline int64_t chunk_positions(int64_t width) {
    const int64_t fit = 16384 / (width * int64_t(sizeof(float))) / 16 * 16;
    return fit > 16 ? fit : 16;
}

// query heads at once in pass 3: NH x C accumulators and C loaded vectors in the registers (with AVX2's
// 16 and a head of 8 registers, one: its V loads become the FMAs' memory operands)
template <int C>
constexpr int64_t pv_heads_max() {
    if (kVecRegs >= 32 && kLanes == 16) return C <= 4 ? 4 : C <= 6 ? 3 : 2;
    const int nh = C > 0 ? (kVecRegs - 1) / C - 1 : 4;
    return nh < 1 ? 1 : nh > 4 ? 4 : nh;
}

// Pass 3 for NH query heads that share one KV head: out[h] += sum_t p[h][t] v_t over positions
// [c0, c1), each V row loaded once for the NH heads (NH x C accumulators and C loaded vectors stay in
// registers: pv_heads_max). One head at a time, V was loaded once per query head.
template <int C, int NH>
inline void pv_batch(const float* vh, const int64_t* rows, int64_t c0, int64_t c1, const float* p,
                     int64_t p_stride, float* o, int64_t o_stride) {
    if constexpr (C == 0) return;
    else {
        vf acc[NH][C];
        for (int h = 0; h < NH; ++h)
            for (int c = 0; c < C; ++c) acc[h][c] = loadv(o + h * o_stride + c * kLanes);
        for (int64_t t = c0; t < c1; ++t) {
            const float* v = vh + rows[t];
            vf x[C];
            for (int c = 0; c < C; ++c) x[c] = loadv(v + c * kLanes);
            for (int h = 0; h < NH; ++h) {
                const vf w = vf{} + p[h * p_stride + t];
                for (int c = 0; c < C; ++c) acc[h][c] += w * x[c];
            }
        }
        for (int h = 0; h < NH; ++h)
            for (int c = 0; c < C; ++c) storev(o + h * o_stride + c * kLanes, acc[h][c]);
    }
}

// One request, KV heads [h0, h1): their G query heads each. C = D / kLanes whole vectors per head row;
// the last D % kLanes elements are done one by one. q and out point at the request's head h0 * G.
//   pass 1, per chunk of positions, per query head: scores = scale * q . k_s, kLanes positions at a
//           time (kLanes independent sums, reduced together by transpose_sum; a position's C loads and
//           FMAs one after the other, so only one row pointer is live: 16 of them spilled registers)
//   pass 2, per query head: softmax of its scores
//   pass 3, per chunk, per KV head, up to 4 of its query heads at once: out += sum_s p[s] v_s
template <int C>
void one_task(const float* q, const float* k_cache, const float* v_cache, const int32_t* table,
              int64_t seq_len, float* out, int64_t group, int64_t num_kv_heads, int64_t head_dim,
              int64_t block_size, int64_t h0, int64_t h1, float scale, std::vector<float>& scores,
              std::vector<int64_t>& rows) {
    const int64_t rem_start = int64_t(C) * kLanes;
    const int64_t row_stride = num_kv_heads * head_dim;  // between positions within a block
    const int64_t width = (h1 - h0) * head_dim;          // the task's part of a position's row
    const int64_t num_heads = (h1 - h0) * group;          // query heads of the task
    // rows[s]: offset of position s's row for head h0 in a cache, through the block table
    rows.resize(seq_len);
    for (int64_t s = 0, b = 0, i = 0; s < seq_len; ++s) {
        rows[s] = (int64_t(table[b]) * block_size + i) * row_stride + h0 * head_dim;
        if (++i == block_size) i = 0, ++b;
    }
    scores.resize(num_heads * seq_len);
    const int64_t chunk = chunk_positions(width);
    for (int64_t c0 = 0; c0 < seq_len; c0 += chunk) {
        const int64_t c1 = c0 + chunk < seq_len ? c0 + chunk : seq_len;
        for (int64_t j = 0; j < num_heads; ++j) {  // query head j reads KV head h0 + j / group
            prefetch_rows(k_cache, rows.data(), c0 + kAhead * chunk, seq_len, chunk, width, j, num_heads);
            const float* qj = q + j * head_dim;
            const float* kh = k_cache + (j / group) * head_dim;
            float* sj = scores.data() + j * seq_len;
            vf qv[C > 0 ? C : 1];
            for (int c = 0; c < C; ++c) qv[c] = loadv(qj + c * kLanes);
            auto tail = [&](int64_t s) {  // q . k_s over the last D % kLanes elements
                const float* k = kh + rows[s];
                float total = 0.0f;
                for (int64_t d = rem_start; d < head_dim; ++d) total += qj[d] * k[d];
                return total;
            };
            int64_t s0 = c0;
            for (; s0 + kLanes <= c1; s0 += kLanes) {
                vf r = transpose_sum([&](int i) {
                    const float* k = kh + rows[s0 + i];
                    vf d = vf{};
                    for (int c = 0; c < C; ++c) d += qv[c] * loadv(k + c * kLanes);
                    return d;
                });
                if (rem_start < head_dim)
                    for (int i = 0; i < kLanes; ++i) r[i] += tail(s0 + i);
                storev(sj + s0, r * scale);
            }
            for (; s0 < c1; ++s0) {
                const float* k = kh + rows[s0];
                vf d = vf{};
                for (int c = 0; c < C; ++c) d += qv[c] * loadv(k + c * kLanes);
                sj[s0] = (sum_lanes(d) + tail(s0)) * scale;
            }
        }
    }
    std::vector<float> inv_sum(num_heads);
    for (int64_t j = 0; j < num_heads; ++j) {
        float* p = scores.data() + j * seq_len;
        vf vtop = vf{} + p[0];
        int64_t m = 0;
        for (; m + kLanes <= seq_len; m += kLanes) {
            const vf x = loadv(p + m);
            vtop = x > vtop ? x : vtop;
        }
        float top = vtop[0];
        for (int i = 1; i < kLanes; ++i) top = vtop[i] > top ? vtop[i] : top;
        for (; m < seq_len; ++m) top = p[m] > top ? p[m] : top;
        vf vsum = vf{};
        float total = 0.0f;
        int64_t s = 0;
        for (; s + kLanes <= seq_len; s += kLanes) {
            const vf e = expv(loadv(p + s) - top);
            storev(p + s, e);
            vsum += e;
        }
        if (s < seq_len) {
            float rest[kLanes];
            for (int i = 0; i < kLanes; ++i) rest[i] = s + i < seq_len ? p[s + i] - top : -100.0f;
            const vf e = expv(loadv(rest));
            for (int64_t i = 0; s + i < seq_len; ++i) {
                p[s + i] = e[i];
                total += e[i];
            }
        }
        inv_sum[j] = 1.0f / (sum_lanes(vsum) + total);
    }
    for (int64_t i = 0; i < num_heads * head_dim; ++i) out[i] = 0.0f;
    for (int64_t c0 = 0; c0 < seq_len; c0 += chunk) {
        const int64_t c1 = c0 + chunk < seq_len ? c0 + chunk : seq_len;
        for (int64_t kv = 0; kv < h1 - h0; ++kv) {
            const float* vh = v_cache + kv * head_dim;
            for (int64_t g0 = 0; g0 < group;) {
                const int64_t j = kv * group + g0;
                const float* p = scores.data() + j * seq_len;
                float* o = out + j * head_dim;
                const int64_t nb = group - g0 < pv_heads_max<C>() ? group - g0 : pv_heads_max<C>();
                for (int64_t part = j; part < j + nb; ++part)
                    prefetch_rows(v_cache, rows.data(), c0 + kAhead * chunk, seq_len, chunk, width, part, num_heads);
                switch (nb) {
                    case 1: pv_batch<C, 1>(vh, rows.data(), c0, c1, p, seq_len, o, head_dim); break;
                    case 2: pv_batch<C, 2>(vh, rows.data(), c0, c1, p, seq_len, o, head_dim); break;
                    case 3: pv_batch<C, 3>(vh, rows.data(), c0, c1, p, seq_len, o, head_dim); break;
                    default: pv_batch<C, 4>(vh, rows.data(), c0, c1, p, seq_len, o, head_dim); break;
                }
                for (int64_t h = 0; h < nb && rem_start < head_dim; ++h)
                    for (int64_t u = c0; u < c1; ++u) {
                        const float* v = vh + rows[u];
                        for (int64_t d = rem_start; d < head_dim; ++d) o[h * head_dim + d] += p[h * seq_len + u] * v[d];
                    }
                g0 += nb;
            }
        }
    }
    for (int64_t j = 0; j < num_heads; ++j)
        for (int64_t d = 0; d < head_dim; ++d) out[j * head_dim + d] *= inv_sum[j];
}

// Tasks: each request's KV heads split into as few ranges as keep every thread busy (all heads in
// one task when there are at least as many requests as threads: one contiguous row per position).
template <int C>
void run(const float* q, const float* k_cache, const float* v_cache, const int32_t* block_tables,
         int64_t table_stride, const int32_t* seq_lens, float* out, int64_t num_seqs, int64_t num_q_heads,
         int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, int threads) {
    const int64_t group = num_q_heads / num_kv_heads;
    int64_t parts = num_seqs > 0 ? (threads + num_seqs - 1) / num_seqs : 1;
    parts = parts < num_kv_heads ? parts : num_kv_heads;
    const int64_t heads_per_task = (num_kv_heads + parts - 1) / parts;
    const int64_t tasks_per_seq = (num_kv_heads + heads_per_task - 1) / heads_per_task;
    const int64_t num_tasks = num_seqs * tasks_per_seq;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        std::vector<float> scores;
        std::vector<int64_t> rows;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_tasks; ++task) {
            const int64_t b = task / tasks_per_seq, h0 = task % tasks_per_seq * heads_per_task;
            const int64_t h1 = h0 + heads_per_task < num_kv_heads ? h0 + heads_per_task : num_kv_heads;
            const int64_t offset = (b * num_q_heads + h0 * group) * head_dim;
            if (seq_lens[b] <= 0) {
                std::memset(out + offset, 0, (h1 - h0) * group * head_dim * sizeof(float));
                continue;
            }
            one_task<C>(q + offset, k_cache, v_cache, block_tables + b * table_stride, seq_lens[b],
                        out + offset, group, num_kv_heads, head_dim, block_size, h0, h1, scale, scores, rows);
        }
    }
}

constexpr int64_t kMaxHeadDim = 16 * 8 + 15;

// run<C> for C = head_dim / kLanes, one instance per whole number of vectors up to kMaxHeadDim
template <int C>
int dispatch(int64_t c, const float* q, const float* k_cache, const float* v_cache, const int32_t* block_tables,
             int64_t table_stride, const int32_t* seq_lens, float* out, int64_t num_seqs, int64_t num_q_heads,
             int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, int threads) {
    if (c == C) {
        run<C>(q, k_cache, v_cache, block_tables, table_stride, seq_lens, out, num_seqs, num_q_heads, num_kv_heads,
               head_dim, block_size, scale, threads);
        return 0;
    }
    if constexpr (C > 0)
        return dispatch<C - 1>(c, q, k_cache, v_cache, block_tables, table_stride, seq_lens, out, num_seqs,
                               num_q_heads, num_kv_heads, head_dim, block_size, scale, threads);
    return -1;
}

}  // namespace

extern "C" {

// head_dim up to this is served (callers use torch's path above it)
int pdserve_decode_attention_max_head_dim() { return kMaxHeadDim; }

// returns 0, or -1 for a shape it does not serve
int pdserve_decode_attention(const float* q, const float* k_cache, const float* v_cache,
                             const int32_t* block_tables, int64_t table_stride, const int32_t* seq_lens,
                             float* out, int64_t num_seqs, int64_t num_q_heads, int64_t num_kv_heads,
                             int64_t head_dim, int64_t block_size, float scale, int threads) {
    if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0 || block_size <= 0 || head_dim < 0
            || head_dim > kMaxHeadDim)
        return -1;
    return dispatch<kMaxHeadDim / kLanes>(head_dim / kLanes, q, k_cache, v_cache, block_tables, table_stride,
                                          seq_lens, out, num_seqs, num_q_heads, num_kv_heads, head_dim, block_size,
                                          scale, threads);
}

}
