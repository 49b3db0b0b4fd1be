// The shipped kernels, compiled for the SIMT emulator, behind a cuLaunchKernel-like C entry point
// (kernel name, grid, block, dynamic shared memory, an array of pointers to the arguments).
//
// Built by simt_device.build() (tools/spade_edge_testing):  g++ -O2 -std=c++17 -shared -fPIC
//     -DSPADE_SIMT -D<tile constants> -I simt -I simt/include -I runtime/matchers/kernels
//     simt_kernels.cpp
#include "simt.h"

// The kernels, unchanged (their PTX wrappers are replaced by simt.h's under SPADE_SIMT).
#include "knn_level.cu"
#include "pooled_topk.cu"
#include "postprocess.cu"

// Emulator self-check, independent of ldmatrix: one warp builds its mma fragments straight from
// global memory with the PTX ISA's fragment table and writes D = A (16x16, row-major) x B (given
// as Bt, 8x16 row-major, i.e. B column-major) + C.
extern "C" __global__ void simt_selftest_mma(const __half* A, const __half* Bt, float* D) {
    const int lane = threadIdx.x;
    const int g = lane / 4, t = lane % 4;
    auto pack = [](__half lo, __half hi) {
        uint16_t l, h;
        std::memcpy(&l, &lo, 2);
        std::memcpy(&h, &hi, 2);
        return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
    };
    uint32_t a[4];
    for (int i = 0; i < 4; ++i) {
        const int r = g + 8 * (i % 2);
        const int k = 2 * t + 8 * (i / 2);
        a[i] = pack(A[r * 16 + k], A[r * 16 + k + 1]);
    }
    const uint32_t b0 = pack(Bt[g * 16 + 2 * t], Bt[g * 16 + 2 * t + 1]);
    const uint32_t b1 = pack(Bt[g * 16 + 2 * t + 8], Bt[g * 16 + 2 * t + 9]);
    float c[4] = {1.f, 1.f, 1.f, 1.f};
    mma_16816(c, a, b0, b1);
    for (int e = 0; e < 4; ++e) D[(g + 8 * (e / 2)) * 8 + 2 * t + (e % 2)] = c[e];
}

// Emulator self-check of the racecheck: lane l copies row l of a 32x8 fp16 matrix into shared
// memory, waits for its copy, then (with `barrier`) synchronises, and the warp reads the rows with
// ldmatrix; each lane reads a row another lane copied, so without the barrier it is a race.
extern "C" __global__ void simt_selftest_race(const __half* src, int barrier, uint32_t* out) {
    SPADE_DYNAMIC_SMEM(unsigned char, buf);
    const int lane = threadIdx.x;
    const uint32_t base = smem_addr(buf);
    cp_async16(base + lane * 16, src + lane * 8, 16);
    cp_async_commit();
    cp_async_wait<0>();
    if (barrier) __syncthreads();
    uint32_t r[4];
    ldmatrix_x4(base + ((lane + 1) % 32) * 16, r[0], r[1], r[2], r[3]);
    for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

// ----------------------------------------------------------------------------- launch table
namespace simt {

template <class... A, size_t... I>
void invoke_impl(void (*f)(A...), void** a, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<A>*>(a[I])...);
}

template <class... A>
void invoke(void (*f)(A...), void** a) {
    invoke_impl(f, a, std::index_sequence_for<A...>{});
}

struct Entry {
    const char* name;
    void (*call)(void**);
};

#define SIMT_ENTRY(fn) {#fn, [](void** a) { invoke(fn, a); }}
const Entry kEntries[] = {
    SIMT_ENTRY(knn_min_bm128), SIMT_ENTRY(knn_min_bm64),   SIMT_ENTRY(knn_min_bm32),
    SIMT_ENTRY(knn_min_bm16),  SIMT_ENTRY(prep_query),     SIMT_ENTRY(pooled_dist),
    SIMT_ENTRY(topk_select),   SIMT_ENTRY(upsample_mean),  SIMT_ENTRY(blur_pass),
    SIMT_ENTRY(simt_selftest_mma), SIMT_ENTRY(simt_selftest_race),
};

constexpr size_t kStack = 256 << 10;

void fiber_main(int i) {
    Machine& M = m();
    M.tramp(M.args);
    Fiber& f = M.fibers[i];
    f.state = DONE;
    Warp& w = M.warps[f.linear / 32];
    if (w.arrived > 0) fail("a lane exited while its warp waits in a collective");
    --w.live;
    if (--M.block_live > 0 && M.block_arrived == M.block_live) {
        M.block_arrived = 0;  // the exited thread was the last one a barrier waited for
        ++M.block_gen;
    }
}

#if defined(__x86_64__)
// First code a fiber runs (reached by simt_ctx_switch's `ret`); it never returns.
void fiber_start() {
    fiber_main(m().cur->linear);
    for (;;) yield_to_scheduler();  // DONE fibers are never resumed
}

void init_fiber(Fiber& f, int) {
    auto top = (reinterpret_cast<uintptr_t>(f.stack) + kStack) & ~static_cast<uintptr_t>(15);
    auto* sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                     // fake return address of fiber_start
    *--sp = reinterpret_cast<void*>(&fiber_start);       // popped by `ret`
    for (int r = 0; r < 6; ++r) *--sp = nullptr;         // rbp rbx r12 r13 r14 r15
    f.sp = sp;
}
#else
void init_fiber(Fiber& f, int i) {
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &m().sched;  // returning from fiber_main resumes the scheduler
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(fiber_main), 1, i);
}
#endif

bool runnable(const Machine& M, const Fiber& f) {
    switch (f.state) {
        case READY:
            return true;
        case WAIT_WARP:
            return M.warps[f.linear / 32].gen != f.wait_gen;
        case WAIT_BLOCK:
            return M.block_gen != f.wait_gen;
        default:
            return false;
    }
}

uint64_t next_random(uint64_t& s) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
}

bool run_block(Machine& M, int n, uint64_t& rng) {
    std::fill(M.smem_store.begin(), M.smem_store.end(), 0xFF);
    ++M.block_serial;  // invalidates every racecheck stamp of the previous block
    if (M.inflight_words != 0) {  // copies a block never waited for
        for (Word& w : M.words) w.inflight = 0;
        M.inflight_words = 0;
    }
    M.block_live = n;
    M.block_arrived = 0;
    M.block_gen = 0;
    M.warps.assign((n + 31) / 32, Warp{});
    for (int i = 0; i < n; ++i) M.warps[i / 32].live++;
    for (int i = 0; i < n; ++i) {
        Fiber& f = M.fibers[i];
        f.state = READY;
        f.pending.clear();
        f.committed = 0;
        f.linear = i;
        f.tid = {static_cast<unsigned>(i) % M.block.x,
                 (static_cast<unsigned>(i) / M.block.x) % M.block.y,
                 static_cast<unsigned>(i) / (M.block.x * M.block.y)};
        init_fiber(f, i);
    }
    std::vector<int> order(n);
    for (int i = 0; i < n; ++i) order[i] = i;
    int done = 0;
    while (done < n) {
        for (int i = n - 1; i > 0; --i) std::swap(order[i], order[next_random(rng) % (i + 1)]);
        bool progressed = false;
        for (int i : order) {
            Fiber& f = M.fibers[i];
            if (!runnable(M, f)) continue;
            f.state = READY;
            M.cur = &f;
            resume(f);
            progressed = true;
            if (!M.error.empty()) return false;
            if (f.state == DONE) ++done;
        }
        if (!progressed) {
            M.error = "deadlock: every live thread waits at a barrier that cannot complete";
            return false;
        }
    }
    return true;
}

}  // namespace simt

extern "C" int simt_launch(const char* name, const unsigned* grid, const unsigned* block,
                           size_t smem_bytes, void** args, unsigned long long seed, int eager,
                           char* err, size_t err_len) {
    using namespace simt;
    Machine& M = m();
    M.error.clear();
    M.tramp = nullptr;
    for (const Entry& e : kEntries)
        if (std::strcmp(e.name, name) == 0) M.tramp = e.call;
    const int n = static_cast<int>(block[0] * block[1] * block[2]);
    if (M.tramp == nullptr) {
        M.error = std::string("unknown kernel ") + name;
    } else if (n <= 0 || n > 1024) {
        M.error = "block size must be 1..1024 threads";
    } else if (smem_bytes > (256u << 10)) {
        M.error = "dynamic shared memory above 256 KiB";
    }
    if (M.error.empty()) {
        M.grid = {grid[0], grid[1], grid[2]};
        M.block = {block[0], block[1], block[2]};
        M.args = args;
        M.eager = eager != 0;
        M.smem_store.assign(smem_bytes + 16, 0xFF);
        M.words.assign(smem_bytes / 4 + 4, Word{});
        M.inflight_words = 0;
        M.smem = M.smem_store.data();
        M.smem_bytes = smem_bytes;
        if (M.fibers.size() < static_cast<size_t>(n)) M.fibers.resize(n);
        for (Fiber& f : M.fibers)
            if (f.stack == nullptr) f.stack = new char[kStack];
        uint64_t rng = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
        for (unsigned z = 0; z < grid[2] && M.error.empty(); ++z)
            for (unsigned y = 0; y < grid[1] && M.error.empty(); ++y)
                for (unsigned x = 0; x < grid[0] && M.error.empty(); ++x) {
                    M.bid = {x, y, z};
                    run_block(M, n, rng);
                }
    }
    if (!M.error.empty()) {
        std::snprintf(err, err_len, "%s", M.error.c_str());
        return 1;
    }
    return 0;
}

extern "C" unsigned long long simt_counter(int which) {
    const simt::Machine& M = simt::m();
    switch (which) {
        case 0:
            return M.collectives;
        case 1:
            return M.ldmatrix_wavefronts;
        case 2:
            return M.ldmatrix_matrices;
        default:
            return 0;
    }
}
