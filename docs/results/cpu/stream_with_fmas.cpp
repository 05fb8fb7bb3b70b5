// Does arithmetic beside a memory stream slow the stream? (docs/benchmarks.md, "Decode step against the
// weight-streaming bound", 2026-12-03.) Streams 512 MiB once per pass (two 16-lane loads per 128 bytes,
// summed) while doing F fused multiply-adds per 128 bytes on L1-resident data; "compute only" does the
// same FMAs with the stream replaced by L1 reads.
//   g++ -O3 -march=native -std=c++17 -I kernels/csrc docs/results/cpu/stream_with_fmas.cpp -o /tmp/swf
//   taskset -c 0 /tmp/swf
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <vector>

#include "vec.h"
using namespace pdserve;

static double now() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

template <int F, bool kFromL1 = false>
float run(const float* w, int64_t n, const float* hot) {
    v16 acc[16] = {};
    v16 s0 = {}, s1 = {};
    int64_t hk = 0;
    for (int64_t i = 0; i < n; i += 32) {
        const float* ww = kFromL1 ? hot + ((i >> 5) & 127) * 32 : w + i;
        s0 += load16(ww);
        s1 += load16(ww + 16);
        const v16 h0 = load16(hot + hk), h1 = load16(hot + hk + 16);
        hk = (hk + 32) & 4095;
#pragma GCC unroll 16
        for (int f = 0; f < F; f++) acc[f % 16] += hot[4096 + (f & 7)] * ((f & 1) ? h1 : h0);
    }
    v16 t = s0 + s1;
    for (int j = 0; j < 16; j++) t += acc[j];
    return sum_lanes(t);
}

int main() {
    const int64_t n = (512LL << 20) / 4;
    float* w = static_cast<float*>(aligned_alloc(64, n * 4));
    for (int64_t i = 0; i < n; i++) w[i] = 1;
    std::vector<float> hot(8192, 0.5f);
    auto time = [&](auto fn, const char* name) {
        std::vector<double> ts;
        float s = 0;
        for (int r = 0; r < 5; r++) {
            const double t = now();
            s += fn();
            ts.push_back(now() - t);
        }
        std::sort(ts.begin(), ts.end());
        std::printf("%-18s %6.2f GB/s of weights (checksum %g)\n", name, n * 4 / ts[2] / 1e9, s);
    };
    time([&] { return run<0>(w, n, hot.data()); }, "stream, F=0");
    time([&] { return run<2>(w, n, hot.data()); }, "stream, F=2");
    time([&] { return run<8>(w, n, hot.data()); }, "stream, F=8");
    time([&] { return run<16>(w, n, hot.data()); }, "stream, F=16");
    time([&] { return run<16, true>(w, n, hot.data()); }, "compute only, F=16");
}
