// Timing helpers of the GPU benchmarks (tools/gpu_commbench.cpp, tools/bench/bench_gpu.cpp).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "core/cuda_check.hpp"

namespace duplex::tools {

// A device allocation of at least `bytes`.
struct DeviceBuffer {
    explicit DeviceBuffer(size_t bytes) : bytes(bytes) { DUPLEX_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 16))); }
    ~DeviceBuffer() { cudaFree(p); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    template <typename T>
    T* as() {
        return static_cast<T*>(p);
    }
    void* p = nullptr;
    size_t bytes;
};

// Milliseconds of fn() on `stream` (events around it), best of `reps`; meanwhile() runs on the host after fn is
// queued, before the wait (work of its own on another stream, to measure fn beside it).
template <typename Fn, typename Meanwhile>
float best_ms(cudaStream_t stream, int reps, Fn&& fn, Meanwhile&& meanwhile) {
    cudaEvent_t s, e;
    DUPLEX_CUDA_CHECK(cudaEventCreate(&s));
    DUPLEX_CUDA_CHECK(cudaEventCreate(&e));
    float best = 1e30f;
    for (int i = 0; i < reps; ++i) {
        DUPLEX_CUDA_CHECK(cudaEventRecord(s, stream));
        fn();
        DUPLEX_CUDA_CHECK(cudaEventRecord(e, stream));
        meanwhile();
        DUPLEX_CUDA_CHECK(cudaEventSynchronize(e));
        float ms = 0;
        DUPLEX_CUDA_CHECK(cudaEventElapsedTime(&ms, s, e));
        best = std::min(best, ms);
    }
    cudaEventDestroy(s);
    cudaEventDestroy(e);
    return best;
}

template <typename Fn>
float best_ms(cudaStream_t stream, int reps, Fn&& fn) {
    return best_ms(stream, reps, fn, [] {});
}

// Device-to-device copy bandwidth of `bytes` (read once, written once), bytes per second.
inline double copy_bandwidth(size_t bytes, int reps = 5) {
    DeviceBuffer a(bytes), b(bytes);
    float ms = best_ms(nullptr, reps, [&] { DUPLEX_CUDA_CHECK(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice)); });
    return bytes / (ms * 1e-3);
}

}  // namespace duplex::tools
