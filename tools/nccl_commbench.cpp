// duplex commbench --backend nccl. Every rank fills its device send buffer with a pattern that names sender and
// element, runs the operation once to check it element by element (-c 1), then times `iters` back-to-back
// operations on the communicator's stream (events around them; the slowest rank's average is reported), with
// a cudaMemcpy device-to-device copy of the same bytes measured in the same run as the ceiling.
#include "tools/nccl_commbench.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "comm/nccl/nccl_communicator.hpp"
#include "comm/store.hpp"
#include "core/error.hpp"
#include "kernels/cuda/device.hpp"
#include "tools/commands.hpp"
#include "tools/gpu_timing.hpp"

namespace duplex::tools {

namespace {

float pattern(int src, size_t i) { return float((src + 1) * int(i % 13 + 1)); }

// One operation's buffers on one rank, sized for `bytes` in the nccl-tests sense.
struct NcclCase {
    std::string op;
    int rank, size;
    size_t send_count = 0, recv_count = 0;
    std::vector<size_t> sb, so, rb, ro;  // alltoall(v): bytes and offsets per peer
    std::unique_ptr<DeviceBuffer> send, recv;
    // Byte offset, in sender s's send buffer, of the block s sends to this rank (alltoall and alltoallv).
    std::vector<size_t> sender_offsets;

    NcclCase(const std::string& op_, int r, int n, size_t bytes, const CommBenchOptions& o) : op(op_), rank(r), size(n) {
        size_t count = bytes / 4;
        if (op == "allgather") send_count = count / n, recv_count = count;
        else if (op == "reducescatter") send_count = count, recv_count = count / n;
        else if (op == "allreduce") send_count = recv_count = count;
        else if (op == "p2p") send_count = recv_count = count;
        else {  // alltoall, alltoallv: per-peer counts (skewed for alltoallv), every rank knows all of them
            std::vector<std::vector<size_t>> c(n);
            for (int s = 0; s < n; ++s)
                c[s] = op == "alltoall" ? std::vector<size_t>(n, count / n) : skewed_counts(count, n, s, o.skew, o.seed);
            for (int s = 0; s < n; ++s) {  // where sender s's block for this rank starts in its buffer
                size_t off = 0;
                for (int p = 0; p < r; ++p) off += c[s][p] * 4;
                sender_offsets.push_back(off);
            }
            size_t at = 0;
            for (int p = 0; p < n; ++p) sb.push_back(c[r][p] * 4), so.push_back(at), at += c[r][p] * 4;
            send_count = at / 4;
            at = 0;
            for (int s = 0; s < n; ++s) rb.push_back(c[s][r] * 4), ro.push_back(at), at += c[s][r] * 4;
            recv_count = at / 4;
        }
        send = std::make_unique<DeviceBuffer>(send_count * 4);
        recv = std::make_unique<DeviceBuffer>(recv_count * 4);
    }

    void fill() {
        std::vector<float> v(send_count);
        for (size_t i = 0; i < v.size(); ++i) v[i] = pattern(rank, i);
        DUPLEX_CUDA_CHECK(cudaMemcpy(send->p, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
        DUPLEX_CUDA_CHECK(cudaMemset(recv->p, 0xFF, recv_count * 4));
    }

    WorkPtr start(NcclCommunicator& c) {
        if (op == "allgather") return c.all_gather(send->p, recv->p, send_count * 4);
        if (op == "reducescatter") return c.reduce_scatter(send->p, recv->p, recv_count, DType::F32);
        if (op == "allreduce") {
            DUPLEX_CUDA_CHECK(cudaMemcpyAsync(recv->p, send->p, send_count * 4, cudaMemcpyDeviceToDevice, c.stream()));
            return c.all_reduce(recv->p, recv_count, DType::F32);
        }
        if (op == "p2p") {  // a ring, send and receive in one NCCL group: to the next rank, from the previous one
            std::vector<size_t> pb(size, 0), pz(size, 0), qb(size, 0);
            pb[(rank + 1) % size] = send_count * 4;
            qb[(rank + size - 1) % size] = recv_count * 4;
            return c.all_to_all_v(send->p, pb, pz, recv->p, qb, pz);
        }
        return c.all_to_all_v(send->p, sb, so, recv->p, rb, ro);
    }

    uint64_t count_wrong() const {
        std::vector<float> got(recv_count);
        DUPLEX_CUDA_CHECK(cudaMemcpy(got.data(), recv->p, got.size() * 4, cudaMemcpyDeviceToHost));
        uint64_t wrong = 0;
        if (op == "alltoall" || op == "alltoallv") {
            for (int s = 0; s < size; ++s)
                for (size_t j = 0; j < rb[s] / 4; ++j) wrong += got[ro[s] / 4 + j] != pattern(s, sender_offsets[s] / 4 + j);
            return wrong;
        }
        for (size_t i = 0; i < got.size(); ++i) {
            float want;
            if (op == "allgather") want = pattern(int(i / send_count), i % send_count);
            else if (op == "p2p") want = pattern((rank + size - 1) % size, i);
            else {  // allreduce, reducescatter: the sum over ranks of pattern(r, element)
                size_t e = op == "allreduce" ? i : size_t(rank) * recv_count + i;
                want = float(size * (size + 1) / 2 * int(e % 13 + 1));
            }
            wrong += got[i] != want;
        }
        return wrong;
    }
};

}  // namespace

int run_nccl_commbench(const NcclCommBenchOptions& opt) {
    const CommBenchOptions& o = opt.bench;
    validate(o);
    DUPLEX_CHECK_ARG(!o.compare_mpi, "--compare-mpi", "runs with the mpi and ucx backends, not nccl");
    auto devices = cuda_devices();
    if (devices.empty()) throw ConfigError("--backend", "nccl: no CUDA device on this machine");
    int n = opt.ranks > 0 ? opt.ranks : int(devices.size());
    DUPLEX_CHECK_ARG(n <= int(devices.size()), "--ranks",
                     "nccl puts one rank on each GPU: {} ranks requested, this machine has {} (two ranks of one NCCL "
                     "communicator cannot share a device; --backend cuda runs virtual ranks on one GPU)",
                     n, devices.size());
    std::vector<size_t> sizes = bench_sizes(o, n);
    double copy_gbs = copy_bandwidth(sizes.back()) / 1e9;
    fmt::print("# duplex commbench: {} on {} ranks (one per GPU: {}), backend nccl, {} iterations after {} warm-up\n",
               o.op, n, devices[0].name, o.iters, o.warmup);
    fmt::print("# copy = cudaMemcpy D2D of the largest size on GPU 0: {:.1f} GB/s\n#\n", copy_gbs);
    fmt::print("# {:>10} {:>12} {:>8} {:>10} {:>11} {:>11} {:>7}\n", "size(B)", "count", "type", "time(us)",
               "algbw(GB/s)", "busbw(GB/s)", "#wrong");
    InMemoryStore store;
    std::vector<std::vector<double>> times(sizes.size(), std::vector<double>(n, 0));
    std::vector<std::vector<uint64_t>> wrong(sizes.size(), std::vector<uint64_t>(n, 0));
    std::vector<std::string> failures(n);
    std::vector<std::thread> threads;
    std::mutex print_mutex;
    for (int r = 0; r < n; ++r)
        threads.emplace_back([&, r] {
            try {
                auto c = NcclCommunicator::create(store, r, n, r, "commbench/nccl");
                for (size_t k = 0; k < sizes.size(); ++k) {
                    NcclCase cs(o.op, r, n, sizes[k], o);
                    cs.fill();
                    if (o.check) {
                        cs.start(*c)->wait();
                        wrong[k][r] = cs.count_wrong();
                    }
                    for (int i = 0; i < o.warmup; ++i) cs.start(*c)->wait();
                    c->barrier()->wait();
                    cudaEvent_t e0, e1;
                    DUPLEX_CUDA_CHECK(cudaEventCreate(&e0));
                    DUPLEX_CUDA_CHECK(cudaEventCreate(&e1));
                    DUPLEX_CUDA_CHECK(cudaEventRecord(e0, c->stream()));
                    WorkPtr last;
                    for (int i = 0; i < o.iters; ++i) last = cs.start(*c);
                    DUPLEX_CUDA_CHECK(cudaEventRecord(e1, c->stream()));
                    last->wait();
                    DUPLEX_CUDA_CHECK(cudaEventSynchronize(e1));
                    float ms = 0;
                    DUPLEX_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
                    cudaEventDestroy(e0);
                    cudaEventDestroy(e1);
                    times[k][r] = ms * 1e-3 / o.iters;
                    c->barrier()->wait();  // every rank's time of row k is in
                    if (r == 0) {
                        double t = *std::max_element(times[k].begin(), times[k].end());
                        uint64_t w = 0;
                        for (uint64_t x : wrong[k]) w += x;
                        double algbw = t > 0 ? double(sizes[k]) / t / 1e9 : 0;
                        std::lock_guard<std::mutex> lock(print_mutex);
                        fmt::print("  {:>10} {:>12} {:>8} {:>10.2f} {:>11.3f} {:>11.3f} {:>7}\n", sizes[k], sizes[k] / 4,
                                   "float", t * 1e6, algbw, algbw * busbw_factor(o.op, n), w);
                        std::fflush(stdout);
                    }
                }
            } catch (const std::exception& e) {
                failures[r] = e.what();
                store.set("commbench/nccl/failed", std::to_string(r));
            }
        });
    for (auto& t : threads) t.join();
    for (int r = 0; r < n; ++r)
        if (!failures[r].empty()) throw CommError(fmt::format("nccl commbench: rank {}: {}", r, failures[r]));
    uint64_t total_wrong = 0;
    double busbw_sum = 0;
    nlohmann::json rows = nlohmann::json::array();
    for (size_t k = 0; k < sizes.size(); ++k) {
        double t = *std::max_element(times[k].begin(), times[k].end());
        uint64_t w = 0;
        for (uint64_t x : wrong[k]) w += x;
        total_wrong += w;
        double algbw = t > 0 ? double(sizes[k]) / t / 1e9 : 0;
        busbw_sum += algbw * busbw_factor(o.op, n);
        rows.push_back({{"size", sizes[k]}, {"count", sizes[k] / 4}, {"type", "float"}, {"time_us", t * 1e6},
                        {"algbw_gbs", algbw}, {"busbw_gbs", algbw * busbw_factor(o.op, n)}, {"wrong", w}});
    }
    fmt::print("# Out of bounds values : {} {}\n", total_wrong, total_wrong ? "FAILED" : "OK");
    fmt::print("# Avg bus bandwidth    : {:.3f} GB/s\n", busbw_sum / double(sizes.size()));
    if (!opt.json.empty()) {
        nlohmann::json j = {{"op", o.op},        {"backend", "nccl"},  {"ranks", n},    {"device", devices[0].name},
                            {"copy_gbs", copy_gbs}, {"iters", o.iters}, {"rows", rows}};
        write_text_file(opt.json, j.dump(2) + "\n", "--json");
        fmt::print("# JSON written to {}\n", opt.json);
    }
    return total_wrong ? 1 : 0;
}

}  // namespace duplex::tools
