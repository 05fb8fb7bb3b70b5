// 16-lane float32 vectors (GCC/Clang vector extensions: one AVX-512 register, two AVX2 or four NEON
// ones, whatever -march=native has) and the few operations pdserve's CPU kernels share.
#pragma once
#include <cstdint>
#include <cstring>

namespace pdserve {

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
typedef int32_t vi16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
    v16 v;
    std::memcpy(&v, p, sizeof(v));  // an unaligned vector load
    return v;
}

inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

inline float sum_lanes(v16 v) {
    const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

// exp(x), x clamped to [-87, 88]: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p of degree 6
// (Cephes' expf coefficients), within 2 ulp of expf over that range.
inline v16 exp16(v16 x) {
    const v16 lo = v16{} - 87.0f, hi = v16{} + 88.0f;
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    const v16 fx = x * 1.44269504088896341f + 0.5f;
    vi16 n = __builtin_convertvector(fx, vi16);                // truncates toward zero
    n += (vi16)(__builtin_convertvector(n, v16) > fx);         // floor: -1 where truncation rounded up
    const v16 nf = __builtin_convertvector(n, v16);
    const v16 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    v16 p = v16{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    // 2^n as two factors so n = 128 (x near 88) stays finite: 2^(n - n/2) * 2^(n/2)
    const vi16 half = n >> 1;
    const vi16 bits_a = (half + 127) << 23, bits_b = (n - half + 127) << 23;
    v16 scale_a, scale_b;
    std::memcpy(&scale_a, &bits_a, sizeof(scale_a));
    std::memcpy(&scale_b, &bits_b, sizeof(scale_b));
    return p * scale_a * scale_b;
}

}  // namespace pdserve
