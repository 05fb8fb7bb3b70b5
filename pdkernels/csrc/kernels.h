// The C entry points of pdserve's CPU kernels (one per source file), for the sources that chain them.
#pragma once
#include <cstdint>

extern "C" {
int pdserve_small_m_linear(const float* x, const float* tiled, const float* bias, float* y, int64_t M, int64_t K,
                           int64_t N, int threads);
int pdserve_decode_attention(const float* q, const float* k_cache, const float* v_cache,
                             const int32_t* block_tables, int64_t table_stride, const int32_t* seq_lens,
                             float* out, int64_t num_seqs, int64_t num_q_heads, int64_t num_kv_heads,
                             int64_t head_dim, int64_t block_size, float scale, int threads);
void pdserve_rms_norm(const float* x, const float* residual, const float* weight, float* out, float* summed,
                      int64_t num_rows, int64_t hidden, float eps, int threads);
int pdserve_rotary(const int64_t* positions, const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                   const float* cos_sin, int64_t max_position, float* q_out, float* k_out, int64_t num_tokens,
                   int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t rot_dim, int is_neox);
int pdserve_write_kv(const float* key, int64_t key_stride, const float* value, int64_t value_stride,
                     float* k_cache, float* v_cache, const int64_t* slots, int64_t num_tokens, int64_t row,
                     int64_t num_slots);
void pdserve_silu_and_mul(const float* gate_up, float* out, int64_t num_rows, int64_t inter, int threads);
int pdserve_shm_all_reduce(void* base, int rank, int size, uint64_t seq, float* x, int64_t n, double timeout_s);
}
