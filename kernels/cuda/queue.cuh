// Pieces shared by the queue-based exchange kernels (exchange.cu, hierarchical.cu): device-scope counters, the
// stall check that turns a stuck queue into an error instead of a hang, and a warp-wide row copy.
#pragma once

#include <cuda/atomic>
#include <cuda_runtime.h>

#include "core/cuda_check.hpp"

namespace duplex::cuda::detail {

using Counter = ::cuda::atomic_ref<long long, ::cuda::thread_scope_device>;

// True when another warp already failed, or this wait has lasted past the timeout (then records `channel`).
__device__ inline bool stalled(int* error, long long timeout_cycles, long long start, int channel) {
    if (*reinterpret_cast<volatile int*>(error) != 0) return true;
    if (clock64() - start > timeout_cycles) {
        atomicCAS(error, 0, channel + 1);
        return true;
    }
    return false;
}

// n floats, the warp's 32 lanes striding.
__device__ inline void copy_floats(float* to, const float* from, long long n, int lane) {
    for (long long i = lane; i < n; i += 32) to[i] = from[i];
}

// Publishes what this warp wrote: every lane's stores are visible device-wide before lane 0 moves the counter.
__device__ inline void publish(Counter& counter, long long value, int lane) {
    __threadfence();
    __syncwarp();
    if (lane == 0) counter.store(value, ::cuda::memory_order_release);
}

// The consumer end of a chunked queue: `total` rows arrive in chunks of `rpc` through a ring of `qc` chunks;
// each is copied to dst (rows back to back) and given back. Returns false when stalled(start) gave up.
template <typename Stalled>
__device__ bool drain_chunks(Counter& head, Counter& tail, const float* queue, float* dst, long long total, int rpc,
                             int qc, int dim, int lane, Stalled&& stalled) {
    long long chunks = (total + rpc - 1) / rpc;
    for (long long i = 0; i < chunks; ++i) {
        long long start = clock64();
        while (head.load(::cuda::memory_order_acquire) <= i)
            if (stalled(start)) return false;
        long long rows = min((long long)rpc, total - i * rpc);
        copy_floats(dst + i * rpc * dim, queue + (i % qc) * rpc * dim, rows * dim, lane);
        publish(tail, i + 1, lane);
    }
    return true;
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

// Runs launch() on `stream` between two events and reads back the kernel's error word; returns the seconds
// between the events and the error (0: none).
template <typename Launch>
double timed_launch(cudaStream_t stream, const int* d_error, int& error, Launch&& launch) {
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
        DUPLEX_CUDA_CHECK(cudaMemcpyAsync(&error, d_error, sizeof(int), cudaMemcpyDeviceToHost, stream));
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
