// Dispatch from the tokens and combine into them, flat or node-limited, between virtual ranks on one device. The
// host plans every row move from the routing masks (kernels/exchange_plan.hpp: output rows, each with its
// sources); two kernels run a plan's hops: copy_hop_kernel (dispatch: one source per output, every plane of the
// row) and reduce_hop_kernel (combine: the sum, from 0, of the sources in order, in fp32, rounded to the row
// type). In both, the warps of the SM budget take output rows in turn (warp w: outputs w, w + W, ...), so every
// warp moves data however the rows spread over the ranks, with 16-byte loads and stores where rows are aligned
// and several of them in flight per lane. The CPU references are the plain gather and
// kernels::combine_node_limited(_bf16) (tests/cuda/kernels_test.cpp); tests/kernels/exchange_plan_test.cpp runs
// the same plans through these loops on the CPU.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "core/cuda_check.hpp"
#include "kernels/cuda/kernels.hpp"
#include "kernels/cuda/rows.cuh"
#include "kernels/exchange_plan.hpp"

namespace duplex::cuda {

namespace {

using kernels::RowRef;

constexpr int kThreadsPerBlock = 1024;
constexpr int kMaxPlanes = 2;
constexpr int kElementsInFlight = 16;  // per lane and source in reduce_hop_kernel: four fp32 or two BF16 chunks

struct HopArgs {
    long long outputs = 0;
    const RowRef* to = nullptr;
    const int64_t* first = nullptr;  // outputs + 1
    const RowRef* from = nullptr;
    int planes = 1;
    char* const* buffers[kMaxPlanes] = {};  // per plane: the bases of the 2R + 1 buffers a RowRef names
    long long row_bytes[kMaxPlanes] = {};
    const float* const* weights = nullptr;  // reduce: per buffer, a factor per row (null: 1)
    int dim = 0;
    bool vector = false;  // reduce: every buffer 16-byte aligned and rows a whole number of 16 bytes
};

__device__ inline long long warp_index() { return (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; }
__device__ inline long long warp_count() { return (long long)gridDim.x * (blockDim.x / 32); }

// Dispatch: output i = its one source, plane by plane.
__global__ void __launch_bounds__(kThreadsPerBlock) copy_hop_kernel(HopArgs a) {
    int lane = threadIdx.x % 32;
    for (long long i = warp_index(); i < a.outputs; i += warp_count()) {
        RowRef to = a.to[i], from = a.from[a.first[i]];
#pragma unroll
        for (int p = 0; p < kMaxPlanes; ++p) {
            if (p >= a.planes) break;
            long long rb = a.row_bytes[p];
            detail::copy_bytes(a.buffers[p][to.buffer] + to.row * rb, a.buffers[p][from.buffer] + from.row * rb, rb,
                               lane);
        }
    }
}

// Row element types of the combine: fp32, and BF16 as its bit patterns (accumulated in fp32).
template <typename T>
struct Element;
template <>
struct Element<float> {
    static constexpr int kPer16 = 4;
    __device__ static float load(float v) { return v; }
    __device__ static float store(float v) { return v; }
};
template <>
struct Element<uint16_t> {
    static constexpr int kPer16 = 8;
    __device__ static float load(uint16_t h) { return __uint_as_float(unsigned(h) << 16); }
    __device__ static uint16_t store(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

// What a source adds: its value, times its row's weight where it has one (rounded, not fused with the add).
__device__ inline float term(bool weighted, float w, float x) { return weighted ? __fmul_rn(w, x) : x; }

// Combine: output i = sum, from 0, over its sources in order. Lanes take 16-byte chunks of the row (elements
// added one by one, as the scalar loop does, so both paths give the same bits), kElementsInFlight at a time.
template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock) reduce_hop_kernel(HopArgs a) {
    using E = Element<T>;
    constexpr int V = E::kPer16, U = kElementsInFlight / V;
    int lane = threadIdx.x % 32;
    for (long long i = warp_index(); i < a.outputs; i += warp_count()) {
        RowRef to = a.to[i];
        long long f0 = a.first[i], f1 = a.first[i + 1];
        T* out = reinterpret_cast<T*>(a.buffers[0][to.buffer]) + to.row * a.dim;
        __builtin_assume(__isGlobal(out));
        if (a.vector) {
            long long chunks = a.dim / V;
            for (long long c0 = lane; c0 < chunks; c0 += 32 * U) {
                float acc[U][V];
#pragma unroll
                for (int u = 0; u < U; ++u)
#pragma unroll
                    for (int e = 0; e < V; ++e) acc[u][e] = 0.0f;
                for (long long j = f0; j < f1; ++j) {
                    RowRef f = a.from[j];
                    const auto* row = reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(a.buffers[0][f.buffer]) +
                                                                     f.row * a.dim);
                    __builtin_assume(__isGlobal(row));
                    const float* weights = a.weights[f.buffer];
                    float w = weights ? weights[f.row] : 1.0f;
                    uint4 raw[U];
#pragma unroll
                    for (int u = 0; u < U; ++u)
                        if (c0 + u * 32 < chunks) raw[u] = row[c0 + u * 32];
#pragma unroll
                    for (int u = 0; u < U; ++u) {
                        if (c0 + u * 32 >= chunks) continue;
                        T v[V];
                        memcpy(v, &raw[u], 16);
#pragma unroll
                        for (int e = 0; e < V; ++e) acc[u][e] = __fadd_rn(acc[u][e], term(weights, w, E::load(v[e])));
                    }
                }
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    if (c0 + u * 32 >= chunks) continue;
                    T o[V];
#pragma unroll
                    for (int e = 0; e < V; ++e) o[e] = E::store(acc[u][e]);
                    uint4 packed;
                    memcpy(&packed, o, 16);
                    reinterpret_cast<uint4*>(out)[c0 + u * 32] = packed;
                }
            }
        } else {
            for (int c = lane; c < a.dim; c += 32) {
                float acc = 0.0f;
                for (long long j = f0; j < f1; ++j) {
                    RowRef f = a.from[j];
                    const T* row = reinterpret_cast<const T*>(a.buffers[0][f.buffer]) + f.row * a.dim;
                    const float* weights = a.weights[f.buffer];
                    acc = __fadd_rn(acc, term(weights, weights ? weights[f.row] : 1.0f, E::load(row[c])));
                }
                out[c] = E::store(acc);
            }
        }
    }
}

// The device copy of a plan's hops and buffer tables, and the relay rows, in one stream-ordered allocation.
// planes[p]: the 2R host bases of plane p (sources, then targets); weights: R factors tables or none.
class DevicePlan {
public:
    DevicePlan(const kernels::NodeLimitedPlan& plan, const std::vector<std::vector<char*>>& planes,
               const std::vector<size_t>& row_bytes, const std::vector<const float*>& weights, cudaStream_t stream)
        : arena_(bytes(plan, planes.size(), row_bytes), stream) {
        using detail::Arena;
        const size_t R = size_t(plan.ranks), B = 2 * R + 1;
        auto up = [&](void* to, const void* from, size_t n) {
            if (n) DUPLEX_CUDA_CHECK(cudaMemcpyAsync(to, from, n, cudaMemcpyHostToDevice, stream));
        };
        for (size_t p = 0; p < planes.size(); ++p) {
            std::vector<char*> table = planes[p];
            table.push_back(arena_.take<char>(size_t(plan.relay_rows) * row_bytes[p]));
            aligned_ = aligned_ && row_bytes[p] % 16 == 0;
            for (char* b : table) aligned_ = aligned_ && reinterpret_cast<uintptr_t>(b) % 16 == 0;
            tables_.push_back(arena_.take<char*>(B));
            up(tables_.back(), table.data(), B * sizeof(char*));
        }
        std::vector<const float*> w(B, nullptr);
        std::copy(weights.begin(), weights.end(), w.begin());
        weights_ = arena_.take<const float*>(B);
        up(weights_, w.data(), B * sizeof(float*));
        for (const kernels::PlanRound& round : plan.rounds)
            for (const kernels::Hop& hop : round.hops) {
                HopArgs a;
                a.outputs = hop.outputs();
                auto* to = arena_.take<RowRef>(hop.to.size());
                auto* first = arena_.take<int64_t>(hop.first.size());
                auto* from = arena_.take<RowRef>(hop.from.size());
                up(to, hop.to.data(), hop.to.size() * sizeof(RowRef));
                up(first, hop.first.data(), hop.first.size() * sizeof(int64_t));
                up(from, hop.from.data(), hop.from.size() * sizeof(RowRef));
                a.to = to, a.first = first, a.from = from;
                a.planes = int(planes.size());
                for (size_t p = 0; p < planes.size(); ++p) a.buffers[p] = tables_[p], a.row_bytes[p] = (long long)row_bytes[p];
                a.weights = weights_;
                hops_.push_back(a);
            }
    }
    // The hops in order, each with its tables (the caller sets dim and vector for a reduce).
    const std::vector<HopArgs>& hops() const { return hops_; }
    // Every buffer 16-byte aligned and every plane's rows a whole number of 16 bytes.
    bool aligned() const { return aligned_; }

private:
    static size_t bytes(const kernels::NodeLimitedPlan& plan, size_t planes, const std::vector<size_t>& row_bytes) {
        using detail::Arena;
        const size_t B = 2 * size_t(plan.ranks) + 1;
        size_t n = (planes + 1) * Arena::size_of<char*>(B);
        for (size_t p = 0; p < planes; ++p) n += Arena::size_of<char>(size_t(plan.relay_rows) * row_bytes[p]);
        for (const kernels::PlanRound& round : plan.rounds)
            for (const kernels::Hop& hop : round.hops)
                n += Arena::size_of<RowRef>(hop.to.size()) + Arena::size_of<int64_t>(hop.first.size()) +
                     Arena::size_of<RowRef>(hop.from.size());
        return n;
    }
    detail::Arena arena_;
    std::vector<char**> tables_;
    const float** weights_ = nullptr;
    std::vector<HopArgs> hops_;
    bool aligned_ = true;
};

}  // namespace

const char* row_type_name(RowType type) {
    switch (type) {
        case RowType::F32: return "f32";
        case RowType::BF16: return "bf16";
        case RowType::FP8: return "fp8";
    }
    return "?";
}

RowType parse_row_type(const std::string& name, const std::string& flag) {
    for (RowType t : {RowType::F32, RowType::BF16, RowType::FP8})
        if (name == row_type_name(t)) return t;
    throw ConfigError(flag, fmt::format("rows are f32, bf16 or fp8, not '{}'", name));
}

std::vector<size_t> row_plane_bytes(RowType type, int dim) {
    DUPLEX_CHECK_ARG(dim >= 1, "exchange", "row width must be positive, got {}", dim);
    switch (type) {
        case RowType::F32: return {size_t(dim) * 4};
        case RowType::BF16: return {size_t(dim) * 2};
        case RowType::FP8:
            DUPLEX_CHECK_ARG(dim % 128 == 0, "exchange: fp8 rows",
                             "width {} is not a multiple of 128 (one scale per 1x128 block)", dim);
            return {size_t(dim), size_t(dim) / 128 * 4};
    }
    throw ConfigError("exchange", "unknown row type");
}

std::vector<int64_t> check_node_limited(RowType type, int dim, const std::vector<std::vector<uint64_t>>& masks,
                                        int nodes, const std::vector<int64_t>& capacity_rows, size_t planes,
                                        const ExchangeConfig& c, int device_sms) {
    std::vector<size_t> bytes = row_plane_bytes(type, dim);
    DUPLEX_CHECK_ARG(planes == bytes.size(), "exchange", "{} rows travel as {} plane(s), got {}", row_type_name(type),
                     bytes.size(), planes);
    DUPLEX_CHECK_ARG(c.num_sms >= 1 && c.num_sms <= device_sms, "exchange: SM budget",
                     "{} SMs requested, the device has {}", c.num_sms, device_sms);
    DUPLEX_CHECK_ARG(c.relay_rows >= 0, "exchange: relay rows", "must be 0 (all) or positive, got {}", c.relay_rows);
    std::vector<int64_t> rows = kernels::node_limited_rows(masks, nodes, c.relay_rows);
    DUPLEX_CHECK_ARG(capacity_rows.size() == rows.size(), "exchange", "buffer sizes for {} ranks, expected {}",
                     capacity_rows.size(), rows.size());
    for (size_t d = 0; d < rows.size(); ++d)
        DUPLEX_CHECK_ARG(rows[d] <= capacity_rows[d], "exchange: buffer",
                         "rank {} exchanges {} rows with the experts but its buffer holds {}", d, rows[d],
                         capacity_rows[d]);
    return rows;
}

NodeLimitedResult dispatch_rows_node_limited(RowType type, int dim, const SourcePlanes& x,
                                              const std::vector<std::vector<uint64_t>>& masks, int nodes,
                                              const TargetPlanes& recv, const std::vector<int64_t>& recv_capacity_rows,
                                              const ExchangeConfig& c, cudaStream_t stream) {
    check_node_limited(type, dim, masks, nodes, recv_capacity_rows, x.size(), c, detail::current_device_sms());
    const size_t R = masks.size();
    DUPLEX_CHECK_ARG(recv.size() == x.size(), "dispatch", "{} source planes, {} target planes", x.size(), recv.size());
    std::vector<std::vector<char*>> planes(x.size());
    for (size_t p = 0; p < x.size(); ++p) {
        DUPLEX_CHECK_ARG(x[p].size() == R && recv[p].size() == R, "dispatch",
                         "plane {}: {} inputs and {} receive buffers for {} ranks", p, x[p].size(), recv[p].size(), R);
        for (const void* b : x[p]) planes[p].push_back(const_cast<char*>(static_cast<const char*>(b)));  // read only
        for (void* b : recv[p]) planes[p].push_back(static_cast<char*>(b));
    }
    kernels::NodeLimitedPlan plan = kernels::plan_node_limited_dispatch(masks, nodes, c.relay_rows);
    DevicePlan dev(plan, planes, row_plane_bytes(type, dim), {}, stream);
    NodeLimitedResult result{0, plan.inter_node_rows, plan.flat_inter_node_rows};
    result.seconds = detail::timed_launch(stream, [&] {
        for (const HopArgs& a : dev.hops())
            if (a.outputs > 0) copy_hop_kernel<<<c.num_sms, kThreadsPerBlock, 0, stream>>>(a);
    });
    return result;
}

NodeLimitedResult combine_rows_node_limited(RowType type, int dim, const std::vector<const void*>& in,
                                             const std::vector<const float*>& weights,
                                             const std::vector<std::vector<uint64_t>>& masks, int nodes,
                                             const std::vector<int64_t>& in_capacity_rows, const std::vector<void*>& y,
                                             const ExchangeConfig& c, cudaStream_t stream) {
    DUPLEX_CHECK_ARG(type == RowType::F32 || type == RowType::BF16, "combine",
                     "rows are f32 or bf16, not {} (FP8 dispatch, BF16 combine)", row_type_name(type));
    check_node_limited(type, dim, masks, nodes, in_capacity_rows, 1, c, detail::current_device_sms());
    const size_t R = masks.size();
    DUPLEX_CHECK_ARG(in.size() == R && y.size() == R && (weights.empty() || weights.size() == R), "combine",
                     "{} inputs, {} weights and {} outputs for {} ranks", in.size(), weights.size(), y.size(), R);
    std::vector<std::vector<char*>> planes(1);
    for (const void* b : in) planes[0].push_back(const_cast<char*>(static_cast<const char*>(b)));  // read only
    for (void* b : y) planes[0].push_back(static_cast<char*>(b));
    kernels::NodeLimitedPlan plan = kernels::plan_node_limited_combine(masks, nodes, c.relay_rows);
    DevicePlan dev(plan, planes, row_plane_bytes(type, dim), weights, stream);
    NodeLimitedResult result{0, plan.inter_node_rows, plan.flat_inter_node_rows};
    result.seconds = detail::timed_launch(stream, [&] {
        for (HopArgs a : dev.hops()) {
            if (a.outputs == 0) continue;
            a.dim = dim;
            a.vector = dev.aligned();
            if (type == RowType::F32)
                reduce_hop_kernel<float><<<c.num_sms, kThreadsPerBlock, 0, stream>>>(a);
            else
                reduce_hop_kernel<uint16_t><<<c.num_sms, kThreadsPerBlock, 0, stream>>>(a);
        }
    });
    return result;
}

}  // namespace duplex::cuda
