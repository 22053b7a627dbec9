// An owning device array (host code that calls the CUDA runtime; include only where cuda_runtime.h is).
//
//   DeviceArray<float> x(n);  x.upload(host.data(), n, stream);  kernel(x.get());  x.download(out, n, stream);
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "core/cuda_check.hpp"

namespace duplex::cuda {

template <typename T>
class DeviceArray {
public:
    DeviceArray() = default;
    explicit DeviceArray(size_t n) : n_(n) {
        if (n_) DUPLEX_CUDA_CHECK(cudaMalloc(&p_, n_ * sizeof(T)));
    }
    ~DeviceArray() {
        if (p_) cudaFree(p_);
    }
    DeviceArray(DeviceArray&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
    DeviceArray& operator=(DeviceArray&& o) noexcept {
        std::swap(p_, o.p_);
        std::swap(n_, o.n_);
        return *this;
    }
    T* get() const { return p_; }
    T* at(size_t i) const { return p_ + i; }
    size_t size() const { return n_; }
    void upload(const T* host, size_t n, cudaStream_t stream, size_t at = 0) {
        if (n) DUPLEX_CUDA_CHECK(cudaMemcpyAsync(p_ + at, host, n * sizeof(T), cudaMemcpyHostToDevice, stream));
    }
    void download(T* host, size_t n, cudaStream_t stream, size_t at = 0) const {
        if (n) DUPLEX_CUDA_CHECK(cudaMemcpyAsync(host, p_ + at, n * sizeof(T), cudaMemcpyDeviceToHost, stream));
    }

private:
    T* p_ = nullptr;
    size_t n_ = 0;
};

}  // namespace duplex::cuda
