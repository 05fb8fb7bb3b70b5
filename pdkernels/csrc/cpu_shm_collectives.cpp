// All-reduce (sum) and all-gather of float32 tensors between the ranks of a tensor-parallel group on
// one host, through a shared-memory region: what vLLM's CPU backend does instead of gloo (csrc/cpu/
// shm.cpp), because gloo over loopback TCP costs 1-2 ms per collective on a small host where a copy
// through memory and a barrier cost microseconds.
//
// Region (every rank maps the same file):
//   [0, 4096)        header: magic, size, slot bytes; per rank, on its own cache line, its pid and the
//                    sequence number of the last collective whose input it has published
//   [4096, ...)      two buffers (sequence parity) x size slots x slot_bytes
// A collective with sequence s (the same on every rank: they make the same calls in the same order):
//   copy my input into slot[s & 1][rank]; publish seq = s (release)
//   wait until every peer's seq >= s (acquire)        -- their inputs are in place
//   all-reduce: out = slot[0] + slot[1] + ... in rank order (so every rank gets the same bits)
//   all-gather: out = slot[0] | slot[1] | ...
// Slot parity s & 1 is rewritten by collective s + 2 only after its writer saw every peer at s + 1,
// which a peer publishes only after it finished reading collective s: one barrier per collective.
// A wait spins briefly, then yields, then sleeps in 50 us steps; it gives up on a peer whose process
// is gone (-2) or after timeout_s (-3).
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>

#include <sched.h>
#include <signal.h>

#include "vec.h"

namespace {

using namespace pdserve;

constexpr uint32_t kMagic = 0x70647470;  // "pdtp"
constexpr int kMaxRanks = 32;
constexpr int64_t kHeaderBytes = 4096;

struct alignas(64) RankState {
    std::atomic<uint64_t> seq;
    std::atomic<int32_t> pid;
};

struct Header {
    uint32_t magic;
    uint32_t size;
    int64_t slot_bytes;
    alignas(64) RankState ranks[kMaxRanks];
};
static_assert(sizeof(Header) <= kHeaderBytes, "header must fit its page");

inline char* slot(void* base, int size, int64_t slot_bytes, uint64_t seq, int rank) {
    return static_cast<char*>(base) + kHeaderBytes + (int64_t((seq & 1) * size + rank)) * slot_bytes;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// A peer's process has exited: no such process, or a zombie its parent has not reaped yet (kill(pid, 0)
// still succeeds on one; rank 0's own worker ranks are its children).
inline bool process_gone(int32_t pid) {
    if (pid <= 0) return false;
    if (kill(pid, 0) != 0) return errno == ESRCH;
    char path[64];
    std::snprintf(path, sizeof(path), "/proc/%d/stat", int(pid));
    FILE* f = std::fopen(path, "r");
    if (f == nullptr) return false;  // no /proc: only a reaped process is seen
    char buf[512];
    const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
    std::fclose(f);
    buf[n] = '\0';
    const char* close_paren = std::strrchr(buf, ')');  // the state follows "pid (comm) "
    return close_paren != nullptr && close_paren[1] == ' ' && (close_paren[2] == 'Z' || close_paren[2] == 'X');
}

int wait_for_peers(Header* h, int rank, int size, uint64_t seq, double timeout_s) {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    auto last_check = start;
    for (int peer = 0; peer < size; ++peer) {
        if (peer == rank) continue;
        RankState& state = h->ranks[peer];
        for (int64_t spins = 0; state.seq.load(std::memory_order_acquire) < seq; ++spins) {
            if (spins < 2000) {
                cpu_relax();
                continue;
            }
            if (spins < 4000) {
                sched_yield();
                continue;
            }
            const auto now = clock::now();
            if (now - last_check > std::chrono::milliseconds(10)) {
                last_check = now;
                if (process_gone(state.pid.load(std::memory_order_relaxed))) return -2;
                if (std::chrono::duration<double>(now - start).count() > timeout_s) return -3;
            }
            timespec pause{0, 50000};
            nanosleep(&pause, nullptr);
        }
    }
    return 0;
}

int publish_and_wait(void* base, int rank, int size, uint64_t seq, const float* x, int64_t n, double timeout_s) {
    Header* h = static_cast<Header*>(base);
    if (h->magic != kMagic || int(h->size) != size || rank < 0 || rank >= size) return -1;
    if (n < 0 || n * int64_t(sizeof(float)) > h->slot_bytes) return -1;
    std::memcpy(slot(base, size, h->slot_bytes, seq, rank), x, n * sizeof(float));
    h->ranks[rank].seq.store(seq, std::memory_order_release);
    return wait_for_peers(h, rank, size, seq, timeout_s);
}

}  // namespace

extern "C" {

int64_t pdserve_shm_header_bytes() { return kHeaderBytes; }

int pdserve_shm_max_ranks() { return kMaxRanks; }

// Rank 0 formats the region before any peer attaches (zeroed memory: every seq starts at 0); each rank
// then registers its pid. Returns 0, or -1 for arguments the region cannot hold.
int pdserve_shm_init(void* base, int rank, int size, int64_t slot_bytes, int32_t pid) {
    if (size < 1 || size > kMaxRanks || rank < 0 || rank >= size || slot_bytes < 64 || slot_bytes % 64) return -1;
    Header* h = static_cast<Header*>(base);
    if (rank == 0) {
        h->size = uint32_t(size);
        h->slot_bytes = slot_bytes;
        for (int r = 0; r < kMaxRanks; ++r) h->ranks[r].seq.store(0, std::memory_order_relaxed);
        std::atomic_thread_fence(std::memory_order_release);
        reinterpret_cast<std::atomic<uint32_t>*>(&h->magic)->store(kMagic, std::memory_order_release);
    } else if (reinterpret_cast<std::atomic<uint32_t>*>(&h->magic)->load(std::memory_order_acquire) != kMagic ||
               int(h->size) != size || h->slot_bytes != slot_bytes) {
        return -1;
    }
    h->ranks[rank].pid.store(pid, std::memory_order_release);
    return 0;
}

// x [n] <- the sum of every rank's x [n], in rank order. 0, -1 (bad arguments / too large for a slot),
// -2 (a peer's process is gone), -3 (timed out waiting for a peer).
int pdserve_shm_all_reduce(void* base, int rank, int size, uint64_t seq, float* x, int64_t n, double timeout_s) {
    const int status = publish_and_wait(base, rank, size, seq, x, n, timeout_s);
    if (status != 0) return status;
    const int64_t slot_bytes = static_cast<Header*>(base)->slot_bytes;
    const float* parts[kMaxRanks];
    for (int r = 0; r < size; ++r) parts[r] = reinterpret_cast<const float*>(slot(base, size, slot_bytes, seq, r));
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        vf acc = loadv(parts[0] + i);
        for (int r = 1; r < size; ++r) acc += loadv(parts[r] + i);
        storev(x + i, acc);
    }
    for (; i < n; ++i) {
        float acc = parts[0][i];
        for (int r = 1; r < size; ++r) acc += parts[r][i];
        x[i] = acc;
    }
    return 0;
}

// out [size * n] <- every rank's x [n], in rank order. Same return values.
int pdserve_shm_all_gather(void* base, int rank, int size, uint64_t seq, const float* x, int64_t n, float* out,
                           double timeout_s) {
    const int status = publish_and_wait(base, rank, size, seq, x, n, timeout_s);
    if (status != 0) return status;
    const int64_t slot_bytes = static_cast<Header*>(base)->slot_bytes;
    for (int r = 0; r < size; ++r)
        std::memcpy(out + r * n, slot(base, size, slot_bytes, seq, r), n * sizeof(float));
    return 0;
}

}
