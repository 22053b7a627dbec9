// Pieces shared by the queue-based exchange kernels (exchange.cu, hierarchical.cu): device-scope counters, the
// stall check that turns a stuck queue into an error instead of a hang, and warp-wide row copies.
#pragma once

#include <cuda/atomic>
#include <cuda_runtime.h>

#include <cstdint>

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

__device__ inline bool aligned16(const void* a, const void* b) {
    return ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b)) & 15) == 0;
}

// t[i] = apply(f[i]) for the float4s i = first, first + stride, ... below n4, four loads in flight per thread.
template <typename Apply>
__device__ inline void strided_map4(float4* t, const float4* f, long long n4, long long first, long long stride,
                                    Apply apply) {
    long long i = first;
    for (; i + 3 * stride < n4; i += 4 * stride) {
        float4 v0 = f[i], v1 = f[i + stride], v2 = f[i + 2 * stride], v3 = f[i + 3 * stride];
        t[i] = apply(v0);
        t[i + stride] = apply(v1);
        t[i + 2 * stride] = apply(v2);
        t[i + 3 * stride] = apply(v3);
    }
    for (; i < n4; i += stride) t[i] = apply(f[i]);
}

// out[i] = op(in[i]) for n floats, the warp's 32 lanes striding: where both ends are 16-byte aligned, 16-byte loads
// and stores (LDG.E.128 / STG.E.128), four in flight per lane; the rest (a misaligned pair, a tail of n % 4) one
// float at a time. op acts on each element alone, so the result is the scalar loop's bit for bit.
template <typename Op>
__device__ inline void map_floats(float* to, const float* from, long long n, int lane, Op op) {
    // Rows live in device allocations: global loads and stores (LDG/STG), not generic ones, where the compiler
    // cannot see it (pointers read from a table).
    __builtin_assume(__isGlobal(to) && __isGlobal(from));
    long long done = 0;
    if (aligned16(to, from)) {
        strided_map4(reinterpret_cast<float4*>(to), reinterpret_cast<const float4*>(from), n / 4, lane, 32,
                     [&](float4 v) { return make_float4(op(v.x), op(v.y), op(v.z), op(v.w)); });
        done = n / 4 * 4;
    }
    for (long long i = done + lane; i < n; i += 32) to[i] = op(from[i]);
}

// n floats copied by a warp.
__device__ inline void copy_floats(float* to, const float* from, long long n, int lane) {
    map_floats(to, from, n, lane, [](float v) { return v; });
}

// n floats scaled by f (round to nearest) by a warp.
__device__ inline void scale_floats(float* to, const float* from, float f, long long n, int lane) {
    map_floats(to, from, n, lane, [f](float v) { return __fmul_rn(f, v); });
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

// The current device's SM count (an exchange's budget is checked against it).
inline int current_device_sms() {
    int device = 0, sms = 0;
    DUPLEX_CUDA_CHECK(cudaGetDevice(&device));
    DUPLEX_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
}

// Runs launch() on `stream` between two events and reads back the kernel's error word (none for a kernel that
// cannot stall: d_error null, error left as it is); returns the seconds between the events.
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
        if (d_error) DUPLEX_CUDA_CHECK(cudaMemcpyAsync(&error, d_error, sizeof(int), cudaMemcpyDeviceToHost, stream));
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
