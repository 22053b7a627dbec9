// SwiGLU forward and backward on the device, elementwise, in fp32 and on BF16 values (fp32 math, each result
// rounded once), and the fp32 <-> BF16 conversions; the CPU references are kernels::swiglu_* (same formula, expf
// instead of std::exp: equal within a few ulp, tests/cuda/stage_test.cpp and kernels_test.cpp) and
// fp32_to_bf16 / bf16_to_fp32 of core/dtype.hpp (bit for bit).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "core/cuda_check.hpp"
#include "kernels/cuda/kernels.hpp"

namespace duplex::cuda {

namespace {

__global__ void swiglu_forward_kernel(const float* a, const float* b, size_t n, float* h) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        float s = 1.0f / (1.0f + expf(-a[i]));
        h[i] = a[i] * s * b[i];
    }
}

__global__ void swiglu_backward_kernel(const float* dh, const float* a, const float* b, size_t n, float* da, float* db) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        float s = 1.0f / (1.0f + expf(-a[i]));
        da[i] = dh[i] * b[i] * s * (1.0f + a[i] * (1.0f - s));
        db[i] = dh[i] * a[i] * s;
    }
}

// BF16 bit patterns <-> fp32 (round to nearest even).
__device__ inline float widen(uint16_t h) { return __uint_as_float(unsigned(h) << 16); }
__device__ inline uint16_t narrow(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

// The same formulas on BF16 values: widened to fp32, computed as above, each result rounded once.
__global__ void swiglu_forward_bf16_kernel(const uint16_t* a, const uint16_t* b, size_t n, uint16_t* h) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        float x = widen(a[i]), s = 1.0f / (1.0f + expf(-x));
        h[i] = narrow(x * s * widen(b[i]));
    }
}

__global__ void swiglu_backward_bf16_kernel(const uint16_t* dh, const uint16_t* a, const uint16_t* b, size_t n,
                                            uint16_t* da, uint16_t* db) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        float x = widen(a[i]), y = widen(b[i]), g = widen(dh[i]), s = 1.0f / (1.0f + expf(-x));
        da[i] = narrow(g * y * s * (1.0f + x * (1.0f - s)));
        db[i] = narrow(g * x * s);
    }
}

__global__ void to_bf16_kernel(const float* x, size_t n, uint16_t* h) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
        h[i] = narrow(x[i]);
}

__global__ void from_bf16_kernel(const uint16_t* h, size_t n, float* x) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
        x[i] = widen(h[i]);
}

unsigned blocks_for(size_t n) { return unsigned(std::min<size_t>((n + 255) / 256, 4096)); }

}  // namespace

void swiglu_forward(const float* a, const float* b, size_t n, float* h, cudaStream_t stream) {
    if (n == 0) return;
    swiglu_forward_kernel<<<blocks_for(n), 256, 0, stream>>>(a, b, n, h);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
}

void swiglu_backward(const float* dh, const float* a, const float* b, size_t n, float* da, float* db,
                     cudaStream_t stream) {
    if (n == 0) return;
    swiglu_backward_kernel<<<blocks_for(n), 256, 0, stream>>>(dh, a, b, n, da, db);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
}

void swiglu_forward_bf16(const uint16_t* a, const uint16_t* b, size_t n, uint16_t* h, cudaStream_t stream) {
    if (n == 0) return;
    swiglu_forward_bf16_kernel<<<blocks_for(n), 256, 0, stream>>>(a, b, n, h);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
}

void swiglu_backward_bf16(const uint16_t* dh, const uint16_t* a, const uint16_t* b, size_t n, uint16_t* da,
                          uint16_t* db, cudaStream_t stream) {
    if (n == 0) return;
    swiglu_backward_bf16_kernel<<<blocks_for(n), 256, 0, stream>>>(dh, a, b, n, da, db);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
}

void to_bf16(const float* x, size_t n, uint16_t* h, cudaStream_t stream) {
    if (n == 0) return;
    to_bf16_kernel<<<blocks_for(n), 256, 0, stream>>>(x, n, h);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
}

void from_bf16(const uint16_t* h, size_t n, float* x, cudaStream_t stream) {
    if (n == 0) return;
    from_bf16_kernel<<<blocks_for(n), 256, 0, stream>>>(h, n, x);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace duplex::cuda
