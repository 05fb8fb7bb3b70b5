// A decode step's decoder layers in one call: float32, CPU, 1-8 rows of one new token each.
//
// At batch 1 a decode step of a 12-layer model makes ~200 Python-level calls (modules, kernel
// wrappers, their checks) that together cost ~3 ms of a ~20 ms step: more than attention. This
// driver runs the same kernels in the same order on the same inputs (so its output is bit-identical to
// serving/models/causal_lm.py over pdkernels/ops.py), one call per range of layers. Per layer, with
// Q = Hq * D, KV = Hkv * D:
//
//   hidden, residual [M, H]  --rms_norm(+residual)-->  normed [M, H]
//   normed --linear(qkv)--> qkv [M, Q + 2 KV] --(q/k head norms)--> --rotary--> q [M, Q], k [M, KV]
//   k, v --write_kv--> cache slots;  q --decode_attention over the paged cache--> attn [M, Q]
//   attn --linear(o)--> o [M, H] --rms_norm(+residual)--> normed --linear(gate_up)--> [M, 2I]
//        --silu_and_mul--> [M, I] --linear(down)--> hidden [M, H]
//
// The caller (pdkernels/cpu_native.py: decode_layers) owns every buffer: the weights (laid out by
// tile_weight), the KV cache, and a scratch area of pdserve_decode_layers_scratch floats.
#include <cstdint>
#include <cstring>

#include "kernels.h"

extern "C" {

// One decoder layer's tensors (pdkernels/cpu_native.py: Layer mirrors it field for field). Linear
// weights are tiled; a bias, q_norm or k_norm may be null.
struct PdserveLayer {
    const float* input_norm;   // [H]
    const float* post_norm;    // [H]
    const float* qkv;          // tiled [Q + 2 KV, H]
    const float* qkv_bias;     // [Q + 2 KV]
    const float* q_norm;       // [D] (Qwen3) or null
    const float* k_norm;       // [D] or null
    const float* o;            // tiled [H, Q]
    const float* o_bias;       // [H]
    const float* gate_up;      // tiled [2 I, H]
    const float* gate_up_bias; // [2 I]
    const float* down;         // tiled [H, I]
    const float* down_bias;    // [H]
    float* k_cache;            // [num_slots, Hkv, D]
    float* v_cache;            // [num_slots, Hkv, D]
};

// A tensor-parallel rank's row-parallel sums (pdkernels/csrc/cpu_shm_collectives.cpp): after o and down
// the rank's partial output is all-reduced over the group, then the bias added once; null: one rank.
struct PdserveCollective {
    void* base;      // the group's shared-memory region
    int32_t rank, size;
    uint64_t* seq;   // the group's collective counter, shared with the Python side's ShmCollectives
    double timeout_s;
};

struct PdserveDecodeShape {
    int64_t hidden, num_q_heads, num_kv_heads, head_dim, intermediate;
    int64_t rot_dim, max_position, is_neox;
    int64_t block_size, num_slots;
    float eps, scale;
};

// floats of scratch a call with M rows needs
int64_t pdserve_decode_layers_scratch(const PdserveDecodeShape* s, int64_t M) {
    const int64_t q = s->num_q_heads * s->head_dim, kv = s->num_kv_heads * s->head_dim;
    // normed, summed, o: [M, H]; qkv; q/k head-normed; q/k rotated; attn; gate_up; act
    return M * (3 * s->hidden + (q + 2 * kv) + (q + kv) + (q + kv) + q + 2 * s->intermediate + s->intermediate);
}

// Runs layers[0..num_layers) over hidden/residual [M, H] in place: hidden becomes the last layer's
// output, residual the running sum before it (vLLM's residual stream). residual_valid = 0 for the
// model's first layer (residual is then set from hidden). Returns 0; -1 for M outside 1..8 or a
// shape the kernels refuse; -2 for a position outside the rotary table; -3 for a slot outside the
// cache; -4 for a collective that failed (a tensor-parallel peer gone or late). On an error the cache may hold this step's K/V of the layers before the failing one (slots
// the step owns).
// Row-parallel output: linear without bias, the sum over the group, then the bias. 0, -1 (the linear
// refused its shape), or -4 (a peer rank is gone or did not arrive in time).
static int row_parallel(const PdserveCollective* c, const float* x, const float* tiled, const float* bias, float* y,
                        int64_t M, int64_t K, int64_t N, int threads) {
    if (c == nullptr) return pdserve_small_m_linear(x, tiled, bias, y, M, K, N, threads) ? -1 : 0;
    if (pdserve_small_m_linear(x, tiled, nullptr, y, M, K, N, threads)) return -1;
    if (pdserve_shm_all_reduce(c->base, c->rank, c->size, ++*c->seq, y, M * N, c->timeout_s)) return -4;
    if (bias)
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) y[m * N + n] += bias[n];
    return 0;
}

int pdserve_decode_layers(const PdserveLayer* layers, int64_t num_layers, const PdserveDecodeShape* s, int64_t M,
                          float* hidden, float* residual, int residual_valid, const int64_t* positions,
                          const int64_t* slots, const int32_t* block_tables, int64_t table_stride,
                          const int32_t* seq_lens,
                          const float* cos_sin, float* scratch, int threads, const PdserveCollective* collective) {
    if (M < 1 || M > 8) return -1;
    const int64_t H = s->hidden, D = s->head_dim, I = s->intermediate;
    const int64_t Q = s->num_q_heads * D, KV = s->num_kv_heads * D, QKV = Q + 2 * KV;
    float* normed = scratch;
    float* summed = normed + M * H;
    float* o = summed + M * H;
    float* qkv = o + M * H;
    float* q_normed = qkv + M * QKV;
    float* k_normed = q_normed + M * Q;
    float* q_rot = k_normed + M * KV;
    float* k_rot = q_rot + M * Q;
    float* attn = k_rot + M * KV;
    float* gate_up = attn + M * Q;
    float* act = gate_up + M * 2 * I;
    const size_t row_bytes = size_t(M * H) * sizeof(float);
    for (int64_t l = 0; l < num_layers; ++l) {
        const PdserveLayer& w = layers[l];
        if (l == 0 && !residual_valid) {
            std::memcpy(residual, hidden, row_bytes);
            pdserve_rms_norm(hidden, nullptr, w.input_norm, normed, nullptr, M, H, s->eps, threads);
        } else {
            pdserve_rms_norm(hidden, residual, w.input_norm, normed, summed, M, H, s->eps, threads);
            std::memcpy(residual, summed, row_bytes);
        }
        if (pdserve_small_m_linear(normed, w.qkv, w.qkv_bias, qkv, M, H, QKV, threads)) return -1;
        const float* q_src = qkv;
        const float* k_src = qkv + Q;
        int64_t q_stride = QKV, k_stride = QKV;
        if (w.q_norm) {  // per-head RMSNorm of q and k (Qwen3), each head a row of D
            for (int64_t m = 0; m < M; ++m) {
                pdserve_rms_norm(qkv + m * QKV, nullptr, w.q_norm, q_normed + m * Q, nullptr, s->num_q_heads, D,
                                 s->eps, 1);
                pdserve_rms_norm(qkv + m * QKV + Q, nullptr, w.k_norm, k_normed + m * KV, nullptr,
                                 s->num_kv_heads, D, s->eps, 1);
            }
            q_src = q_normed, k_src = k_normed, q_stride = Q, k_stride = KV;
        }
        if (pdserve_rotary(positions, q_src, q_stride, k_src, k_stride, cos_sin, s->max_position, q_rot, k_rot, M,
                           s->num_q_heads, s->num_kv_heads, D, s->rot_dim, int(s->is_neox)))
            return -2;
        if (pdserve_write_kv(k_rot, KV, qkv + Q + KV, QKV, w.k_cache, w.v_cache, slots, M, KV, s->num_slots))
            return -3;
        if (pdserve_decode_attention(q_rot, w.k_cache, w.v_cache, block_tables, table_stride, seq_lens, attn, M,
                                     s->num_q_heads, s->num_kv_heads, D, s->block_size, s->scale, threads))
            return -1;
        if (int status = row_parallel(collective, attn, w.o, w.o_bias, o, M, Q, H, threads)) return status;
        pdserve_rms_norm(o, residual, w.post_norm, normed, summed, M, H, s->eps, threads);
        std::memcpy(residual, summed, row_bytes);
        if (pdserve_small_m_linear(normed, w.gate_up, w.gate_up_bias, gate_up, M, H, 2 * I, threads)) return -1;
        pdserve_silu_and_mul(gate_up, act, M, I, threads);
        if (int status = row_parallel(collective, act, w.down, w.down_bias, hidden, M, I, H, threads)) return status;
    }
    return 0;
}

}
