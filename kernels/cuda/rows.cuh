// Pieces shared by the exchange kernels (exchange.cu, node_limited.cu): warp-wide row copies with 16-byte loads
// and stores, the stream-ordered arena of a launch's tables, and the timed launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/cuda_check.hpp"

namespace duplex::cuda::detail {

__device__ inline bool aligned16(const void* a, const void* b) {
    return ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b)) & 15) == 0;
}

// t[i] = apply(f[i]) for the 16-byte vectors (float4, uint4) i = first, first + stride, ... below n4, four loads
// in flight per thread.
template <typename V, typename Apply>
__device__ inline void strided_map4(V* t, const V* f, long long n4, long long first, long long stride, Apply apply) {
    long long i = first;
    for (; i + 3 * stride < n4; i += 4 * stride) {
        V v0 = f[i], v1 = f[i + stride], v2 = f[i + 2 * stride], v3 = f[i + 3 * stride];
        t[i] = apply(v0);
        t[i + stride] = apply(v1);
        t[i + 2 * stride] = apply(v2);
        t[i + 3 * stride] = apply(v3);
    }
    for (; i < n4; i += stride) t[i] = apply(f[i]);
}

// n bytes copied by a warp: 16 at a time where both ends are 16-byte aligned, else 4 at a time where both are
// 4-byte aligned, the rest one byte at a time (rows of any type and width: fp32, BF16, FP8 and its scales).
// Copies only, so the result is the byte loop's whatever path each piece takes.
__device__ inline void copy_bytes(void* to_row, const void* from_row, long long n, int lane) {
    auto* to = static_cast<char*>(to_row);
    auto* from = static_cast<const char*>(from_row);
    // Rows live in device allocations: global loads and stores (LDG/STG), not generic ones, where the compiler
    // cannot see it (pointers read from a table).
    __builtin_assume(__isGlobal(to) && __isGlobal(from));
    long long done = 0;
    if (aligned16(to, from)) {
        strided_map4(reinterpret_cast<uint4*>(to), reinterpret_cast<const uint4*>(from), n / 16, lane, 32,
                     [](uint4 v) { return v; });
        done = n / 16 * 16;
    } else if (((reinterpret_cast<uintptr_t>(to) | reinterpret_cast<uintptr_t>(from)) & 3) == 0) {
        auto* t = reinterpret_cast<uint32_t*>(to);
        auto* f = reinterpret_cast<const uint32_t*>(from);
        for (long long i = lane; i < n / 4; i += 32) t[i] = f[i];
        done = n / 4 * 4;
    }
    for (long long i = done + lane; i < n; i += 32) to[i] = from[i];
}

// One device allocation carved into 16-byte aligned pieces: the tables, queues and counters of one launch.
// Stream-ordered (cudaMallocAsync / cudaFreeAsync): a plain cudaFree would wait for the whole device, so an
// exchange could never overlap the compute stream's work.
class Arena {
public:
    Arena(size_t bytes, cudaStream_t stream) : stream_(stream) {
        DUPLEX_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&base_), bytes + 256, stream_));
    }
    ~Arena() { cudaFreeAsync(base_, stream_); }
    Arena(const Arena&) = delete;
    Arena& operator=(const Arena&) = delete;
    template <typename T>
    T* take(size_t count) {
        char* at = base_ + used_;
        used_ += (count * sizeof(T) + 15) / 16 * 16;
        return reinterpret_cast<T*>(at);
    }
    // Bytes the pieces of `counts` elements of T take (for sizing).
    template <typename T>
    static size_t size_of(size_t count) {
        return (count * sizeof(T) + 15) / 16 * 16;
    }

private:
    cudaStream_t stream_;
    char* base_ = nullptr;
    size_t used_ = 0;
};

// The current device's SM count (an exchange's budget is checked against it).
inline int current_device_sms() {
    int device = 0, sms = 0;
    DUPLEX_CUDA_CHECK(cudaGetDevice(&device));
    DUPLEX_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
}

// Runs launch() on `stream` between two events and waits for it; returns the seconds between the events.
template <typename Launch>
double timed_launch(cudaStream_t stream, Launch&& launch) {
    cudaEvent_t start = nullptr, stop = nullptr;
    DUPLEX_CUDA_CHECK(cudaEventCreate(&start));
    if (cudaEventCreate(&stop) != cudaSuccess) {
        cudaEventDestroy(start);
        DUPLEX_CUDA_CHECK(cudaErrorMemoryAllocation);
    }
    float ms = 0;
    try {
        DUPLEX_CUDA_CHECK(cudaEventRecord(start, stream));
        launch();
        DUPLEX_CUDA_CHECK(cudaGetLastError());
        DUPLEX_CUDA_CHECK(cudaEventRecord(stop, stream));
        DUPLEX_CUDA_CHECK(cudaStreamSynchronize(stream));
        DUPLEX_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    } catch (...) {
        cudaEventDestroy(start);
        cudaEventDestroy(stop);
        throw;
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    return ms * 1e-3;
}

}  // namespace duplex::cuda::detail
