// FP8-e4m3 fine-grained quantization on the device: the CPU reference is kernels/cpu/ops.cpp. Both use
// core/dtype.hpp's conversion and an IEEE division by the tile scale, so results are bit-equal.
#include <cuda_runtime.h>

#include "core/dtype.hpp"
#include "core/cuda_check.hpp"
#include "kernels/cuda/kernels.hpp"

namespace duplex::cuda {

namespace {

constexpr int kTile = 128;

void check_dims(int rows, int cols, bool weights) {
    DUPLEX_CHECK_ARG(rows >= 0 && cols >= 0, "fp8 quantize", "negative shape {} x {}", rows, cols);
    DUPLEX_CHECK_ARG(cols % kTile == 0, "fp8 quantize", "columns ({}) must be a multiple of 128", cols);
    if (weights) DUPLEX_CHECK_ARG(rows % kTile == 0, "fp8 quantize", "weight rows ({}) must be a multiple of 128", rows);
}

__device__ float tile_scale(float amax) { return amax > 0 ? amax / kE4M3Max : 1.0f; }

// One warp per 1x128 tile: 4 values per lane, amax by shuffles.
__global__ void quantize_1x128_kernel(const float* x, int rows, int cols, uint8_t* q, float* scales) {
    int tiles = cols / kTile;
    int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (warp >= int64_t(rows) * tiles) return;
    int64_t r = warp / tiles, t = warp % tiles;
    const float* src = x + r * cols + t * kTile;
    float v[4], amax = 0;
    for (int i = 0; i < 4; ++i) {
        v[i] = src[lane + 32 * i];
        amax = fmaxf(amax, fabsf(v[i]));
    }
    for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    float s = tile_scale(amax);
    if (lane == 0) scales[r * tiles + t] = s;
    uint8_t* dst = q + r * cols + t * kTile;
    for (int i = 0; i < 4; ++i) dst[lane + 32 * i] = fp32_to_e4m3(__fdiv_rn(v[i], s));
}

__global__ void dequantize_1x128_kernel(const uint8_t* q, const float* scales, int64_t n, int cols, float* x) {
    int tiles = cols / kTile;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        int64_t r = i / cols, c = i % cols;
        x[i] = __fmul_rn(e4m3_to_fp32(q[i]), scales[r * tiles + c / kTile]);
    }
}

// One block of 256 threads per 128x128 weight block.
__global__ void quantize_128x128_kernel(const float* w, int rows, int cols, uint8_t* q, float* scales) {
    __shared__ float partial[8];
    int bc = cols / kTile;
    int64_t br = blockIdx.x / bc, b = blockIdx.x % bc;
    float amax = 0;
    for (int i = threadIdx.x; i < kTile * kTile; i += blockDim.x) {
        int64_t idx = (br * kTile + i / kTile) * cols + b * kTile + i % kTile;
        amax = fmaxf(amax, fabsf(w[idx]));
    }
    for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = amax;
    __syncthreads();
    amax = 0;
    for (int i = 0; i < int(blockDim.x / 32); ++i) amax = fmaxf(amax, partial[i]);
    float s = tile_scale(amax);
    if (threadIdx.x == 0) scales[br * bc + b] = s;
    for (int i = threadIdx.x; i < kTile * kTile; i += blockDim.x) {
        int64_t idx = (br * kTile + i / kTile) * cols + b * kTile + i % kTile;
        q[idx] = fp32_to_e4m3(__fdiv_rn(w[idx], s));
    }
}

__global__ void dequantize_128x128_kernel(const uint8_t* q, const float* scales, int64_t n, int cols, float* w) {
    int bc = cols / kTile;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        int64_t r = i / cols, c = i % cols;
        w[i] = __fmul_rn(e4m3_to_fp32(q[i]), scales[(r / kTile) * bc + c / kTile]);
    }
}

int grid_for(int64_t n, int threads) { return int(std::min<int64_t>((n + threads - 1) / threads, 65535)); }

}  // namespace

void quantize_fp8_1x128(const float* x, int rows, int cols, uint8_t* q, float* scales, cudaStream_t stream) {
    check_dims(rows, cols, false);
    int64_t warps = int64_t(rows) * (cols / kTile);
    if (warps == 0) return;
    constexpr int threads = 256;
    quantize_1x128_kernel<<<int((warps * 32 + threads - 1) / threads), threads, 0, stream>>>(x, rows, cols, q, scales);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
}

void dequantize_fp8_1x128(const uint8_t* q, const float* scales, int rows, int cols, float* x, cudaStream_t stream) {
    check_dims(rows, cols, false);
    int64_t n = int64_t(rows) * cols;
    if (n == 0) return;
    dequantize_1x128_kernel<<<grid_for(n, 256), 256, 0, stream>>>(q, scales, n, cols, x);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
}

void quantize_fp8_128x128(const float* w, int rows, int cols, uint8_t* q, float* scales, cudaStream_t stream) {
    check_dims(rows, cols, true);
    int blocks = (rows / kTile) * (cols / kTile);
    if (blocks == 0) return;
    quantize_128x128_kernel<<<blocks, 256, 0, stream>>>(w, rows, cols, q, scales);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
}

void dequantize_fp8_128x128(const uint8_t* q, const float* scales, int rows, int cols, float* w, cudaStream_t stream) {
    check_dims(rows, cols, true);
    int64_t n = int64_t(rows) * cols;
    if (n == 0) return;
    dequantize_128x128_kernel<<<grid_for(n, 256), 256, 0, stream>>>(q, scales, n, cols, w);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace duplex::cuda
