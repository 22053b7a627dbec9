// SwiGLU forward and backward on the device, elementwise; the CPU reference is kernels::swiglu_* (same formula,
// expf instead of std::exp: equal within a few ulp, tests/cuda/stage_test.cpp).
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

}  // namespace duplex::cuda
