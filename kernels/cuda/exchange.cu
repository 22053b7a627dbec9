// The all-to-all of expert dispatch and combine between "virtual ranks" whose buffers share one device. The CPU
// reference is the plain copy it must equal (tests/cuda/kernels_test.cpp builds it).
//
// Every row is written once, straight from its source buffer to its place in the destination's buffer: the layout
// (source-major in each destination for exchange_rows; any, given as segments, for exchange_segments) is known
// before the launch, so nothing needs a queue between the two. The kernel runs on config.num_sms blocks — the SM
// budget — so the rest of the device stays free for compute; the warps of the grid take the rows of all segments
// in turn (warp w: rows w, w + W, ...), so every warp of the budget moves data however the rows spread over the
// segments, each row with 16-byte loads and stores where it is aligned (copy_bytes).
#include <cuda_runtime.h>

#include <algorithm>

#include <fmt/format.h>

#include "core/cuda_check.hpp"
#include "kernels/cuda/kernels.hpp"
#include "kernels/cuda/rows.cuh"

namespace duplex::cuda {

namespace {

constexpr int kThreadsPerBlock = 1024;

struct Args {
    int num_segments, dim;
    long long total_rows;
    const float* const* send;
    float* const* recv;
    const long long* first;     // [k]: segment k's first row in the numbering of all rows (ascending)
    const int* src;             // [k]: its source rank
    const int* dst;             // [k]: its destination rank
    const long long* send_off;  // [k]: its first row in send[src]
    const long long* recv_off;  // [k]: its first row in recv[dst]
};

__global__ void __launch_bounds__(kThreadsPerBlock) exchange_kernel(Args a) {
    int lane = threadIdx.x % 32;
    long long warps = (long long)gridDim.x * (blockDim.x / 32);
    for (long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; row < a.total_rows; row += warps) {
        // Its segment: the last k with first[k] <= row.
        int lo = 0, hi = a.num_segments - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (a.first[mid] <= row)
                lo = mid;
            else
                hi = mid - 1;
        }
        long long k = row - a.first[lo];
        detail::copy_bytes(a.recv[a.dst[lo]] + (a.recv_off[lo] + k) * a.dim, a.send[a.src[lo]] + (a.send_off[lo] + k) * a.dim,
                           a.dim * (long long)sizeof(float), lane);
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
    for (int r = 0; r < repeats; ++r)
        best = std::min(best, detail::timed_launch(stream, [&] { plain_copy(to, from, n4 * 16, num_sms, stream); }));
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

double exchange_segments(const std::vector<const float*>& send, const std::vector<float*>& recv,
                         const std::vector<RowSegment>& segments, const std::vector<int64_t>& recv_capacity_rows,
                         int dim, const ExchangeConfig& c, cudaStream_t stream) {
    const int R = int(send.size());
    DUPLEX_CHECK_ARG(R >= 1 && int(recv.size()) == R && int(recv_capacity_rows.size()) == R, "exchange",
                     "{} send buffers, {} receive buffers, {} capacities", R, recv.size(), recv_capacity_rows.size());
    DUPLEX_CHECK_ARG(dim >= 1, "exchange", "row width must be positive, got {}", dim);
    std::vector<long long> first, send_off, recv_off;
    std::vector<int> src, dst;
    long long total = 0;
    for (size_t k = 0; k < segments.size(); ++k) {
        const RowSegment& g = segments[k];
        DUPLEX_CHECK_ARG(g.src >= 0 && g.src < R && g.dst >= 0 && g.dst < R && g.rows >= 0 && g.src_row >= 0 &&
                             g.dst_row >= 0,
                         "exchange", "segment {}: {} rows from rank {} row {} to rank {} row {}", k, g.rows, g.src,
                         g.src_row, g.dst, g.dst_row);
        DUPLEX_CHECK_ARG(g.dst_row + g.rows <= recv_capacity_rows[g.dst], "exchange: receive buffer",
                         "segment {} ends at row {} of rank {}, whose buffer holds {}", k, g.dst_row + g.rows, g.dst,
                         recv_capacity_rows[g.dst]);
        if (g.rows == 0) continue;
        first.push_back(total), src.push_back(g.src), dst.push_back(g.dst);
        send_off.push_back(g.src_row), recv_off.push_back(g.dst_row);
        total += g.rows;
    }
    int sms = detail::current_device_sms();
    DUPLEX_CHECK_ARG(c.num_sms >= 1 && c.num_sms <= sms, "exchange: SM budget", "{} SMs requested, the device has {}",
                     c.num_sms, sms);
    const size_t n = first.size();
    using detail::Arena;
    Arena arena(2 * Arena::size_of<void*>(R) + 3 * Arena::size_of<long long>(n) + 2 * Arena::size_of<int>(n), stream);
    Args a{};
    a.num_segments = int(n);
    a.dim = dim;
    a.total_rows = total;
    auto up = [&](auto* to, const auto& from) {
        if (!from.empty())
            DUPLEX_CUDA_CHECK(cudaMemcpyAsync(to, from.data(), sizeof(from[0]) * from.size(), cudaMemcpyHostToDevice, stream));
        return to;
    };
    a.send = up(arena.take<const float*>(R), send);
    a.recv = up(arena.take<float*>(R), recv);
    a.first = up(arena.take<long long>(n), first);
    a.src = up(arena.take<int>(n), src);
    a.dst = up(arena.take<int>(n), dst);
    a.send_off = up(arena.take<long long>(n), send_off);
    a.recv_off = up(arena.take<long long>(n), recv_off);
    return detail::timed_launch(stream, [&] {
        if (total > 0) exchange_kernel<<<c.num_sms, kThreadsPerBlock, 0, stream>>>(a);
    });
}

double exchange_rows(const std::vector<const float*>& send, const std::vector<std::vector<int64_t>>& send_offsets,
                     const std::vector<std::vector<int64_t>>& send_counts, const std::vector<float*>& recv,
                     const std::vector<int64_t>& recv_capacity_rows, int dim, const ExchangeConfig& c,
                     cudaStream_t stream) {
    int R = int(send.size());
    check_exchange(R, send_counts, recv_capacity_rows, dim, c, detail::current_device_sms());
    DUPLEX_CHECK_ARG(int(recv.size()) == R && int(send_offsets.size()) == R, "exchange", "{} send, {} receive buffers, {} "
                     "offset lists", R, recv.size(), send_offsets.size());
    // One segment per (source, destination), in that order; each destination receives source-major.
    std::vector<RowSegment> segments;
    segments.reserve(size_t(R) * R);
    std::vector<int64_t> at(R, 0);
    for (int src = 0; src < R; ++src)
        for (int dst = 0; dst < R; ++dst) {
            DUPLEX_CHECK_ARG(int(send_offsets[src].size()) == R && send_offsets[src][dst] >= 0, "exchange",
                             "rank {} has a bad send offset for rank {}", src, dst);
            segments.push_back({src, dst, send_offsets[src][dst], 0, send_counts[src][dst]});
        }
    for (int dst = 0; dst < R; ++dst)
        for (int src = 0; src < R; ++src) {
            RowSegment& g = segments[size_t(src) * R + dst];
            g.dst_row = at[dst];
            at[dst] += g.rows;
        }
    return exchange_segments(send, recv, segments, recv_capacity_rows, dim, c, stream);
}

}  // namespace duplex::cuda
