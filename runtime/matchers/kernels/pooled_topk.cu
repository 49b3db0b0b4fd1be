// SPADE image-level kNN: distances from the test image's pooled feature to all N gallery pooled
// features, then the K nearest (ties -> lower index) and the image score.
//
// Why float64: the NumPy oracle ranks gallery images in float64, and the neighbour set decides
// every pixel of the map, so the device must pick the same images. N x Cg is small (a few MB),
// so the fp64 GEMV costs microseconds even on GPUs with slow fp64.

#include <cuda_fp16.h>
#include <stdint.h>

#ifndef SPADE_DYNAMIC_SMEM
#define SPADE_DYNAMIC_SMEM(type, name) extern __shared__ __align__(128) type name[]
#endif

// One warp per gallery image. q: fp32 or fp16 [Cg]; G: fp16 [N, Cg]; gn: float64 [N]
// (squared norms of the fp16 values); dist: float64 [N] = max(qn + gn - 2 q.g, 0).
// Dynamic shared memory: Cg doubles (the query) + 32 doubles.
extern "C" __global__ void pooled_dist(const void* __restrict__ q, int q_half, int Cg,
                                       const __half* __restrict__ G,
                                       const double* __restrict__ gn, int N,
                                       double* __restrict__ dist) {
    SPADE_DYNAMIC_SMEM(double, sq);
    double* red = sq + Cg;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int nwarps = blockDim.x >> 5;

    double part = 0.0;
    for (int i = tid; i < Cg; i += blockDim.x) {
        const double v = q_half ? static_cast<double>(__half2float(static_cast<const __half*>(q)[i]))
                                : static_cast<double>(static_cast<const float*>(q)[i]);
        sq[i] = v;
        part = fma(v, v, part);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
    if (lane == 0) red[warp] = part;
    __syncthreads();
    double qn = 0.0;
    for (int w = 0; w < nwarps; ++w) qn += red[w];

    const bool vec = (Cg % 8) == 0;
    for (int n = blockIdx.x * nwarps + warp; n < N; n += gridDim.x * nwarps) {
        const __half* g = G + static_cast<size_t>(n) * Cg;
        double dot = 0.0;
        if (vec) {
            for (int i = lane * 8; i < Cg; i += 256) {
                const uint4 raw = *reinterpret_cast<const uint4*>(g + i);
                const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 f = __half22float2(h[e]);
                    dot = fma(static_cast<double>(f.x), sq[i + 2 * e], dot);
                    dot = fma(static_cast<double>(f.y), sq[i + 2 * e + 1], dot);
                }
            }
        } else {
            for (int i = lane; i < Cg; i += 32)
                dot = fma(static_cast<double>(__half2float(g[i])), sq[i], dot);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (lane == 0) dist[n] = fmax(qn + gn[n] - 2.0 * dot, 0.0);
    }
}

// One block. Bitonic sort of (distance, index) pairs in shared memory, ascending by distance
// then index, so ties go to the lower index exactly as a stable argsort would.
// Writes the kmax nearest indices (int32) to nbr and mean(sqrt(d)) of the k_image nearest to
// score. Dynamic shared memory: npad * (8 + 4) bytes, npad = power of two >= N.
extern "C" __global__ void topk_select(const double* __restrict__ dist, int N, int npad,
                                       int k_image, int kmax, int* __restrict__ nbr,
                                       float* __restrict__ score) {
    SPADE_DYNAMIC_SMEM(double, sd);
    int* si = reinterpret_cast<int*>(sd + npad);
    const int tid = threadIdx.x;
    for (int i = tid; i < npad; i += blockDim.x) {
        sd[i] = i < N ? dist[i] : INFINITY;
        si[i] = i < N ? i : 0x7fffffff;
    }
    __syncthreads();
    for (int k = 2; k <= npad; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = tid; i < npad; i += blockDim.x) {
                const int p = i ^ j;
                if (p > i) {
                    const double di = sd[i], dp = sd[p];
                    const int ii = si[i], ip = si[p];
                    const bool i_gt_p = (di > dp) || (di == dp && ii > ip);
                    const bool ascending = (i & k) == 0;
                    if (i_gt_p == ascending) {
                        sd[i] = dp;
                        sd[p] = di;
                        si[i] = ip;
                        si[p] = ii;
                    }
                }
            }
            __syncthreads();
        }
    }
    for (int i = tid; i < kmax; i += blockDim.x) nbr[i] = si[i];
    if (tid == 0) {
        double s = 0.0;
        for (int i = 0; i < k_image; ++i) s += sqrt(sd[i]);
        *score = static_cast<float>(s / k_image);
    }
}
