// SPADE post-processing on the device: per-level squared minimum distances -> one anomaly map.
//
// Semantics match the CPU path exactly (runtime/scoring.py): sqrt per level, bilinear upsampling
// with PyTorch's align_corners=False rule, mean over levels, then a separable Gaussian with
// scipy.ndimage.gaussian_filter's defaults (mode 'reflect' = half-sample symmetric, weights
// exp(-x^2 / 2 sigma^2) normalised over |x| <= radius). Kept as three small kernels: the map
// is S x S (50k pixels at S = 224), so they cost microseconds and stay easy to verify.

#include <stdint.h>

// minbuf: all levels' [H*W] uint32 float bits, concatenated; table: int32 [L][3] = (offset,
// H, W). out: [S, S] float32, mean over levels of the upsampled sqrt maps.
extern "C" __global__ void upsample_mean(const unsigned int* __restrict__ minbuf,
                                         const int* __restrict__ table, int L, int S,
                                         float* __restrict__ out) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= S || y >= S) return;
    float acc = 0.f;
    for (int l = 0; l < L; ++l) {
        const unsigned int* m = minbuf + table[3 * l];
        const int H = table[3 * l + 1];
        const int W = table[3 * l + 2];
        // PyTorch: src = scale * (dst + 0.5) - 0.5, clamped at 0; scale = in / out.
        const float sy = fmaxf((static_cast<float>(H) / S) * (y + 0.5f) - 0.5f, 0.f);
        const float sx = fmaxf((static_cast<float>(W) / S) * (x + 0.5f) - 0.5f, 0.f);
        const int y0 = min(static_cast<int>(sy), H - 1);
        const int x0 = min(static_cast<int>(sx), W - 1);
        const int y1 = min(y0 + 1, H - 1);
        const int x1 = min(x0 + 1, W - 1);
        const float ly = sy - y0;
        const float lx = sx - x0;
        const float v00 = sqrtf(__uint_as_float(m[y0 * W + x0]));
        const float v01 = sqrtf(__uint_as_float(m[y0 * W + x1]));
        const float v10 = sqrtf(__uint_as_float(m[y1 * W + x0]));
        const float v11 = sqrtf(__uint_as_float(m[y1 * W + x1]));
        acc += (1.f - ly) * ((1.f - lx) * v00 + lx * v01) + ly * ((1.f - lx) * v10 + lx * v11);
    }
    out[y * S + x] = acc / L;
}

// scipy 'reflect': (d c b a | a b c d | d c b a), any distance from the edge.
__device__ __forceinline__ int reflect_index(int i, int n) {
    const int period = 2 * n;
    i %= period;
    if (i < 0) i += period;
    return i < n ? i : period - 1 - i;
}

// One separable pass of the Gaussian: along x when `along_y` is 0, along y otherwise.
// w: float32 [2R+1] normalised weights.
extern "C" __global__ void blur_pass(const float* __restrict__ in, float* __restrict__ out, int S,
                                     const float* __restrict__ w, int R, int along_y) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= S || y >= S) return;
    float acc = 0.f;
    if (along_y) {
        for (int t = -R; t <= R; ++t) acc = fmaf(w[t + R], in[reflect_index(y + t, S) * S + x], acc);
    } else {
        for (int t = -R; t <= R; ++t) acc = fmaf(w[t + R], in[y * S + reflect_index(x + t, S)], acc);
    }
    out[y * S + x] = acc;
}
