#include "kernels/cuda/device.hpp"

#include <cuda_runtime.h>

#include "core/dtype.hpp"
#include "core/cuda_check.hpp"

namespace duplex {

std::vector<CudaDeviceInfo> cuda_devices() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // no driver or no device: report none
        return {};
    }
    std::vector<CudaDeviceInfo> out;
    for (int i = 0; i < n; ++i) {
        cudaDeviceProp p{};
        if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
        out.push_back({i, p.name, p.multiProcessorCount, p.major, p.minor, p.totalGlobalMem});
    }
    return out;
}

namespace {
__global__ void fp32_to_e4m3_kernel(const float* in, unsigned char* out, size_t n) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
        out[i] = fp32_to_e4m3(in[i]);
}
}  // namespace

void cuda_fp32_to_e4m3(const float* host_in, unsigned char* host_out, size_t n) {
    if (n == 0) return;
    float* d_in = nullptr;
    unsigned char* d_out = nullptr;
    DUPLEX_CUDA_CHECK(cudaMalloc(&d_in, n * sizeof(float)));
    DUPLEX_CUDA_CHECK(cudaMalloc(&d_out, n));
    DUPLEX_CUDA_CHECK(cudaMemcpy(d_in, host_in, n * sizeof(float), cudaMemcpyHostToDevice));
    int blocks = static_cast<int>(std::min<size_t>((n + 255) / 256, 4096));
    fp32_to_e4m3_kernel<<<blocks, 256>>>(d_in, d_out, n);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
    DUPLEX_CUDA_CHECK(cudaMemcpy(host_out, d_out, n, cudaMemcpyDeviceToHost));
    cudaFree(d_in);
    cudaFree(d_out);
}

}  // namespace duplex
