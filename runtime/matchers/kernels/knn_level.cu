// SPADE pixel-level kNN on one pyramid level, fused: for every query position, the minimum of
// ||q - g||^2 over all positions g of the K selected gallery images, without ever storing the
// query x gallery distance matrix.
//
// Why this shape: the work is a GEMM (Q x C) . (C x K*P) whose only consumer is a row minimum,
// so the minimum is taken in registers right after each tensor-core tile and only one float per
// query position leaves the chip.
//
//  * fp16 operands, fp32 accumulation: mma.sync.m16n8k16 (sm_80+ tensor cores, incl. sm_87/89/90).
//  * The query block (BM rows x Cp channels) stays resident in shared memory for the whole CTA;
//    gallery tiles (BN rows x BK channels) stream through a STAGES-deep cp.async ring.
//  * Gallery rows are addressed through the K selected image indices (row m of the virtual
//    gallery = position m % P of image idx[m / P]): no gather copy.
//  * Expanded form with stored norms: d = qn + gn - 2 q.g; gn rides along the tile loads.
//  * The K*P gallery positions are split over gridDim.y CTAs (split-M); partial minima merge
//    with atomicMin on the float bits (valid because the values are clamped >= 0).
//  * Shared-memory tiles are XOR-swizzled in 16-byte chunks so ldmatrix is bank-conflict free.
//
// Layouts: Q [nq, Cp] fp16, G [N*P, Cp] fp16 (channels padded with zeros to Cp, a multiple of
// 64), qn [nq] fp32, gn [N*P] fp32, idx [K] int32, out [nq] uint32 (float bits, pre-set to +inf).

#include <cuda_fp16.h>
#include <stdint.h>

#ifndef SPADE_DYNAMIC_SMEM
#define SPADE_DYNAMIC_SMEM(type, name) extern __shared__ __align__(128) type name[]
#endif

// Tile constants come from the host code (runtime/matchers/cuda.py TILE_DEFINES, passed with -D
// to nvcc and to the SIMT emulator's g++), so the kernel and the planner cannot disagree.
#if !defined(KNN_BN) || !defined(KNN_BK) || !defined(KNN_STAGES) || !defined(KNN_THREADS)
#error "compile with -DKNN_BN= -DKNN_BK= -DKNN_STAGES= -DKNN_THREADS= (cuda.py kernel_options())"
#endif

// PTX wrappers. The SIMT emulator (tools/spade_edge_testing/simt: runs these kernels on the CPU
// in CI) supplies its own versions with the PTX ISA's semantics, so everything below them is
// executed there.
#ifndef SPADE_SIMT
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes = 0 writes zeros (out-of-range rows).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}

__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1,
                                            uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // SPADE_SIMT

// Byte offset of 16-byte chunk `c` of row `r` in a tile whose rows hold `row_chunks` chunks
// (a multiple of 8): the low three chunk bits are XOR-ed with the row, so the 8 rows read by
// one ldmatrix phase hit 8 different bank groups.
__device__ __forceinline__ uint32_t swz(int r, int c, int row_chunks) {
    return static_cast<uint32_t>((r * row_chunks + (c ^ (r & 7))) * 16);
}

template <int BM, int WARPS_M>
__device__ __forceinline__ void knn_min_impl(const __half* __restrict__ Q,
                                             const float* __restrict__ qn, int nq,
                                             const __half* __restrict__ G,
                                             const float* __restrict__ gn,
                                             const int* __restrict__ idx, int P, int K, int Cp,
                                             int tiles_per_split, unsigned int* __restrict__ out) {
    constexpr int WARPS_N = KNN_THREADS / 32 / WARPS_M;
    constexpr int WTM = BM / WARPS_M;          // rows per warp
    constexpr int MT = WTM / 16;               // m16 tiles per warp
    constexpr int WTN = KNN_BN / WARPS_N;      // gallery columns per warp
    constexpr int NT = WTN / 8;                // n8 tiles per warp
    constexpr int B_STAGE_BYTES = KNN_BN * KNN_BK * 2;
    constexpr int B_ROW_CHUNKS = KNN_BK / 8;  // 8
    static_assert(WARPS_M * WARPS_N * 32 == KNN_THREADS, "8 warps");
    static_assert(WARPS_N * NT * 8 == KNN_BN, "warp columns cover the tile");
    static_assert(MT >= 1 && WTM % 16 == 0, "warp rows must be a multiple of 16");
    static_assert(NT % 2 == 0, "B fragments are loaded 16 columns at a time");

    SPADE_DYNAMIC_SMEM(unsigned char, smem);
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int wm = warp / WARPS_N;
    const int wn = warp % WARPS_N;

    const int row0 = blockIdx.x * BM;
    const int m_total = P * K;
    const int n_tiles = (m_total + KNN_BN - 1) / KNN_BN;
    const int t_begin = blockIdx.y * tiles_per_split;
    const int t_end = min(t_begin + tiles_per_split, n_tiles);
    if (t_begin >= t_end) return;  // uniform over the block

    const int kc_count = Cp / KNN_BK;
    const int a_row_chunks = Cp / 8;
    const uint32_t sA = smem_addr(smem);
    const uint32_t sB = sA + static_cast<uint32_t>(BM * Cp * 2);
    // Gallery norms ride along with each tile's first chunk into a ring of gn_ring tiles. The
    // loader runs STAGES-1 chunks ahead, so a slot is rewritten (gn_ring-1)*kc_count - 1
    // iterations after its tile's epilogue read it: 2 slots suffice from kc_count >= 2 on.
    const int gn_ring = kc_count >= 2 ? 2 : 4;
    float* s_gn = reinterpret_cast<float*>(smem + BM * Cp * 2 + KNN_STAGES * B_STAGE_BYTES);
    const uint32_t s_gn_addr = smem_addr(s_gn);  // [gn_ring][BN]

    // Query block: loaded once, resident for every gallery tile (part of the first group).
    for (int i = tid; i < BM * a_row_chunks; i += KNN_THREADS) {
        const int r = i / a_row_chunks;
        const int c = i - r * a_row_chunks;
        const int gr = row0 + r;
        const bool ok = gr < nq;
        const __half* src = ok ? Q + static_cast<size_t>(gr) * Cp + c * 8 : Q;
        cp_async16(sA + swz(r, c, a_row_chunks), src, ok ? 16 : 0);
    }

    // Gallery loader state: this thread copies chunk `bc` of rows br, br+32, br+64, br+96.
    const int bc = tid & 7;
    const int br = tid >> 3;
    const __half* brow[4];
    const float* bgn[4];
    int load_tile = t_begin;
    int load_kc = 0;

    auto load_next = [&](int stage) {
        if (load_tile < t_end) {
            if (load_kc == 0) {
                // Map virtual gallery rows to (selected image, position) once per tile.
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int m = load_tile * KNN_BN + br + 32 * j;
                    if (m < m_total) {
                        const int k = m / P;
                        const size_t grow = static_cast<size_t>(idx[k]) * P + (m - k * P);
                        brow[j] = G + grow * Cp + bc * 8;
                        bgn[j] = gn + grow;
                    } else {
                        brow[j] = nullptr;
                        bgn[j] = nullptr;
                    }
                }
                if (bc == 0) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const uint32_t dst =
                            s_gn_addr + static_cast<uint32_t>(((load_tile & (gn_ring - 1)) * KNN_BN + br + 32 * j) * 4);
                        cp_async4(dst, bgn[j] ? bgn[j] : gn, bgn[j] ? 4 : 0);
                    }
                }
            }
            const uint32_t base = sB + static_cast<uint32_t>(stage * B_STAGE_BYTES);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int r = br + 32 * j;
                const __half* src = brow[j] ? brow[j] + load_kc * KNN_BK : G;
                cp_async16(base + swz(r, bc, B_ROW_CHUNKS), src, brow[j] ? 16 : 0);
            }
            if (++load_kc == kc_count) {
                load_kc = 0;
                ++load_tile;
            }
        }
        cp_async_commit();  // always commit, so group counting stays uniform
    };

    float acc[MT][NT][4];
    float rmin[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        rmin[mt][0] = INFINITY;
        rmin[mt][1] = INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
    }

#pragma unroll
    for (int s = 0; s < KNN_STAGES - 1; ++s) load_next(s);

    const int total = (t_end - t_begin) * kc_count;
    int comp_tile = t_begin;
    int comp_kc = 0;
    for (int it = 0; it < total; ++it) {
        cp_async_wait<KNN_STAGES - 2>();
        __syncthreads();
        load_next((it + KNN_STAGES - 1) % KNN_STAGES);

        const uint32_t bbase = sB + static_cast<uint32_t>((it % KNN_STAGES) * B_STAGE_BYTES);
#pragma unroll
        for (int ks = 0; ks < KNN_BK / 16; ++ks) {
            uint32_t bf[NT][2];
#pragma unroll
            for (int nb = 0; nb < NT / 2; ++nb) {
                const int n = wn * WTN + nb * 16 + (lane & 7) + ((lane >> 4) << 3);
                const int c = ks * 2 + ((lane >> 3) & 1);
                ldmatrix_x4(bbase + swz(n, c, B_ROW_CHUNKS), bf[2 * nb][0], bf[2 * nb][1],
                            bf[2 * nb + 1][0], bf[2 * nb + 1][1]);
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                uint32_t af[4];
                const int r = wm * WTM + mt * 16 + (lane & 15);
                const int c = (comp_kc * KNN_BK + ks * 16) / 8 + (lane >> 4);
                ldmatrix_x4(sA + swz(r, c, a_row_chunks), af[0], af[1], af[2], af[3]);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mma_16816(acc[mt][nt], af, bf[nt][0], bf[nt][1]);
            }
        }

        if (++comp_kc == kc_count) {
            // Tile epilogue: fold the tile into the running row minima, reset accumulators.
            const float* tgn = s_gn + (comp_tile & (gn_ring - 1)) * KNN_BN;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = wn * WTN + nt * 8 + (lane & 3) * 2 + e;
                    const float g = (comp_tile * KNN_BN + col < m_total) ? tgn[col] : INFINITY;
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        rmin[mt][0] = fminf(rmin[mt][0], fmaf(-2.f, acc[mt][nt][e], g));
                        rmin[mt][1] = fminf(rmin[mt][1], fmaf(-2.f, acc[mt][nt][2 + e], g));
                        acc[mt][nt][e] = 0.f;
                        acc[mt][nt][2 + e] = 0.f;
                    }
                }
            }
            comp_kc = 0;
            ++comp_tile;
        }
    }
    cp_async_wait<0>();

    // Row minima: reduce over the 4 lanes that share a row, then merge across CTAs.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float v = rmin[mt][h];
            v = fminf(v, __shfl_xor_sync(0xffffffffu, v, 1));
            v = fminf(v, __shfl_xor_sync(0xffffffffu, v, 2));
            const int row = row0 + wm * WTM + mt * 16 + h * 8 + (lane >> 2);
            if ((lane & 3) == 0 && row < nq) {
                const float d = fmaxf(v + qn[row], 0.f);
                atomicMin(out + row, __float_as_uint(d));
            }
        }
    }
}

#define KNN_INSTANCE(BM, WM)                                                                    \
    extern "C" __global__ void __launch_bounds__(KNN_THREADS, 2)                              \
        knn_min_bm##BM(const __half* __restrict__ Q, const float* __restrict__ qn, int nq,     \
                       const __half* __restrict__ G, const float* __restrict__ gn,             \
                       const int* __restrict__ idx, int P, int K, int Cp, int tiles_per_split, \
                       unsigned int* __restrict__ out) {                                       \
        knn_min_impl<BM, WM>(Q, qn, nq, G, gn, idx, P, K, Cp, tiles_per_split, out);               \
    }

// Block rows x warp rows: 2x4 warps of 64x32 / 32x32 / 16x32, or 1x8 warps of 16x16 (BM=16,
// for wide levels on GPUs with ~100 KB of shared memory per block).
KNN_INSTANCE(128, 2)
KNN_INSTANCE(64, 2)
KNN_INSTANCE(32, 2)
KNN_INSTANCE(16, 1)

// Query preparation for one image and level: fp32/fp16 [P, C] (channels-last) -> fp16 [P, Cp]
// zero-padded, squared norms of the fp16 values (consistent with the gallery's stored norms),
// and the level's minimum buffer reset to +inf. One warp per position.
extern "C" __global__ void prep_query(const void* __restrict__ src, int src_half, int P, int C,
                                      int Cp, __half* __restrict__ dst, float* __restrict__ qn,
                                      unsigned int* __restrict__ minbuf) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= P) return;
    const size_t in_off = static_cast<size_t>(row) * C;
    float s = 0.f;
    for (int c = lane; c < Cp; c += 32) {
        float v = 0.f;
        if (c < C) {
            v = src_half ? __half2float(static_cast<const __half*>(src)[in_off + c])
                         : static_cast<const float*>(src)[in_off + c];
        }
        const __half h = __float2half_rn(v);
        dst[static_cast<size_t>(row) * Cp + c] = h;
        const float hv = __half2float(h);
        s = fmaf(hv, hv, s);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) {
        qn[row] = s;
        minbuf[row] = 0x7f800000u;  // +inf
    }
}
