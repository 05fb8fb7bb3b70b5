// Float32 vectors (GCC/Clang vector extensions) and the few operations pdserve's CPU kernels share: vf, one
// hardware register as -march=native has them (16 floats with AVX-512, 8 with AVX/AVX2, 4 with NEON or
// SSE), and fixed-width v16/v8/v4.
#pragma once
#include <cstdint>
#include <cstring>

namespace pdserve {

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

// One hardware vector register of floats, as -march=native has them, and how many such registers there
// are. Kernels compute in vf: a generic vector wider than the hardware's (v16 without AVX-512) is kept
// on the stack by GCC in loops that hold several of them, which made the small-M linear kernel 1.7-14.7x
// and decode attention 2.3-2.6x slower on an AVX2 host than with vf (docs/kernels.md, "AVX2 hosts").
#if defined(PDSERVE_LANES)  // another target's blocking, built for this host (tests: same results, slower)
constexpr int kLanes = PDSERVE_LANES, kVecRegs = PDSERVE_VEC_REGS;
#elif defined(__AVX512F__)
constexpr int kLanes = 16, kVecRegs = 32;
#elif defined(__AVX__)
constexpr int kLanes = 8, kVecRegs = 16;
#elif defined(__aarch64__)
constexpr int kLanes = 4, kVecRegs = 32;
#else
constexpr int kLanes = 4, kVecRegs = 16;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vif __attribute__((vector_size(4 * kLanes)));

inline vf loadv(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof(v));  // an unaligned vector load
    return v;
}

inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

inline float sum_lanes(v4 v) { return (v[0] + v[2]) + (v[1] + v[3]); }

inline float sum_lanes(v8 v) {
    return sum_lanes(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
}

inline float sum_lanes(v16 v) {
    const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

// exp(x) of every lane, x clamped to [-87, 88]: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p of degree 6
// (Cephes' expf coefficients), within 2 ulp of expf over that range.
inline vf expv(vf x) {
    const vf lo = vf{} - 87.0f, hi = vf{} + 88.0f;
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    const vf fx = x * 1.44269504088896341f + 0.5f;
    vif n = __builtin_convertvector(fx, vif);                // truncates toward zero
    n += (vif)(__builtin_convertvector(n, vf) > fx);         // floor: -1 where truncation rounded up
    const vf nf = __builtin_convertvector(n, vf);
    const vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf p = vf{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    // 2^n as two factors so n = 128 (x near 88) stays finite: 2^(n - n/2) * 2^(n/2)
    const vif half = n >> 1;
    const vif bits_a = (half + 127) << 23, bits_b = (n - half + 127) << 23;
    vf scale_a, scale_b;
    std::memcpy(&scale_a, &bits_a, sizeof(scale_a));
    std::memcpy(&scale_b, &bits_b, sizeof(scale_b));
    return p * scale_a * scale_b;
}

}  // namespace pdserve
