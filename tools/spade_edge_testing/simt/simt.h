// SIMT emulator: runs the shipped CUDA kernels (runtime/matchers/kernels/*.cu) on the CPU, so
// their logic is executed in CI, where there is no GPU.
//
// Why: nvcc proves the kernels build; it proves nothing about tile indexing, the cp.async ring,
// swizzles, fragment layouts, split-M merging or the bitonic sort. This header makes the .cu
// files compile as host C++ and supplies the device built-ins they use:
//
//  * every CUDA thread is a fiber (its own stack; a 14-instruction switch on x86-64, ucontext
//    elsewhere); a block's fibers run on one OS thread, switching only
//    at synchronisation points (__syncthreads, warp collectives), in a seeded random order per
//    pass, so code that needs a barrier it does not have sees a different interleaving;
//  * warp collectives (ldmatrix, mma.sync, __shfl_xor_sync) follow the register layouts of the
//    PTX ISA (mma.m16n8k16 / ldmatrix .m8n8 fragment tables); a collective with exited lanes,
//    or lanes of one warp in different collectives, is reported as an error;
//  * cp.async copies are deferred to the cp.async.wait_group that retires their group (or done
//    at issue in "eager" mode), so reading a stage before waiting for it reads stale data;
//  * dynamic shared memory starts as 0xFF bytes (fp16/fp32 NaN), and every shared-memory access
//    made through the emulated instructions is bounds- and alignment-checked;
//  * a racecheck for those accesses, per 4-byte word: ldmatrix of a word with a cp.async in
//    flight, ldmatrix of a word another thread's cp.async filled since the last barrier, and
//    a cp.async into a word another thread read since the last barrier are errors.
//
// It checks logic, not hardware: no timing, no bank conflicts, no real concurrency inside a warp
// between synchronisation points. Include it before the kernel sources (-DSPADE_SIMT).
#pragma once

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#ifndef SPADE_SIMT
#define SPADE_SIMT 1
#endif

using std::max;
using std::min;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ----------------------------------------------------------------------------- vector types
struct __half {
    _Float16 v;
};
struct __half2 {
    __half x, y;
};
struct float2 {
    float x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct simt_dim3 {
    unsigned x, y, z;
};

inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

namespace simt {

enum State { READY, WAIT_WARP, WAIT_BLOCK, DONE };
enum Kind { K_NONE, K_SHFL, K_LDMATRIX, K_MMA };

struct Copy {
    uint32_t dst;
    const void* src;
    int bytes;
    int src_bytes;
    long group;
};

struct Fiber {
#if defined(__x86_64__)
    void* sp = nullptr;  // saved stack pointer (callee-saved registers are on the stack)
#else
    ucontext_t ctx;
#endif
    char* stack = nullptr;
    simt_dim3 tid{0, 0, 0};
    int linear = 0;
    State state = READY;
    uint64_t wait_gen = 0;
    std::vector<Copy> pending;
    long committed = 0;
};

// Hazard state of one 4-byte shared-memory word. A stamp is (block serial << 32 | barrier epoch).
struct Word {
    uint64_t wstamp = ~0ull, rstamp = ~0ull;
    int wthread = -1, rthread = -1;  // rthread -2: several readers in that epoch
    int inflight = 0;
};

struct Warp {
    int live = 0;
    int arrived = 0;
    uint64_t gen = 0;
    Kind kind[2] = {K_NONE, K_NONE};
    uint64_t slot[2][32][6];  // per-lane operands of the collective, double-buffered by gen
    uint64_t mma_gen = ~0ull;  // gen whose mma operands are decoded below
    float mma_a[16][16], mma_b[16][8];
};

struct Machine {
    simt_dim3 grid{1, 1, 1}, block{1, 1, 1}, bid{0, 0, 0};
    unsigned char* smem = nullptr;
    size_t smem_bytes = 0;
    std::vector<unsigned char> smem_store;
    std::vector<Word> words;  // racecheck shadow of smem, one entry per 4 bytes
    uint64_t block_serial = 0;
    long inflight_words = 0;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    int block_live = 0, block_arrived = 0;
    uint64_t block_gen = 0;
    Fiber* cur = nullptr;
#if defined(__x86_64__)
    void* sched_sp = nullptr;
#else
    ucontext_t sched;
#endif
    bool eager = false;
    std::string error;
    void (*tramp)(void**) = nullptr;
    void** args = nullptr;
    unsigned long long collectives = 0;
    unsigned long long ldmatrix_wavefronts = 0;  // 128-byte shared-memory transactions
    unsigned long long ldmatrix_matrices = 0;
};

inline Machine& m() {
    static Machine mach;
    return mach;
}

#if defined(__x86_64__)
// switch stacks: push the System V callee-saved registers, save rsp, load the other rsp, pop.
extern "C" void simt_ctx_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl simt_ctx_switch
    .hidden simt_ctx_switch
    .type simt_ctx_switch, @function
simt_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_ctx_switch, .-simt_ctx_switch
)");

inline void yield_to_scheduler() { simt_ctx_switch(&m().cur->sp, m().sched_sp); }
inline void resume(Fiber& f) { simt_ctx_switch(&m().sched_sp, f.sp); }
#else
inline void yield_to_scheduler() { swapcontext(&m().cur->ctx, &m().sched); }
inline void resume(Fiber& f) { swapcontext(&m().sched, &f.ctx); }
#endif

[[noreturn]] inline void fail(const std::string& msg) {
    Machine& M = m();
    if (M.error.empty()) {
        const Fiber& f = *M.cur;
        M.error = msg + " (block " + std::to_string(M.bid.x) + "," + std::to_string(M.bid.y) +
                  "," + std::to_string(M.bid.z) + ", thread " + std::to_string(f.linear) + ")";
    }
    for (;;) yield_to_scheduler();  // never resumed: the scheduler abandons the launch
}

inline Warp& my_warp() { return m().warps[m().cur->linear / 32]; }
inline int my_lane() { return m().cur->linear % 32; }

// One warp-wide rendezvous; returns the slot buffer this collective deposited into.
inline int warp_collective(Kind kind, const uint64_t* in, int n_in) {
    Machine& M = m();
    Warp& w = my_warp();
    if (w.live != 32) fail("full-mask warp collective in a warp with exited lanes");
    const int b = static_cast<int>(w.gen & 1);
    if (w.arrived == 0) {
        w.kind[b] = kind;
    } else if (w.kind[b] != kind) {
        fail("lanes of one warp in different collectives");
    }
    for (int i = 0; i < n_in; ++i) w.slot[b][my_lane()][i] = in[i];
    ++M.collectives;
    if (++w.arrived == w.live) {
        w.arrived = 0;
        ++w.gen;
    } else {
        M.cur->state = WAIT_WARP;
        M.cur->wait_gen = w.gen;
        yield_to_scheduler();
    }
    return b;
}

inline unsigned char* smem_ptr(uint32_t addr, uint32_t n, uint32_t align, const char* what) {
    Machine& M = m();
    if (addr % align != 0) fail(std::string(what) + ": misaligned shared-memory address");
    if (static_cast<size_t>(addr) + n > M.smem_bytes)
        fail(std::string(what) + ": shared-memory access beyond the dynamic allocation");
    return M.smem + addr;
}

inline uint64_t stamp() { return (m().block_serial << 32) | m().block_gen; }

// Racecheck, read side: thread `t` reads [addr, addr + n) through an emulated instruction.
inline void check_read(uint32_t addr, uint32_t n, int t, const char* what) {
    Machine& M = m();
    const uint64_t now = stamp();
    for (uint32_t w = addr / 4; w < (addr + n + 3) / 4; ++w) {
        Word& x = M.words[w];
        if (x.inflight > 0)
            fail(std::string(what) + " reads shared memory with a cp.async still in flight (byte " +
                 std::to_string(4 * w) + ")");
        if (x.wstamp == now && x.wthread != t)
            fail(std::string(what) + " reads shared memory that thread " +
                 std::to_string(x.wthread) + "'s cp.async filled after the last barrier (byte " +
                 std::to_string(4 * w) + ")");
        x.rthread = (x.rstamp == now && x.rthread != t) ? -2 : t;
        x.rstamp = now;
    }
}

inline void complete(const Copy& c, int t) {
    Machine& M = m();
    for (uint32_t w = c.dst / 4; w < (c.dst + c.bytes) / 4; ++w) {
        Word& x = M.words[w];
        if (!M.eager) {
            --x.inflight;
            --M.inflight_words;
        }
        x.wstamp = stamp();
        x.wthread = t;
    }
    unsigned char* d = M.smem + c.dst;
    if (c.src_bytes > 0) std::memcpy(d, c.src, static_cast<size_t>(c.src_bytes));
    if (c.src_bytes < c.bytes) std::memset(d + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
}

inline void cp_async(uint32_t dst, const void* src, int bytes, int src_bytes) {
    smem_ptr(dst, static_cast<uint32_t>(bytes), static_cast<uint32_t>(bytes), "cp.async");
    if (src_bytes < 0 || src_bytes > bytes) fail("cp.async: src-size out of range");
    if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % static_cast<uintptr_t>(bytes) != 0)
        fail("cp.async: misaligned global address");
    Fiber& f = *m().cur;
    const uint64_t now = stamp();
    for (uint32_t w = dst / 4; w < (dst + static_cast<uint32_t>(bytes)) / 4; ++w) {
        Word& x = m().words[w];
        if (x.inflight > 0) fail("two cp.async in flight to the same shared memory");
        if (x.rstamp == now && x.rthread != f.linear)
            fail("cp.async overwrites shared memory another thread read after the last barrier");
        if (!m().eager) {
            ++x.inflight;
            ++m().inflight_words;
        }
    }
    const Copy c{dst, src, bytes, src_bytes, f.committed};
    if (m().eager) {
        complete(c, f.linear);
    } else {
        f.pending.push_back(c);
    }
}

}  // namespace simt

#define threadIdx (simt::m().cur->tid)
#define blockIdx (simt::m().bid)
#define blockDim (simt::m().block)
#define gridDim (simt::m().grid)
#define SPADE_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(simt::m().smem)

// ----------------------------------------------------------------------------- built-ins
inline void __syncthreads() {
    simt::Machine& M = simt::m();
    if (++M.block_arrived == M.block_live) {
        M.block_arrived = 0;
        ++M.block_gen;
    } else {
        M.cur->state = simt::WAIT_BLOCK;
        M.cur->wait_gen = M.block_gen;
        simt::yield_to_scheduler();
    }
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 64 bits");
    if (mask != 0xffffffffu) simt::fail("__shfl_xor_sync: only full masks are emulated");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    const int b = simt::warp_collective(simt::K_SHFL, &bits, 1);
    const int src = (simt::my_lane() ^ lane_mask) & 31;
    T r;
    std::memcpy(&r, &simt::my_warp().slot[b][src][0], sizeof(T));
    return r;
}

inline unsigned atomicMin(unsigned* addr, unsigned v) {
    const unsigned old = *addr;  // fibers of a launch never run concurrently
    *addr = std::min(old, v);
    return old;
}

// PTX wrappers with the names and signatures of kernels/knn_level.cu's.
inline uint32_t smem_addr(const void* p) {
    const auto* c = static_cast<const unsigned char*>(p);
    const simt::Machine& M = simt::m();
    if (c < M.smem || c > M.smem + M.smem_bytes) simt::fail("cvta.to.shared of a non-shared pointer");
    return static_cast<uint32_t>(c - M.smem);
}

inline void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    simt::cp_async(dst, src, 16, src_bytes);
}

inline void cp_async4(uint32_t dst, const void* src, int src_bytes) {
    simt::cp_async(dst, src, 4, src_bytes);
}

inline void cp_async_commit() { ++simt::m().cur->committed; }

template <int N>
inline void cp_async_wait() {
    simt::Fiber& f = *simt::m().cur;
    const long limit = f.committed - N;  // groups < limit must be complete
    std::vector<simt::Copy> keep;
    for (const simt::Copy& c : f.pending) {
        if (c.group < limit) {
            simt::complete(c, f.linear);
        } else {
            keep.push_back(c);
        }
    }
    f.pending.swap(keep);
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 give the row addresses of matrix i;
// register i of lane l holds row l/4, columns 2(l%4) and 2(l%4)+1 of matrix i.
inline void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    simt::smem_ptr(addr, 16, 16, "ldmatrix");
    simt::check_read(addr, 16, simt::m().cur->linear, "ldmatrix");
    const uint64_t in = addr;
    const int b = simt::warp_collective(simt::K_LDMATRIX, &in, 1);
    const int lane = simt::my_lane();
    if (lane == 0) {
        // Bank conflicts: one matrix is 8 rows of 16 bytes; it takes one 128-byte wavefront when
        // the rows fall in 8 different 16-byte bank groups, more when some share a group.
        for (int i = 0; i < 4; ++i) {
            int per_group[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int worst = 0;
            for (int j = 0; j < 8; ++j) {
                const auto row = static_cast<uint32_t>(simt::my_warp().slot[b][8 * i + j][0]);
                worst = std::max(worst, ++per_group[(row / 16) % 8]);
            }
            simt::m().ldmatrix_wavefronts += static_cast<unsigned long long>(worst);
            simt::m().ldmatrix_matrices += 1;
        }
    }
    uint32_t* out[4] = {&r0, &r1, &r2, &r3};
    for (int i = 0; i < 4; ++i) {
        const auto row = static_cast<uint32_t>(simt::my_warp().slot[b][8 * i + lane / 4][0]);
        std::memcpy(out[i], simt::m().smem + row + 4 * (lane % 4), 4);
    }
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, with g = lane/4, t = lane%4:
//   A (16x16): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, k x n): b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C (16x8): c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// fp16 products are exact in fp32; accumulation is fp32 (the hardware's order may differ).
inline void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    const uint64_t in[6] = {a[0], a[1], a[2], a[3], b0, b1};
    const int b = simt::warp_collective(simt::K_MMA, in, 6);
    simt::Warp& w = simt::my_warp();
    if (w.mma_gen != w.gen) {  // the first lane past the rendezvous decodes the fragments
        const auto& s = w.slot[b];
        auto half_at = [](uint64_t reg, int hi) {
            const auto bits = static_cast<uint16_t>(reg >> (16 * hi));
            _Float16 h;
            std::memcpy(&h, &bits, 2);
            return static_cast<float>(h);
        };
        for (int r = 0; r < 16; ++r)
            for (int k = 0; k < 16; ++k) {
                const int reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
                w.mma_a[r][k] = half_at(s[4 * (r % 8) + (k % 8) / 2][reg], k % 2);
            }
        for (int k = 0; k < 16; ++k)
            for (int n = 0; n < 8; ++n)
                w.mma_b[k][n] = half_at(s[4 * n + (k % 8) / 2][4 + (k >= 8 ? 1 : 0)], k % 2);
        w.mma_gen = w.gen;
    }
    const int lane = simt::my_lane();
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; ++e) {
        const int r = g + (e >= 2 ? 8 : 0);
        const int n = 2 * t + (e % 2);
        float acc = c[e];
        for (int k = 0; k < 16; ++k) acc += w.mma_a[r][k] * w.mma_b[k][n];
        c[e] = acc;
    }
}
