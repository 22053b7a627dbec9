// The warp-specialized all-to-all of expert dispatch and combine, between "virtual ranks" whose buffers share
// one device. The CPU reference is the plain copy it must equal (tests/cuda/kernels_test.cpp builds it).
//
// Every (source, destination) pair is a channel with a ring of chunk slots in the destination's memory, a head
// (chunks written) and a tail (chunks consumed). The kernel runs on config.num_sms blocks — the SM budget —
// so the rest of the device stays free for compute; channel c belongs to block c % num_sms, and inside a block
// warp w of the first half sends channels w, w + W, ... (source rows -> queue) while warp w of the second half
// receives the same channels in the same order (queue -> destination rows). A channel's two ends are warps of
// one block, always resident together, so the queues cannot deadlock however small they are.
#include <cuda/atomic>
#include <cuda_runtime.h>

#include <algorithm>

#include <fmt/format.h>

#include "core/cuda_check.hpp"
#include "kernels/cuda/kernels.hpp"
#include "kernels/cuda/queue.cuh"

namespace duplex::cuda {

namespace {

using detail::copy_floats;
using detail::Counter;
using detail::publish;

struct Args {
    int num_ranks, dim, rows_per_chunk, queue_chunks, warps_per_role;
    const float* const* send;
    float* const* recv;
    const long long* send_off;  // [src * R + dst]
    const long long* count;     // [src * R + dst]
    const long long* recv_off;  // [src * R + dst]: first row in recv[dst]
    float* queues;              // per channel: queue_chunks * rows_per_chunk * dim floats
    long long* head;            // per channel, 32 longs apart (own cache line)
    long long* tail;
    int* error;                 // 0, or 1 + the stalled channel
    long long timeout_cycles;
};

__device__ bool stalled(const Args& a, long long start, int channel) {
    return detail::stalled(a.error, a.timeout_cycles, start, channel);
}

__device__ void send_channel(const Args& a, int channel, int lane) {
    long long total = a.count[channel];
    long long chunks = (total + a.rows_per_chunk - 1) / a.rows_per_chunk;
    const float* src = a.send[channel / a.num_ranks] + a.send_off[channel] * a.dim;
    float* queue = a.queues + (long long)channel * a.queue_chunks * a.rows_per_chunk * a.dim;
    Counter tail(a.tail[channel * 32]), head(a.head[channel * 32]);
    for (long long i = 0; i < chunks; ++i) {
        long long start = clock64();
        while (i - tail.load(::cuda::memory_order_acquire) >= a.queue_chunks)
            if (stalled(a, start, channel)) return;
        long long rows = min((long long)a.rows_per_chunk, total - i * a.rows_per_chunk);
        copy_floats(queue + (i % a.queue_chunks) * a.rows_per_chunk * a.dim, src + i * a.rows_per_chunk * a.dim,
                    rows * a.dim, lane);
        publish(head, i + 1, lane);
    }
}

__device__ void receive_channel(const Args& a, int channel, int lane) {
    float* dst = a.recv[channel % a.num_ranks] + a.recv_off[channel] * a.dim;
    const float* queue = a.queues + (long long)channel * a.queue_chunks * a.rows_per_chunk * a.dim;
    Counter tail(a.tail[channel * 32]), head(a.head[channel * 32]);
    detail::drain_chunks(head, tail, queue, dst, a.count[channel], a.rows_per_chunk, a.queue_chunks, a.dim, lane,
                         [&](long long start) { return stalled(a, start, channel); });
}

__global__ void exchange_kernel(Args a) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    bool sender = warp < a.warps_per_role;
    int role_warp = sender ? warp : warp - a.warps_per_role;
    int channels = a.num_ranks * a.num_ranks;
    // Channels of this block: blockIdx.x, blockIdx.x + gridDim.x, ...; local index j goes to warp j % W.
    for (int j = role_warp;; j += a.warps_per_role) {
        int channel = blockIdx.x + j * gridDim.x;
        if (channel >= channels) break;
        if (sender)
            send_channel(a, channel, lane);
        else
            receive_channel(a, channel, lane);
    }
}

int warps_per_role(int num_ranks, int num_sms) {
    int per_block = (num_ranks * num_ranks + num_sms - 1) / num_sms;
    return std::max(1, std::min(per_block, 16));
}

}  // namespace

void check_exchange(int num_ranks, const std::vector<std::vector<int64_t>>& send_counts,
                    const std::vector<int64_t>& recv_capacity_rows, int dim, const ExchangeConfig& c, int device_sms) {
    DUPLEX_CHECK_ARG(num_ranks >= 1, "exchange", "needs at least one rank, got {}", num_ranks);
    DUPLEX_CHECK_ARG(c.num_sms >= 1 && c.num_sms <= device_sms, "exchange: SM budget",
                     "{} SMs requested, the device has {}", c.num_sms, device_sms);
    DUPLEX_CHECK_ARG(c.rows_per_chunk >= 1 && c.queue_chunks >= 1, "exchange: queue",
                     "rows per chunk ({}) and chunks per queue ({}) must be positive", c.rows_per_chunk, c.queue_chunks);
    DUPLEX_CHECK_ARG(c.timeout_s > 0, "exchange: timeout", "must be positive, got {}", c.timeout_s);
    DUPLEX_CHECK_ARG(dim >= 1, "exchange", "row width must be positive, got {}", dim);
    DUPLEX_CHECK_ARG(int(send_counts.size()) == num_ranks && int(recv_capacity_rows.size()) == num_ranks, "exchange",
                     "counts for {} and capacities for {} ranks, expected {}", send_counts.size(),
                     recv_capacity_rows.size(), num_ranks);
    for (int dst = 0; dst < num_ranks; ++dst) {
        int64_t rows = 0;
        for (int src = 0; src < num_ranks; ++src) {
            DUPLEX_CHECK_ARG(int(send_counts[src].size()) == num_ranks, "exchange", "rank {} has {} counts, expected {}",
                             src, send_counts[src].size(), num_ranks);
            DUPLEX_CHECK_ARG(send_counts[src][dst] >= 0, "exchange", "rank {} sends {} rows to rank {}", src,
                             send_counts[src][dst], dst);
            rows += send_counts[src][dst];
        }
        DUPLEX_CHECK_ARG(rows <= recv_capacity_rows[dst], "exchange: receive buffer",
                         "rank {} receives {} rows but its buffer holds {}", dst, rows, recv_capacity_rows[dst]);
    }
}

double exchange_rows(const std::vector<const float*>& send, const std::vector<std::vector<int64_t>>& send_offsets,
                     const std::vector<std::vector<int64_t>>& send_counts, const std::vector<float*>& recv,
                     const std::vector<int64_t>& recv_capacity_rows, int dim, const ExchangeConfig& c,
                     cudaStream_t stream) {
    int R = int(send.size());
    int device = 0, sms = 0, clock_khz = 0;
    DUPLEX_CUDA_CHECK(cudaGetDevice(&device));
    DUPLEX_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    DUPLEX_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device));
    check_exchange(R, send_counts, recv_capacity_rows, dim, c, sms);
    DUPLEX_CHECK_ARG(int(recv.size()) == R && int(send_offsets.size()) == R, "exchange", "{} send, {} receive buffers, {} "
                     "offset lists", R, recv.size(), send_offsets.size());
    std::vector<long long> off(size_t(R) * R), cnt(off.size()), roff(off.size());
    for (int dst = 0; dst < R; ++dst) {
        long long at = 0;
        for (int src = 0; src < R; ++src) {
            DUPLEX_CHECK_ARG(int(send_offsets[src].size()) == R && send_offsets[src][dst] >= 0, "exchange",
                             "rank {} has a bad send offset for rank {}", src, dst);
            off[size_t(src) * R + dst] = send_offsets[src][dst];
            cnt[size_t(src) * R + dst] = send_counts[src][dst];
            roff[size_t(src) * R + dst] = at;
            at += send_counts[src][dst];
        }
    }
    size_t channels = size_t(R) * R;
    size_t queue_floats = channels * c.queue_chunks * size_t(c.rows_per_chunk) * dim;
    // One allocation for the tables, the queues and the counters.
    using detail::Arena;
    Arena arena(2 * Arena::size_of<void*>(R) + 3 * Arena::size_of<long long>(channels) +
                2 * Arena::size_of<long long>(32 * channels) + Arena::size_of<int>(1) + Arena::size_of<float>(queue_floats), stream);
    Args a{};
    a.num_ranks = R;
    a.dim = dim;
    a.rows_per_chunk = c.rows_per_chunk;
    a.queue_chunks = c.queue_chunks;
    a.warps_per_role = warps_per_role(R, c.num_sms);
    auto* d_send = arena.take<const float*>(R);
    auto* d_recv = arena.take<float*>(R);
    auto* d_off = arena.take<long long>(channels);
    auto* d_cnt = arena.take<long long>(channels);
    auto* d_roff = arena.take<long long>(channels);
    a.head = arena.take<long long>(32 * channels);
    a.tail = arena.take<long long>(32 * channels);
    a.error = arena.take<int>(1);
    a.queues = arena.take<float>(queue_floats);
    a.send = d_send;
    a.recv = d_recv;
    a.send_off = d_off;
    a.count = d_cnt;
    a.recv_off = d_roff;
    a.timeout_cycles = (long long)(c.timeout_s * clock_khz * 1e3);
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_send, send.data(), sizeof(void*) * R, cudaMemcpyHostToDevice, stream));
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_recv, recv.data(), sizeof(void*) * R, cudaMemcpyHostToDevice, stream));
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_off, off.data(), sizeof(long long) * channels, cudaMemcpyHostToDevice, stream));
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_cnt, cnt.data(), sizeof(long long) * channels, cudaMemcpyHostToDevice, stream));
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_roff, roff.data(), sizeof(long long) * channels, cudaMemcpyHostToDevice, stream));
    DUPLEX_CUDA_CHECK(cudaMemsetAsync(a.head, 0, 32 * sizeof(long long) * channels, stream));
    DUPLEX_CUDA_CHECK(cudaMemsetAsync(a.tail, 0, 32 * sizeof(long long) * channels, stream));
    DUPLEX_CUDA_CHECK(cudaMemsetAsync(a.error, 0, sizeof(int), stream));
    int error = 0;
    double seconds = detail::timed_launch(stream, a.error, error, [&] {
        exchange_kernel<<<c.num_sms, 64 * a.warps_per_role, 0, stream>>>(a);
    });
    if (error != 0)
        throw CommError(fmt::format("exchange: the queue from virtual rank {} to {} stalled for {} s", (error - 1) / R,
                                    (error - 1) % R, c.timeout_s));
    return seconds;
}

}  // namespace duplex::cuda
