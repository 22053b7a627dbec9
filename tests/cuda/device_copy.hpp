// Host <-> device copies of vectors for the GPU tests (leaks nothing the test does not free: the caller owns the
// returned device pointer).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

namespace duplex::test_support {

template <typename T>
T* to_device(const std::vector<T>& v) {
    T* p = nullptr;
    if (cudaMalloc(&p, std::max<size_t>(v.size(), 1) * sizeof(T)) != cudaSuccess) return nullptr;
    cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
    return p;
}

template <typename T>
std::vector<T> to_host(const T* p, size_t n) {
    std::vector<T> v(n);
    cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
}

}  // namespace duplex::test_support
