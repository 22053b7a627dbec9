// Dispatch permutation and combine on the device: the CPU reference is kernels/cpu/permute.cpp.
#include <cuda_runtime.h>

#include "core/cuda_check.hpp"
#include "kernels/cuda/kernels.hpp"

namespace duplex::cuda {

DeviceLayout::DeviceLayout(const kernels::DispatchLayout& layout)
    : num_items_(int64_t(layout.item_row.size())), num_rows_(layout.num_rows()) {
    if (num_items_ == 0) return;
    DUPLEX_CUDA_CHECK(cudaMalloc(&item_row_, sizeof(int64_t) * num_items_));
    DUPLEX_CUDA_CHECK(cudaMemcpy(item_row_, layout.item_row.data(), sizeof(int64_t) * num_items_, cudaMemcpyHostToDevice));
}

DeviceLayout::~DeviceLayout() {
    if (item_row_) cudaFree(item_row_);
}

namespace {

// One block per item; threads stride over the row.
__global__ void permute_kernel(const float* x, int dim, const int* src_row, const int64_t* item_row, float* send) {
    int64_t i = blockIdx.x;
    const float* from = x + int64_t(src_row[i]) * dim;
    float* to = send + item_row[i] * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) to[c] = from[c];
}

// One block per token; each thread owns columns and adds the token's slots in order, multiply and add rounded
// separately (no FMA), exactly as the CPU reference.
__global__ void combine_kernel(const float* recv, int dim, const int64_t* item_row, const float* gates, int top_k,
                               float* y) {
    int64_t t = blockIdx.x;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < top_k; ++k) {
            int64_t slot = t * top_k + k;
            acc = __fadd_rn(acc, __fmul_rn(gates[slot], recv[item_row[slot] * dim + c]));
        }
        y[t * dim + c] = acc;
    }
}

int threads_for(int dim) { return dim >= 256 ? 256 : ((dim + 31) / 32) * 32; }

}  // namespace

void permute_rows(const float* x, int dim, const int* src_row, const DeviceLayout& layout, float* send,
                  cudaStream_t stream) {
    DUPLEX_CHECK_ARG(dim >= 1, "permute", "row width must be positive, got {}", dim);
    if (layout.num_items() == 0) return;
    DUPLEX_CHECK_ARG(layout.num_items() < (int64_t(1) << 31), "permute", "{} items exceed one launch",
                     layout.num_items());
    permute_kernel<<<unsigned(layout.num_items()), threads_for(dim), 0, stream>>>(x, dim, src_row, layout.item_row(), send);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
}

void combine_rows(const float* recv, int dim, const DeviceLayout& layout, const float* gates, int tokens, int top_k,
                  float* y, cudaStream_t stream) {
    DUPLEX_CHECK_ARG(dim >= 1 && top_k >= 1, "combine", "bad shape: dim {}, top_k {}", dim, top_k);
    DUPLEX_CHECK_ARG(layout.num_items() == int64_t(tokens) * top_k, "combine", "{} items for {} tokens x top-{}",
                     layout.num_items(), tokens, top_k);
    if (tokens == 0) return;
    combine_kernel<<<unsigned(tokens), threads_for(dim), 0, stream>>>(recv, dim, layout.item_row(), gates, top_k, y);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace duplex::cuda
