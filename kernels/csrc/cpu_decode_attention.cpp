// Decode attention over the paged KV cache, float32, CPU: one query token per request.
//
//   q [B, Hq, D], k_cache/v_cache [num_blocks, block_size, Hkv, D], block_tables [B, table_stride]
//   int32, seq_lens [B] int32  ->  out [B, Hq, D]
//
// One task per (request, KV head): its G = Hq / Hkv query heads read the head's K and V straight from
// the cache blocks the table names (no gathered copy), each once: pass 1 the G scores of every
// position, pass 2 a softmax per query head, pass 3 the weighted sum of V. The torch path gathers K/V
// into a new tensor first and runs several ops per layer (kernels/cpu_attention.py). Tasks are
// spread over OpenMP threads (torch's libgomp). Written with GCC/Clang vector extensions.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec.h"

namespace {

using namespace pdserve;

// C = D / 16 whole vectors per head row; the last D % 16 elements are done one by one
template <int C>
void one_task(const float* q, const float* k_cache, const float* v_cache, const int32_t* table,
              int64_t seq_len, float* out, int64_t group, int64_t num_kv_heads, int64_t head_dim,
              int64_t block_size, int64_t kv_head, float scale, std::vector<float>& scores,
              std::vector<float>& acc) {
    const int64_t rem_start = int64_t(C) * 16;
    const int64_t row_stride = num_kv_heads * head_dim;  // between positions within a block
    // the head's row of position s in a cache, through the block table
    auto row = [&](const float* cache, int64_t s) {
        return cache + (table[s / block_size] * block_size + s % block_size) * row_stride + kv_head * head_dim;
    };
    scores.resize(group * seq_len);
    // pass 1: scores[g][s] = scale * q_g . k_s
    for (int64_t s = 0; s < seq_len; ++s) {
        const float* k = row(k_cache, s);
        v16 kv[C > 0 ? C : 1];
        for (int c = 0; c < C; ++c) kv[c] = load16(k + c * 16);
        for (int64_t g = 0; g < group; ++g) {
            const float* qg = q + g * head_dim;
            v16 dot = v16{};
            for (int c = 0; c < C; ++c) dot += load16(qg + c * 16) * kv[c];
            float total = sum_lanes(dot);
            for (int64_t d = rem_start; d < head_dim; ++d) total += qg[d] * k[d];
            scores[g * seq_len + s] = total * scale;
        }
    }
    // pass 2: softmax of each query head's scores
    std::vector<float> inv_sum(group);
    for (int64_t g = 0; g < group; ++g) {
        float* row = scores.data() + g * seq_len;
        float top = row[0];
        for (int64_t s = 1; s < seq_len; ++s) top = row[s] > top ? row[s] : top;
        v16 vsum = v16{};
        float total = 0.0f;
        int64_t s = 0;
        for (; s + 16 <= seq_len; s += 16) {
            const v16 e = exp16(load16(row + s) - top);
            store16(row + s, e);
            vsum += e;
        }
        if (s < seq_len) {
            float tail[16];
            for (int i = 0; i < 16; ++i) tail[i] = s + i < seq_len ? row[s + i] - top : -100.0f;
            const v16 e = exp16(load16(tail));
            for (int64_t i = 0; s + i < seq_len; ++i) {
                row[s + i] = e[i];
                total += e[i];
            }
        }
        inv_sum[g] = 1.0f / (sum_lanes(vsum) + total);
    }
    // pass 3: out_g = sum_s p[g][s] v_s / sum
    acc.assign(group * head_dim, 0.0f);
    for (int64_t s = 0; s < seq_len; ++s) {
        const float* v = row(v_cache, s);
        v16 vv[C > 0 ? C : 1];
        for (int c = 0; c < C; ++c) vv[c] = load16(v + c * 16);
        for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * seq_len + s];
            float* a = acc.data() + g * head_dim;
            for (int c = 0; c < C; ++c) store16(a + c * 16, load16(a + c * 16) + p * vv[c]);
            for (int64_t d = rem_start; d < head_dim; ++d) a[d] += p * v[d];
        }
    }
    for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < head_dim; ++d) out[g * head_dim + d] = acc[g * head_dim + d] * inv_sum[g];
}

template <int C>
void run(const float* q, const float* k_cache, const float* v_cache, const int32_t* block_tables,
         int64_t table_stride, const int32_t* seq_lens, float* out, int64_t num_seqs, int64_t num_q_heads,
         int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, int threads) {
    const int64_t group = num_q_heads / num_kv_heads;
    const int64_t num_tasks = num_seqs * num_kv_heads;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        std::vector<float> scores, acc;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_tasks; ++task) {
            const int64_t b = task / num_kv_heads, h = task % num_kv_heads;
            const int64_t offset = (b * num_q_heads + h * group) * head_dim;
            if (seq_lens[b] <= 0) {
                std::memset(out + offset, 0, group * head_dim * sizeof(float));
                continue;
            }
            one_task<C>(q + offset, k_cache, v_cache, block_tables + b * table_stride, seq_lens[b],
                        out + offset, group, num_kv_heads, head_dim, block_size, h, scale, scores, acc);
        }
    }
}

}  // namespace

extern "C" {

// head_dim up to this is served (callers use torch's path above it)
int pdserve_decode_attention_max_head_dim() { return 16 * 8 + 15; }

// returns 0, or -1 for a shape it does not serve
int pdserve_decode_attention(const float* q, const float* k_cache, const float* v_cache,
                             const int32_t* block_tables, int64_t table_stride, const int32_t* seq_lens,
                             float* out, int64_t num_seqs, int64_t num_q_heads, int64_t num_kv_heads,
                             int64_t head_dim, int64_t block_size, float scale, int threads) {
    if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0 || block_size <= 0) return -1;
#define PDSERVE_CASE(C) \
    case C: run<C>(q, k_cache, v_cache, block_tables, table_stride, seq_lens, out, num_seqs, num_q_heads, \
                   num_kv_heads, head_dim, block_size, scale, threads); return 0;
    switch (head_dim / 16) {
        PDSERVE_CASE(0) PDSERVE_CASE(1) PDSERVE_CASE(2) PDSERVE_CASE(3) PDSERVE_CASE(4)
        PDSERVE_CASE(5) PDSERVE_CASE(6) PDSERVE_CASE(7) PDSERVE_CASE(8)
        default: return -1;
    }
#undef PDSERVE_CASE
}

}
