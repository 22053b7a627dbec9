// The node-limited dispatch with forwarder warps (DeepSeek-V3's two hops: across nodes once per node, then
// inside the node), between virtual ranks on one device. The CPU reference is the plain gather it must equal
// (tests/cuda/kernels_test.cpp).
//
// Pipeline (s, m) — rank s's tokens for node m — owns one inter-node queue (chunks of rows plus, per row, the
// bit mask of the node's ranks it is for) and the intra-node queues (s, d) of the ranks d of node m (rows).
// Its warps live in one block: sender, forwarder and the L receivers, so every queue's two ends are resident
// together and the queues cannot deadlock however small they are. Each queue has one producer and one
// consumer; counters are monotonic (head: written, tail: consumed).
#include <cuda_runtime.h>

#include <algorithm>

#include <fmt/format.h>

#include "core/cuda_check.hpp"
#include "kernels/cuda/kernels.hpp"
#include "kernels/cuda/queue.cuh"

namespace duplex::cuda {

namespace {

using detail::copy_floats;
using detail::scale_floats;
using detail::Counter;
using detail::publish;

struct HArgs {
    int R, L, N, dim, rpc, qc, Q, slots;
    const float* const* x;
    const unsigned long long* const* masks;
    const long long* tokens;    // [R]
    float* const* recv;
    const long long* pipe_rows;  // [R * N]: rows through pipeline (s, m)
    const long long* count;      // [R * R]: rows from s to d
    const long long* recv_off;   // [R * R]: first row in recv[d] of the rows from s
    float* inter;                // per pipeline: qc * rpc * dim floats
    unsigned* meta;              // per pipeline: qc * rpc local masks
    float* intra;                // per (s, d): Q * dim floats
    long long *inter_head, *inter_tail, *intra_head, *intra_tail;  // 32 apart (own cache line)
    int* error;
    long long timeout_cycles;
};

__device__ bool stalled(const HArgs& a, long long start, int channel) {
    return detail::stalled(a.error, a.timeout_cycles, start, channel);
}

__host__ __device__ inline unsigned long long local_bits(int L) { return L >= 64 ? ~0ull : (1ull << L) - 1; }

// x[s] -> inter-node queue of (s, m): each token with a rank on node m, once.
__device__ void h_send(const HArgs& a, int s, int m, int lane) {
    int pipe = s * a.N + m;
    long long total = a.pipe_rows[pipe];
    if (total == 0) return;
    float* queue = a.inter + (long long)pipe * a.qc * a.rpc * a.dim;
    unsigned* meta = a.meta + (long long)pipe * a.qc * a.rpc;
    Counter head(a.inter_head[pipe * 32]), tail(a.inter_tail[pipe * 32]);
    const float* x = a.x[s];
    const unsigned long long* masks = a.masks[s];
    long long row = 0;
    for (long long t = 0; t < a.tokens[s] && row < total; ++t) {
        unsigned long long here = (masks[t] >> (m * a.L)) & local_bits(a.L);
        if (here == 0) continue;
        long long chunk = row / a.rpc;
        int in = int(row % a.rpc);
        if (in == 0) {
            long long start = clock64();
            while (chunk - tail.load(::cuda::memory_order_acquire) >= a.qc)
                if (stalled(a, start, pipe)) return;
        }
        long long at = (chunk % a.qc) * a.rpc + in;
        copy_floats(queue + at * a.dim, x + t * a.dim, a.dim, lane);
        if (lane == 0) meta[at] = unsigned(here);
        ++row;
        if (row % a.rpc == 0 || row == total) publish(head, chunk + 1, lane);
    }
}

// Inter-node queue of (s, m) -> intra-node queues (s, d) of the ranks the rows are for.
__device__ void h_forward(const HArgs& a, int s, int m, int lane) {
    int pipe = s * a.N + m;
    long long total = a.pipe_rows[pipe];
    long long chunks = (total + a.rpc - 1) / a.rpc;
    const float* queue = a.inter + (long long)pipe * a.qc * a.rpc * a.dim;
    const unsigned* meta = a.meta + (long long)pipe * a.qc * a.rpc;
    Counter head(a.inter_head[pipe * 32]), tail(a.inter_tail[pipe * 32]);
    for (long long i = 0; i < chunks; ++i) {
        long long start = clock64();
        while (head.load(::cuda::memory_order_acquire) <= i)
            if (stalled(a, start, pipe)) return;
        int rows = int(min((long long)a.rpc, total - i * a.rpc));
        long long base = (i % a.qc) * a.rpc;
        for (int ld = 0; ld < a.L; ++ld) {
            int cnt = 0;
            for (int j = 0; j < rows; ++j) cnt += (meta[base + j] >> ld) & 1u;
            if (cnt == 0) continue;
            int ch = s * a.R + m * a.L + ld;
            Counter ihead(a.intra_head[ch * 32]), itail(a.intra_tail[ch * 32]);
            long long h = ihead.load(::cuda::memory_order_relaxed);  // this warp is its only writer
            long long wait_start = clock64();
            while (h + cnt - itail.load(::cuda::memory_order_acquire) > a.Q)
                if (stalled(a, wait_start, a.R * a.N + ch)) return;
            float* iq = a.intra + (long long)ch * a.Q * a.dim;
            long long put = h;
            for (int j = 0; j < rows; ++j)
                if ((meta[base + j] >> ld) & 1u) {
                    copy_floats(iq + (put % a.Q) * a.dim, queue + (base + j) * a.dim, a.dim, lane);
                    ++put;
                }
            publish(ihead, put, lane);
        }
        publish(tail, i + 1, lane);
    }
}

// Intra-node queue (s, d) -> recv[d], after the rows of ranks below s.
__device__ void h_receive(const HArgs& a, int s, int d, int lane) {
    int ch = s * a.R + d;
    long long total = a.count[ch];
    float* dst = a.recv[d] + a.recv_off[ch] * a.dim;
    const float* iq = a.intra + (long long)ch * a.Q * a.dim;
    Counter ihead(a.intra_head[ch * 32]), itail(a.intra_tail[ch * 32]);
    long long got = 0;
    while (got < total) {
        long long start = clock64(), h;
        while ((h = ihead.load(::cuda::memory_order_acquire)) <= got)
            if (stalled(a, start, a.R * a.N + ch)) return;
        for (long long r = got; r < h; ++r) copy_floats(dst + r * a.dim, iq + (r % a.Q) * a.dim, a.dim, lane);
        publish(itail, h, lane);
        got = h;
    }
}

// The warps of a block: `slots` of role 0, then `slots` of role 1, then `slots` groups of L of role 2; each slot
// walks the pipelines blockIdx.x, + gridDim.x, ... and calls run(role, s, m, local index) for each.
template <typename Run>
__device__ void for_each_pipeline(int slots, int R, int N, int L, Run&& run) {
    int warp = threadIdx.x / 32, W = slots;
    int role = warp < W ? 0 : warp < 2 * W ? 1 : 2;
    int slot = role == 0 ? warp : role == 1 ? warp - W : (warp - 2 * W) / L;
    int local = role == 2 ? (warp - 2 * W) % L : 0;
    for (int j = slot;; j += W) {
        int pipe = blockIdx.x + j * gridDim.x;
        if (pipe >= R * N) break;
        run(role, pipe / N, pipe % N, local);
    }
}

__global__ void hierarchical_kernel(HArgs a) {
    int lane = threadIdx.x % 32;
    for_each_pipeline(a.slots, a.R, a.N, a.L, [&](int role, int s, int m, int local) {
        if (role == 0)
            h_send(a, s, m, lane);
        else if (role == 1)
            h_forward(a, s, m, lane);
        else
            h_receive(a, s, m * a.L + local, lane);
    });
}

// ---- combine: the same pipelines run back ----
// Pipeline (s, m) now starts on the experts' side: a sender per rank d of node m (in[d]'s rows for s, times their
// weights -> intra-node queue (s, d)), the forwarder (one row from each queue a token used, summed in rank order
// -> the inter-node queue of (s, m)) and a receiver (that queue -> the pipeline's rows of s's staging buffer).
// Here intra-node counters count rows and inter-node counters chunks, as in the dispatch.
struct CArgs {
    int R, L, N, dim, rpc, qc, Q, slots;
    const float* const* in;
    const float* const* weights;  // per rank: one factor per row of in, or null (1)
    const unsigned long long* const* masks;
    const long long* tokens;     // [R]
    const long long* pipe_rows;  // [R * N]
    const long long* count;      // [R * R]: rows of in[d] for tokens of s
    const long long* in_off;     // [R * R]: the first of them
    const long long* stage_off;  // [R * N]: first staging row of pipeline (s, m)
    float* stage;
    float* inter;
    float* intra;
    long long *inter_head, *inter_tail, *intra_head, *intra_tail;
    int* error;
    long long timeout_cycles;
};

__device__ bool stalled(const CArgs& a, long long start, int channel) {
    return detail::stalled(a.error, a.timeout_cycles, start, channel);
}

// in[d] rows for s (times their weights) -> intra-node queue (s, d).
__device__ void c_send(const CArgs& a, int s, int d, int lane) {
    int ch = s * a.R + d;
    long long total = a.count[ch];
    const float* src = a.in[d] + a.in_off[ch] * a.dim;
    const float* w = a.weights[d] ? a.weights[d] + a.in_off[ch] : nullptr;
    float* iq = a.intra + (long long)ch * a.Q * a.dim;
    Counter head(a.intra_head[ch * 32]), tail(a.intra_tail[ch * 32]);
    for (long long r = 0; r < total; ++r) {
        if (r % a.rpc == 0) {
            long long need = r + min((long long)a.rpc, total - r) - a.Q, start = clock64();
            while (tail.load(::cuda::memory_order_acquire) < need)
                if (stalled(a, start, a.R * a.N + ch)) return;
        }
        float* to = iq + (r % a.Q) * a.dim;
        const float* from = src + r * a.dim;
        if (w) {
            scale_floats(to, from, w[r], a.dim, lane);
        } else {
            copy_floats(to, from, a.dim, lane);
        }
        if ((r + 1) % a.rpc == 0 || r + 1 == total) publish(head, r + 1, lane);
    }
}

// Per token of s that used node m: its rows from the node's ranks, summed in rank order -> inter-node queue.
__device__ void c_forward(const CArgs& a, int s, int m, int lane) {
    int pipe = s * a.N + m;
    long long total = a.pipe_rows[pipe];
    if (total == 0) return;
    float* queue = a.inter + (long long)pipe * a.qc * a.rpc * a.dim;
    Counter head(a.inter_head[pipe * 32]), tail(a.inter_tail[pipe * 32]);
    long long got[30];
    for (int ld = 0; ld < a.L; ++ld) got[ld] = 0;
    const unsigned long long* masks = a.masks[s];
    long long row = 0;
    for (long long t = 0; t < a.tokens[s] && row < total; ++t) {
        unsigned long long here = (masks[t] >> (m * a.L)) & local_bits(a.L);
        if (here == 0) continue;
        for (int ld = 0; ld < a.L; ++ld) {
            if (!((here >> ld) & 1)) continue;
            int ch = s * a.R + m * a.L + ld;
            Counter ihead(a.intra_head[ch * 32]);
            long long start = clock64();
            while (ihead.load(::cuda::memory_order_acquire) <= got[ld])
                if (stalled(a, start, a.R * a.N + ch)) return;
        }
        long long chunk = row / a.rpc;
        if (row % a.rpc == 0) {
            long long start = clock64();
            while (chunk - tail.load(::cuda::memory_order_acquire) >= a.qc)
                if (stalled(a, start, pipe)) return;
        }
        float* out = queue + ((chunk % a.qc) * a.rpc + row % a.rpc) * a.dim;
        for (int c = lane; c < a.dim; c += 32) {
            float acc = 0.0f;
            for (int ld = 0; ld < a.L; ++ld)
                if ((here >> ld) & 1) {
                    int ch = s * a.R + m * a.L + ld;
                    acc = __fadd_rn(acc, a.intra[((long long)ch * a.Q + got[ld] % a.Q) * a.dim + c]);
                }
            out[c] = acc;
        }
        // Give back the rows read (a chunk at a time: the sender waits for whole chunks).
        for (int ld = 0; ld < a.L; ++ld) {
            if (!((here >> ld) & 1)) continue;
            int ch = s * a.R + m * a.L + ld;
            ++got[ld];
            if (got[ld] % a.rpc == 0 || got[ld] == a.count[ch]) {
                Counter itail(a.intra_tail[ch * 32]);
                publish(itail, got[ld], lane);
            }
        }
        ++row;
        if (row % a.rpc == 0 || row == total) publish(head, chunk + 1, lane);
    }
}

// Inter-node queue of (s, m) -> staging rows of s.
__device__ void c_receive(const CArgs& a, int s, int m, int lane) {
    int pipe = s * a.N + m;
    const float* queue = a.inter + (long long)pipe * a.qc * a.rpc * a.dim;
    float* dst = a.stage + a.stage_off[pipe] * a.dim;
    Counter head(a.inter_head[pipe * 32]), tail(a.inter_tail[pipe * 32]);
    detail::drain_chunks(head, tail, queue, dst, a.pipe_rows[pipe], a.rpc, a.qc, a.dim, lane,
                         [&](long long start) { return stalled(a, start, pipe); });
}

__global__ void hierarchical_combine_kernel(CArgs a) {
    int lane = threadIdx.x % 32;
    for_each_pipeline(a.slots, a.R, a.N, a.L, [&](int role, int s, int m, int local) {
        if (role == 0)
            c_forward(a, s, m, lane);
        else if (role == 1)
            c_receive(a, s, m, lane);
        else
            c_send(a, s, m * a.L + local, lane);
    });
}

// y of token g (all ranks' tokens in a row) = sum, from 0, of its staging rows part[begin[g] .. begin[g + 1]) —
// one per node it used, in node order. One warp per token.
__global__ void node_sum_kernel(const float* stage, const long long* part, const long long* begin,
                                float* const* y_rows, long long tokens, int dim) {
    long long g = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (g >= tokens) return;
    float* y = y_rows[g];
    for (int c = lane; c < dim; c += 32) {
        float acc = 0.0f;
        for (long long i = begin[g]; i < begin[g + 1]; ++i) acc = __fadd_rn(acc, stage[part[i] * dim + c]);
        y[c] = acc;
    }
}

// What both directions compute on the host from the masks: per rank its tokens, per pipeline (s, m) its rows,
// per (s, d) the rows of s's tokens for d and their first row in d's buffer (source-major), and the crossings.
struct Tables {
    std::vector<long long> tokens, pipe_rows, count, offset;
    HierarchicalResult crossings;
};

Tables pipeline_tables(const std::vector<std::vector<uint64_t>>& masks, int N) {
    const int R = int(masks.size()), L = R / N;
    Tables t;
    t.tokens.resize(R);
    t.pipe_rows.assign(size_t(R) * N, 0);
    t.count.assign(size_t(R) * R, 0);
    t.offset.assign(size_t(R) * R, 0);
    for (int s = 0; s < R; ++s) {
        t.tokens[s] = (long long)masks[s].size();
        for (uint64_t mk : masks[s]) {
            for (int m = 0; m < N; ++m) {
                uint64_t here = (mk >> (m * L)) & local_bits(L);
                if (!here) continue;
                ++t.pipe_rows[size_t(s) * N + m];
                if (m != s / L) {
                    ++t.crossings.inter_node_rows;
                    t.crossings.flat_inter_node_rows += __builtin_popcountll(here);
                }
            }
            for (int d = 0; d < R; ++d) t.count[size_t(s) * R + d] += (mk >> d) & 1u;
        }
    }
    for (int d = 0; d < R; ++d) {
        long long at = 0;
        for (int s = 0; s < R; ++s) t.offset[size_t(s) * R + d] = at, at += t.count[size_t(s) * R + d];
    }
    return t;
}

// The current device's SM count and clock (kHz, for the stall timeout in cycles).
void device_limits(int& sms, int& clock_khz) {
    int device = 0;
    sms = detail::current_device_sms();
    DUPLEX_CUDA_CHECK(cudaGetDevice(&device));
    DUPLEX_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device));
}

// Every rank's masks back to back in `all` (device); returns each rank's first.
std::vector<const unsigned long long*> upload_masks(const std::vector<std::vector<uint64_t>>& masks,
                                                    unsigned long long* all, cudaStream_t stream) {
    std::vector<const unsigned long long*> first(masks.size());
    size_t at = 0;
    for (size_t s = 0; s < masks.size(); ++s) {
        first[s] = all + at;
        if (!masks[s].empty())
            DUPLEX_CUDA_CHECK(cudaMemcpyAsync(all + at, masks[s].data(), sizeof(uint64_t) * masks[s].size(),
                                              cudaMemcpyHostToDevice, stream));
        at += masks[s].size();
    }
    return first;
}

}  // namespace

std::vector<int64_t> check_hierarchical_dispatch(const std::vector<std::vector<uint64_t>>& masks, int nodes,
                                                 const std::vector<int64_t>& recv_capacity_rows, int dim,
                                                 const ExchangeConfig& c, int device_sms) {
    int R = int(masks.size());
    DUPLEX_CHECK_ARG(R >= 1 && R <= 64, "hierarchical dispatch", "1..64 ranks (a 64-bit mask per token), got {}", R);
    DUPLEX_CHECK_ARG(nodes >= 1 && R % nodes == 0, "hierarchical dispatch: nodes",
                     "{} ranks do not split into {} nodes of equal size", R, nodes);
    DUPLEX_CHECK_ARG(R / nodes <= 30, "hierarchical dispatch: nodes",
                     "{} ranks per node; a pipeline's sender, forwarder and receivers share one block (at most 30)",
                     R / nodes);
    std::vector<std::vector<int64_t>> counts(R, std::vector<int64_t>(R, 0));
    for (int s = 0; s < R; ++s)
        for (size_t t = 0; t < masks[s].size(); ++t) {
            DUPLEX_CHECK_ARG(R == 64 || (masks[s][t] >> R) == 0, "hierarchical dispatch: routing",
                             "token {} of rank {} goes to a rank beyond the {} present", t, s, R);
            for (int d = 0; d < R; ++d) counts[s][d] += (masks[s][t] >> d) & 1u;
        }
    check_exchange(R, counts, recv_capacity_rows, dim, c, device_sms);
    std::vector<int64_t> rows(R, 0);
    for (int s = 0; s < R; ++s)
        for (int d = 0; d < R; ++d) rows[d] += counts[s][d];
    return rows;
}

HierarchicalResult dispatch_rows_hierarchical(const std::vector<const float*>& x,
                                              const std::vector<std::vector<uint64_t>>& masks, int nodes,
                                              const std::vector<float*>& recv,
                                              const std::vector<int64_t>& recv_capacity_rows, int dim,
                                              const ExchangeConfig& c, cudaStream_t stream) {
    int sms = 0, clock_khz = 0;
    device_limits(sms, clock_khz);
    check_hierarchical_dispatch(masks, nodes, recv_capacity_rows, dim, c, sms);
    const int R = int(masks.size()), N = nodes, L = R / nodes, P = R * N;
    DUPLEX_CHECK_ARG(int(x.size()) == R && int(recv.size()) == R, "hierarchical dispatch",
                     "{} inputs and {} receive buffers for {} ranks", x.size(), recv.size(), R);
    // Host tables: rows per pipeline and per (s, d), receive offsets source-major.
    Tables tab = pipeline_tables(masks, N);
    HierarchicalResult result = tab.crossings;
    const std::vector<long long>&tokens = tab.tokens, &pipe_rows = tab.pipe_rows, &count = tab.count,
                           &roff = tab.offset;
    HArgs a{};
    a.R = R, a.L = L, a.N = N, a.dim = dim, a.rpc = c.rows_per_chunk, a.qc = c.queue_chunks;
    a.Q = c.queue_chunks * c.rows_per_chunk;
    a.slots = std::max(1, std::min(32 / (2 + L), (P + c.num_sms - 1) / c.num_sms));
    size_t channels = size_t(R) * R, total_tokens = 0;
    for (long long t : tokens) total_tokens += size_t(t);
    using detail::Arena;
    Arena arena(2 * Arena::size_of<void*>(R) + Arena::size_of<void*>(R) + Arena::size_of<long long>(R) +
                Arena::size_of<long long>(P) + 2 * Arena::size_of<long long>(channels) +
                Arena::size_of<float>(size_t(P) * a.qc * a.rpc * dim) + Arena::size_of<unsigned>(size_t(P) * a.qc * a.rpc) +
                Arena::size_of<float>(channels * a.Q * dim) + 2 * Arena::size_of<long long>(32 * size_t(P)) +
                2 * Arena::size_of<long long>(32 * channels) + Arena::size_of<int>(1) +
                Arena::size_of<unsigned long long>(std::max<size_t>(total_tokens, 1)), stream);
    auto* d_x = arena.take<const float*>(R);
    auto* d_recv = arena.take<float*>(R);
    auto* d_masks = arena.take<const unsigned long long*>(R);
    auto* d_tokens = arena.take<long long>(R);
    auto* d_pipe = arena.take<long long>(P);
    auto* d_count = arena.take<long long>(channels);
    auto* d_roff = arena.take<long long>(channels);
    a.inter = arena.take<float>(size_t(P) * a.qc * a.rpc * dim);
    a.meta = arena.take<unsigned>(size_t(P) * a.qc * a.rpc);
    a.intra = arena.take<float>(channels * a.Q * dim);
    a.inter_head = arena.take<long long>(32 * size_t(P));
    a.inter_tail = arena.take<long long>(32 * size_t(P));
    a.intra_head = arena.take<long long>(32 * channels);
    a.intra_tail = arena.take<long long>(32 * channels);
    a.error = arena.take<int>(1);
    auto* d_all_masks = arena.take<unsigned long long>(std::max<size_t>(total_tokens, 1));
    std::vector<const unsigned long long*> mask_ptr = upload_masks(masks, d_all_masks, stream);
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_x, x.data(), sizeof(void*) * R, cudaMemcpyHostToDevice, stream));
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_recv, recv.data(), sizeof(void*) * R, cudaMemcpyHostToDevice, stream));
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_masks, mask_ptr.data(), sizeof(void*) * R, cudaMemcpyHostToDevice, stream));
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_tokens, tokens.data(), sizeof(long long) * R, cudaMemcpyHostToDevice, stream));
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_pipe, pipe_rows.data(), sizeof(long long) * P, cudaMemcpyHostToDevice, stream));
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_count, count.data(), sizeof(long long) * channels, cudaMemcpyHostToDevice, stream));
    DUPLEX_CUDA_CHECK(cudaMemcpyAsync(d_roff, roff.data(), sizeof(long long) * channels, cudaMemcpyHostToDevice, stream));
    for (long long* counter : {a.inter_head, a.inter_tail})
        DUPLEX_CUDA_CHECK(cudaMemsetAsync(counter, 0, 32 * sizeof(long long) * P, stream));
    for (long long* counter : {a.intra_head, a.intra_tail})
        DUPLEX_CUDA_CHECK(cudaMemsetAsync(counter, 0, 32 * sizeof(long long) * channels, stream));
    DUPLEX_CUDA_CHECK(cudaMemsetAsync(a.error, 0, sizeof(int), stream));
    a.x = d_x, a.recv = d_recv, a.masks = d_masks, a.tokens = d_tokens, a.pipe_rows = d_pipe, a.count = d_count;
    a.recv_off = d_roff;
    a.timeout_cycles = (long long)(c.timeout_s * clock_khz * 1e3);
    int error = 0;
    int threads = 32 * a.slots * (2 + L);
    result.seconds = detail::timed_launch(stream, a.error, error, [&] {
        hierarchical_kernel<<<c.num_sms, threads, 0, stream>>>(a);
    });
    if (error != 0) {
        int ch = error - 1;
        if (ch < P)
            throw CommError(fmt::format("hierarchical dispatch: the inter-node queue of rank {} to node {} stalled for {} s",
                                        ch / N, ch % N, c.timeout_s));
        ch -= P;
        throw CommError(fmt::format("hierarchical dispatch: the intra-node queue of rank {} to rank {} stalled for {} s",
                                    ch / R, ch % R, c.timeout_s));
    }
    return result;
}

}  // namespace duplex::cuda

namespace duplex::cuda {

HierarchicalResult combine_rows_hierarchical(const std::vector<const float*>& in,
                                             const std::vector<const float*>& weights,
                                             const std::vector<std::vector<uint64_t>>& masks, int nodes,
                                             const std::vector<int64_t>& in_capacity_rows,
                                             const std::vector<float*>& y, int dim, const ExchangeConfig& c,
                                             cudaStream_t stream) {
    int sms = 0, clock_khz = 0;
    device_limits(sms, clock_khz);
    check_hierarchical_dispatch(masks, nodes, in_capacity_rows, dim, c, sms);
    const int R = int(masks.size()), N = nodes, L = R / nodes, P = R * N;
    DUPLEX_CHECK_ARG(int(in.size()) == R && int(y.size()) == R && (weights.empty() || int(weights.size()) == R),
                     "hierarchical combine", "{} inputs, {} weights and {} outputs for {} ranks", in.size(),
                     weights.size(), y.size(), R);
    Tables tab = pipeline_tables(masks, N);
    HierarchicalResult result = tab.crossings;
    const std::vector<long long>&tokens = tab.tokens, &pipe_rows = tab.pipe_rows, &count = tab.count,
                           &in_off = tab.offset;
    std::vector<long long> stage_off(P, 0);
    long long stage_rows = 0;
    for (int p = 0; p < P; ++p) stage_off[p] = stage_rows, stage_rows += pipe_rows[p];
    // Per token (all ranks in a row): its staging rows, node order; and where its output goes.
    long long G = 0;
    for (long long t : tokens) G += t;
    std::vector<long long> part, begin(size_t(G) + 1, 0);
    std::vector<float*> y_rows(static_cast<size_t>(G));
    std::vector<long long> taken(P, 0);
    part.reserve(size_t(stage_rows));
    long long g = 0;
    for (int s = 0; s < R; ++s)
        for (long long t = 0; t < tokens[s]; ++t, ++g) {
            for (int m = 0; m < N; ++m)
                if ((masks[s][t] >> (m * L)) & local_bits(L)) {
                    int p = s * N + m;
                    part.push_back(stage_off[p] + taken[p]++);
                }
            begin[g + 1] = (long long)part.size();
            y_rows[g] = y[s] + t * dim;
        }
    CArgs a{};
    a.R = R, a.L = L, a.N = N, a.dim = dim, a.rpc = c.rows_per_chunk, a.qc = c.queue_chunks;
    a.Q = c.queue_chunks * c.rows_per_chunk;
    a.slots = std::max(1, std::min(32 / (2 + L), (P + c.num_sms - 1) / c.num_sms));
    size_t channels = size_t(R) * R, total_tokens = size_t(G);
    using detail::Arena;
    Arena arena(3 * Arena::size_of<void*>(R) + Arena::size_of<long long>(R) + 2 * Arena::size_of<long long>(P) +
                2 * Arena::size_of<long long>(channels) + Arena::size_of<float>(size_t(std::max(stage_rows, 1LL)) * dim) +
                Arena::size_of<float>(size_t(P) * a.qc * a.rpc * dim) + Arena::size_of<float>(channels * a.Q * dim) +
                2 * Arena::size_of<long long>(32 * size_t(P)) + 2 * Arena::size_of<long long>(32 * channels) +
                Arena::size_of<int>(1) + Arena::size_of<unsigned long long>(std::max<size_t>(total_tokens, 1)) +
                Arena::size_of<long long>(std::max<size_t>(part.size(), 1)) + Arena::size_of<long long>(begin.size()) +
                Arena::size_of<float*>(std::max<size_t>(total_tokens, 1)), stream);
    auto* d_in = arena.take<const float*>(R);
    auto* d_w = arena.take<const float*>(R);
    auto* d_masks = arena.take<const unsigned long long*>(R);
    auto* d_tokens = arena.take<long long>(R);
    auto* d_pipe = arena.take<long long>(P);
    auto* d_stage_off = arena.take<long long>(P);
    auto* d_count = arena.take<long long>(channels);
    auto* d_in_off = arena.take<long long>(channels);
    a.stage = arena.take<float>(size_t(std::max(stage_rows, 1LL)) * dim);
    a.inter = arena.take<float>(size_t(P) * a.qc * a.rpc * dim);
    a.intra = arena.take<float>(channels * a.Q * dim);
    a.inter_head = arena.take<long long>(32 * size_t(P));
    a.inter_tail = arena.take<long long>(32 * size_t(P));
    a.intra_head = arena.take<long long>(32 * channels);
    a.intra_tail = arena.take<long long>(32 * channels);
    a.error = arena.take<int>(1);
    auto* d_all_masks = arena.take<unsigned long long>(std::max<size_t>(total_tokens, 1));
    auto* d_part = arena.take<long long>(std::max<size_t>(part.size(), 1));
    auto* d_begin = arena.take<long long>(begin.size());
    auto* d_y_rows = arena.take<float*>(std::max<size_t>(total_tokens, 1));
    std::vector<const unsigned long long*> mask_ptr = upload_masks(masks, d_all_masks, stream);
    std::vector<const float*> w_ptr = weights.empty() ? std::vector<const float*>(R, nullptr) : weights;
    auto up = [&](void* to, const void* from, size_t bytes) {
        if (bytes) DUPLEX_CUDA_CHECK(cudaMemcpyAsync(to, from, bytes, cudaMemcpyHostToDevice, stream));
    };
    up(d_in, in.data(), sizeof(void*) * R);
    up(d_w, w_ptr.data(), sizeof(void*) * R);
    up(d_masks, mask_ptr.data(), sizeof(void*) * R);
    up(d_tokens, tokens.data(), sizeof(long long) * R);
    up(d_pipe, pipe_rows.data(), sizeof(long long) * P);
    up(d_stage_off, stage_off.data(), sizeof(long long) * P);
    up(d_count, count.data(), sizeof(long long) * channels);
    up(d_in_off, in_off.data(), sizeof(long long) * channels);
    up(d_part, part.data(), sizeof(long long) * part.size());
    up(d_begin, begin.data(), sizeof(long long) * begin.size());
    up(d_y_rows, y_rows.data(), sizeof(float*) * y_rows.size());
    for (long long* counter : {a.inter_head, a.inter_tail})
        DUPLEX_CUDA_CHECK(cudaMemsetAsync(counter, 0, 32 * sizeof(long long) * P, stream));
    for (long long* counter : {a.intra_head, a.intra_tail})
        DUPLEX_CUDA_CHECK(cudaMemsetAsync(counter, 0, 32 * sizeof(long long) * channels, stream));
    DUPLEX_CUDA_CHECK(cudaMemsetAsync(a.error, 0, sizeof(int), stream));
    a.in = d_in, a.weights = d_w, a.masks = d_masks, a.tokens = d_tokens, a.pipe_rows = d_pipe, a.count = d_count;
    a.in_off = d_in_off, a.stage_off = d_stage_off;
    a.timeout_cycles = (long long)(c.timeout_s * clock_khz * 1e3);
    int error = 0;
    int threads = 32 * a.slots * (2 + L);
    result.seconds = detail::timed_launch(stream, a.error, error, [&] {
        hierarchical_combine_kernel<<<c.num_sms, threads, 0, stream>>>(a);
        if (G > 0) {
            const int warps = 8;
            node_sum_kernel<<<unsigned((G + warps - 1) / warps), 32 * warps, 0, stream>>>(a.stage, d_part, d_begin,
                                                                                           d_y_rows, G, dim);
        }
    });
    if (error != 0) {
        int ch = error - 1;
        if (ch < P)
            throw CommError(fmt::format("hierarchical combine: the inter-node queue of rank {} from node {} stalled for {} s",
                                        ch / N, ch % N, c.timeout_s));
        ch -= P;
        throw CommError(fmt::format("hierarchical combine: the intra-node queue of rank {} to the relay of rank {} stalled for {} s",
                                    ch % R, ch / R, c.timeout_s));
    }
    return result;
}

}  // namespace duplex::cuda
