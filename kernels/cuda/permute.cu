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

__global__ void gate_rows_kernel(float* rows, int dim, const int64_t* item_row, const float* gates) {
    int64_t slot = blockIdx.x;
    float* r = rows + item_row[slot] * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) r[c] = __fmul_rn(r[c], gates[slot]);
}

// One thread per slot, columns in order: the CPU's summation order exactly.
__global__ void slot_dots_kernel(const float* dy, const float* outputs, int dim, const int64_t* item_row, int64_t slots,
                                 int top_k, float* dots) {
    int64_t slot = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (slot >= slots) return;
    const float* g = dy + (slot / top_k) * dim;
    const float* o = outputs + item_row[slot] * dim;
    float acc = 0.0f;
    for (int c = 0; c < dim; ++c) acc = __fadd_rn(acc, __fmul_rn(g[c], o[c]));
    dots[slot] = acc;
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

void gate_rows(float* rows, int dim, const DeviceLayout& layout, const float* gates, cudaStream_t stream) {
    DUPLEX_CHECK_ARG(dim >= 1, "gate rows", "row width must be positive, got {}", dim);
    if (layout.num_items() == 0) return;
    gate_rows_kernel<<<unsigned(layout.num_items()), threads_for(dim), 0, stream>>>(rows, dim, layout.item_row(), gates);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
}

void slot_dots(const float* dy, const float* outputs, int dim, const DeviceLayout& layout, int tokens, int top_k,
               float* dots, cudaStream_t stream) {
    DUPLEX_CHECK_ARG(dim >= 1 && top_k >= 1, "slot dots", "bad shape: dim {}, top_k {}", dim, top_k);
    DUPLEX_CHECK_ARG(layout.num_items() == int64_t(tokens) * top_k, "slot dots", "{} items for {} tokens x top-{}",
                     layout.num_items(), tokens, top_k);
    if (tokens == 0) return;
    int64_t slots = layout.num_items();
    slot_dots_kernel<<<unsigned((slots + 127) / 128), 128, 0, stream>>>(dy, outputs, dim, layout.item_row(), slots, top_k,
                                                                        dots);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace duplex::cuda
