// The all-to-all of expert dispatch and combine between "virtual ranks" whose buffers share one device. The CPU
// reference is the plain copy it must equal (tests/cuda/kernels_test.cpp builds it).
//
// Every row is written once, straight from its source buffer to its place in the destination's buffer: the layout
// (source-major in each destination) follows from the counts before the launch, so nothing needs a queue between
// the two. The kernel runs on config.num_sms blocks — the SM budget — so the rest of the device stays free for
// compute; the warps of the grid take the rows of all (source, destination) channels in turn (warp w: rows w,
// w + W, ...), so every warp of the budget moves data however the rows spread over the channels, each row with
// 16-byte loads and stores where it is aligned (copy_floats).
#include <cuda_runtime.h>

#include <algorithm>

#include <fmt/format.h>

#include "core/cuda_check.hpp"
#include "kernels/cuda/kernels.hpp"
#include "kernels/cuda/rows.cuh"

namespace duplex::cuda {

namespace {

using detail::copy_floats;

constexpr int kThreadsPerBlock = 1024;

struct Args {
    int num_ranks, dim;
    long long total_rows;
    const float* const* send;
    float* const* recv;
    const long long* first;     // [c], c = src * R + dst: the channel's first row in the numbering of all rows
    const long long* send_off;  // [c]: its first row in send[src]
    const long long* recv_off;  // [c]: its first row in recv[dst]
};

__global__ void __launch_bounds__(kThreadsPerBlock) exchange_kernel(Args a) {
    int lane = threadIdx.x % 32;
    long long warps = (long long)gridDim.x * (blockDim.x / 32);
    int channels = a.num_ranks * a.num_ranks;
    for (long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; row < a.total_rows; row += warps) {
        // Its channel: the last c with first[c] <= row (an empty channel shares its first with the next one).
        int lo = 0, hi = channels - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (a.first[mid] <= row)
                lo = mid;
            else
                hi = mid - 1;
        }
        long long k = row - a.first[lo];
        copy_floats(a.recv[lo % a.num_ranks] + (a.recv_off[lo] + k) * a.dim,
                    a.send[lo / a.num_ranks] + (a.send_off[lo] + k) * a.dim, a.dim, lane);
    }
}

// The ceiling the exchange is measured against: a plain copy of n4 float4s by the same grid, every thread with
// four 16-byte loads in flight.
__global__ void __launch_bounds__(kThreadsPerBlock) plain_copy_kernel(float4* to, const float4* from, long long n4) {
    detail::strided_map4(to, from, n4, (long long)blockIdx.x * blockDim.x + threadIdx.x, (long long)gridDim.x * blockDim.x,
                         [](float4 v) { return v; });
}

}  // namespace

void plain_copy(void* to, const void* from, size_t bytes, int num_sms, cudaStream_t stream) {
    int sms = detail::current_device_sms();
    DUPLEX_CHECK_ARG(num_sms >= 1 && num_sms <= sms, "plain copy: SM budget", "{} SMs requested, the device has {}",
                     num_sms, sms);
    DUPLEX_CHECK_ARG(reinterpret_cast<uintptr_t>(to) % 16 == 0 && reinterpret_cast<uintptr_t>(from) % 16 == 0 &&
                         bytes % 16 == 0,
                     "plain copy", "needs 16-byte aligned buffers and a multiple of 16 bytes, got {}", bytes);
    long long n4 = (long long)(bytes / 16);
    if (n4 > 0)
        plain_copy_kernel<<<num_sms, kThreadsPerBlock, 0, stream>>>(static_cast<float4*>(to),
                                                                     static_cast<const float4*>(from), n4);
    DUPLEX_CUDA_CHECK(cudaGetLastError());
}

double copy_ceiling_seconds(size_t bytes, int num_sms, int repeats, cudaStream_t stream) {
    DUPLEX_CHECK_ARG(repeats >= 1, "copy ceiling", "repeats must be positive, got {}", repeats);
    size_t n4 = (bytes + 15) / 16;
    using detail::Arena;
    Arena arena(2 * Arena::size_of<float4>(n4), stream);
    auto* from = arena.take<float4>(n4);
    auto* to = arena.take<float4>(n4);
    DUPLEX_CUDA_CHECK(cudaMemsetAsync(from, 0, n4 * sizeof(float4), stream));
    double best = 1e30;
    int no_error = 0;
    for (int r = 0; r < repeats; ++r)
        best = std::min(best, detail::timed_launch(stream, nullptr, no_error,
                                                   [&] { plain_copy(to, from, n4 * 16, num_sms, stream); }));
    return best;
}

void check_exchange(int num_ranks, const std::vector<std::vector<int64_t>>& send_counts,
                    const std::vector<int64_t>& recv_capacity_rows, int dim, const ExchangeConfig& c, int device_sms) {
    DUPLEX_CHECK_ARG(num_ranks >= 1, "exchange", "needs at least one rank, got {}", num_ranks);
    DUPLEX_CHECK_ARG(c.num_sms >= 1 && c.num_sms <= device_sms, "exchange: SM budget",
                     "{} SMs requested, the device has {}", c.num_sms, device_sms);
    DUPLEX_CHECK_ARG(c.relay_rows >= 0, "exchange: relay rows", "must be 0 (all) or positive, got {}", c.relay_rows);
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
    check_exchange(R, send_counts, recv_capacity_rows, dim, c, detail::current_device_sms());
    DUPLEX_CHECK_ARG(int(recv.size()) == R && int(send_offsets.size()) == R, "exchange", "{} send, {} receive buffers, {} "
                     "offset lists", R, recv.size(), send_offsets.size());
    std::vector<long long> off(size_t(R) * R), first(off.size()), roff(off.size());
    for (int dst = 0; dst < R; ++dst) {
        long long at = 0;
        for (int src = 0; src < R; ++src) {
            DUPLEX_CHECK_ARG(int(send_offsets[src].size()) == R && send_offsets[src][dst] >= 0, "exchange",
                             "rank {} has a bad send offset for rank {}", src, dst);
            off[size_t(src) * R + dst] = send_offsets[src][dst];
            roff[size_t(src) * R + dst] = at;
            at += send_counts[src][dst];
        }
    }
    long long total = 0;
    for (size_t c = 0; c < first.size(); ++c) {
        first[c] = total;
        total += send_counts[c / R][c % R];
    }
    size_t channels = size_t(R) * R;
    // One allocation for the tables.
    using detail::Arena;
    Arena arena(2 * Arena::size_of<void*>(R) + 3 * Arena::size_of<long long>(channels), stream);
    Args a{};
    a.num_ranks = R;
    a.dim = dim;
    a.total_rows = total;
    auto* d_send = arena.take<const float*>(R);
    auto* d_recv = arena.take<float*>(R);
    auto* d_first = arena.take<long long>(channels);
    auto* d_off = arena.take<long long>(channels);
    auto* d_roff = arena.take<long long>(channels);
    a.send = d_send;
    a.recv = d_recv;
    a.first = d_first;
    a.send_off = d_off;
    a.recv_off = d_roff;
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_send, send.data(), sizeof(void*) * R, cudaMemcpyHostToDevice, stream));
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_recv, recv.data(), sizeof(void*) * R, cudaMemcpyHostToDevice, stream));
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_first, first.data(), sizeof(long long) * channels, cudaMemcpyHostToDevice, stream));
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_off, off.data(), sizeof(long long) * channels, cudaMemcpyHostToDevice, stream));
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_roff, roff.data(), sizeof(long long) * channels, cudaMemcpyHostToDevice, stream));
    int no_error = 0;  // the copy cannot stall
    return detail::timed_launch(stream, nullptr, no_error, [&] {
        if (total > 0) exchange_kernel<<<c.num_sms, kThreadsPerBlock, 0, stream>>>(a);
    });
}

}  // namespace duplex::cuda
