#include "comm/bench.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <thread>

#include <fmt/format.h>

#include "comm/launch.hpp"
#include "core/clock.hpp"
#include "core/error.hpp"
#ifdef DUPLEX_HAVE_MPI
#include "comm/mpi/mpi_reference.hpp"
#endif

namespace duplex {

namespace {

const std::vector<std::string> kOps = {"p2p", "alltoall", "alltoallv", "allgather", "reducescatter", "allreduce"};

uint32_t word(int src, int dst, size_t i) {
    uint32_t x = uint32_t(src) * 0x9E3779B1u ^ uint32_t(dst) * 0x85EBCA77u ^ uint32_t(i) * 0xC2B2AE3Du;
    return x ^ (x >> 15);
}
float value(int src, size_t i) { return float((src + 1) * int(i % 13 + 1)); }
float expected_sum(int n, size_t i) { return float(n * (n + 1) / 2 * int(i % 13 + 1)); }

// One size of one op: buffers, the call, and its verification.
struct Case {
    int n, me;
    std::string op;
    size_t bytes;
    HostBuffer send_memory, recv_memory;  // from the backend's allocator unless --plain-buffers
    std::span<uint32_t> send, recv;       // 4-byte elements (float for reductions)
    std::vector<size_t> sb, so, rb, ro;  // alltoallv / p2p layout in bytes

    Case(Communicator& comm, const std::string& op_, size_t bytes_, const CommBenchOptions& o)
        : n(comm.size()), me(comm.rank()), op(op_), bytes(bytes_) {
        size_t elems = bytes / 4, send_elems = 0, recv_elems = 0;
        if (op == "p2p") {
            send_elems = elems;
            recv_elems = elems;
        } else if (op == "alltoall" || op == "allreduce") {
            send_elems = elems;
            recv_elems = op == "allreduce" ? 0 : elems;
        } else if (op == "alltoallv") {
            std::vector<std::vector<size_t>> counts(n);
            for (int s = 0; s < n; ++s) counts[s] = skewed_counts(elems, n, s, o.skew, o.seed);
            sb.resize(n), so.resize(n), rb.resize(n), ro.resize(n);
            size_t soff = 0, roff = 0;
            for (int p = 0; p < n; ++p) {
                sb[p] = counts[me][p] * 4;
                so[p] = soff;
                soff += sb[p];
                rb[p] = counts[p][me] * 4;
                ro[p] = roff;
                roff += rb[p];
            }
            send_elems = soff / 4;
            recv_elems = roff / 4;
        } else if (op == "allgather") {
            send_elems = elems / n;
            recv_elems = elems;
        } else if (op == "reducescatter") {
            send_elems = elems;
            recv_elems = elems / n;
        }
        auto allocate = [&](size_t count) {
            return o.plain_buffers ? allocate_ordinary_host(count * 4) : comm.allocate_host(count * 4);
        };
        send_memory = allocate(send_elems);
        recv_memory = allocate(recv_elems);
        send = {static_cast<uint32_t*>(send_memory.data()), send_elems};
        recv = {static_cast<uint32_t*>(recv_memory.data()), recv_elems};
    }

    void fill() {
        if (op == "reducescatter" || op == "allreduce") {
            for (size_t i = 0; i < send.size(); ++i) {
                float v = value(me, i);
                std::memcpy(&send[i], &v, 4);
            }
        } else if (op == "alltoall") {
            size_t per = send.size() / n;
            for (int p = 0; p < n; ++p)
                for (size_t i = 0; i < per; ++i) send[p * per + i] = word(me, p, i);
        } else if (op == "alltoallv") {
            for (int p = 0; p < n; ++p)
                for (size_t i = 0; i < sb[p] / 4; ++i) send[so[p] / 4 + i] = word(me, p, i);
        } else if (op == "p2p") {
            for (size_t i = 0; i < send.size(); ++i) send[i] = word(me, (me + 1) % n, i);
        } else {
            for (size_t i = 0; i < send.size(); ++i) send[i] = word(me, -1, i);
        }
        std::fill(recv.begin(), recv.end(), 0xDEADBEEFu);
    }

    uint64_t count_wrong() const {
        uint64_t wrong = 0;
        auto check_float = [&](std::span<const uint32_t> buf, size_t first_index) {
            for (size_t i = 0; i < buf.size(); ++i) {
                float got;
                std::memcpy(&got, &buf[i], 4);
                if (got != expected_sum(n, first_index + i)) ++wrong;
            }
        };
        if (op == "allreduce") {
            check_float(send, 0);
        } else if (op == "reducescatter") {
            check_float(recv, size_t(me) * recv.size());
        } else if (op == "alltoall") {
            size_t per = recv.size() / n;
            for (int p = 0; p < n; ++p)
                for (size_t i = 0; i < per; ++i) wrong += recv[p * per + i] != word(p, me, i);
        } else if (op == "alltoallv") {
            for (int p = 0; p < n; ++p)
                for (size_t i = 0; i < rb[p] / 4; ++i) wrong += recv[ro[p] / 4 + i] != word(p, me, i);
        } else if (op == "p2p") {
            int from = (me - 1 + n) % n;
            for (size_t i = 0; i < recv.size(); ++i) wrong += recv[i] != word(from, me, i);
        } else {
            size_t per = recv.size() / n;
            for (int p = 0; p < n; ++p)
                for (size_t i = 0; i < per; ++i) wrong += recv[p * per + i] != word(p, -1, i);
        }
        return wrong;
    }

    WorkPtr start(Communicator& comm) {
        if (op == "p2p") {
            auto r = comm.irecv(recv.data(), recv.size() * 4, (me - 1 + n) % n, 7);
            auto s = comm.isend(send.data(), send.size() * 4, (me + 1) % n, 7);
            s->wait();
            return r;
        }
        if (op == "alltoall") return comm.all_to_all(send.data(), recv.data(), send.size() * 4 / n);
        if (op == "alltoallv") return comm.all_to_all_v(send.data(), sb, so, recv.data(), rb, ro);
        if (op == "allgather") return comm.all_gather(send.data(), recv.data(), send.size() * 4);
        if (op == "reducescatter") return comm.reduce_scatter(send.data(), recv.data(), recv.size(), DType::F32);
        return comm.all_reduce(send.data(), send.size(), DType::F32);
    }
};

// Rounds of --compare-mpi: ours and Open MPI alternate, each timing o.iters / kCompareRounds iterations.
constexpr int kCompareRounds = 5;

double max_over_ranks(Communicator& comm, double v) {
    std::vector<double> all(comm.size());
    comm.all_gather(&v, all.data(), sizeof(double))->wait();
    return *std::max_element(all.begin(), all.end());
}

uint64_t sum_over_ranks(Communicator& comm, uint64_t v) {
    int64_t x = static_cast<int64_t>(v);
    comm.all_reduce(&x, 1, DType::I64)->wait();
    return static_cast<uint64_t>(x);
}

}  // namespace

void validate(const CommBenchOptions& o) {
    if (std::find(kOps.begin(), kOps.end(), o.op) == kOps.end())
        throw ConfigError("--op", fmt::format("unknown operation '{}' (p2p, alltoall, alltoallv, allgather, "
                                              "reducescatter, allreduce)", o.op));
    DUPLEX_CHECK_ARG(o.min_bytes <= o.max_bytes, "-b/-e", "min bytes {} exceed max bytes {}", o.min_bytes, o.max_bytes);
    DUPLEX_CHECK_ARG(o.factor > 1.0 || o.min_bytes == o.max_bytes, "-f", "factor must be above 1, got {}", o.factor);
    DUPLEX_CHECK_ARG(o.iters >= 1, "-n", "iterations must be at least 1, got {}", o.iters);
    DUPLEX_CHECK_ARG(o.warmup >= 0, "-w", "warm-up iterations must be at least 0, got {}", o.warmup);
    DUPLEX_CHECK_ARG(o.skew >= 0, "--skew", "Zipf exponent must be at least 0, got {}", o.skew);
}

double busbw_factor(const std::string& op, int ranks) {
    if (op == "p2p" || ranks <= 1) return op == "p2p" ? 1.0 : 0.0;
    double f = double(ranks - 1) / ranks;
    return op == "allreduce" ? 2 * f : f;
}

std::vector<size_t> bench_sizes(const CommBenchOptions& o, int ranks) {
    size_t unit = (o.op == "p2p" || o.op == "allreduce") ? 4 : 4 * size_t(ranks);
    std::vector<size_t> sizes;
    double s = static_cast<double>(o.min_bytes);
    while (true) {
        size_t b = std::max(unit, static_cast<size_t>(s) / unit * unit);
        if (sizes.empty() || b != sizes.back()) sizes.push_back(b);
        if (o.factor <= 1.0) break;
        s *= o.factor;
        if (s > static_cast<double>(o.max_bytes) * (1 + 1e-9)) break;
    }
    return sizes;
}

std::vector<size_t> skewed_counts(size_t total, int ranks, int sender, double skew, uint64_t seed) {
    std::vector<int> order(ranks);
    std::iota(order.begin(), order.end(), 0);
    Rng rng(seed * 1000003 + uint64_t(sender));
    for (int i = ranks - 1; i > 0; --i) std::swap(order[i], order[rng.below(uint64_t(i) + 1)]);
    std::vector<double> w(ranks);
    double sum = 0;
    for (int k = 0; k < ranks; ++k) sum += (w[order[k]] = 1.0 / std::pow(k + 1.0, skew));
    std::vector<size_t> counts(ranks);
    size_t assigned = 0;
    for (int p = 0; p < ranks; ++p) assigned += (counts[p] = static_cast<size_t>(double(total) * w[p] / sum));
    counts[order[0]] += total - assigned;  // the remainder goes to the heaviest peer
    return counts;
}

CommBenchResult run_commbench(Communicator& comm, const CommBenchOptions& o, const RowCallback& on_row) {
    validate(o);
#ifndef DUPLEX_HAVE_MPI
    if (o.compare_mpi) throw ConfigError("--compare-mpi", "this build has no MPI");
#endif
    if (o.compare_mpi && !backend_is_multiprocess(comm.backend()))
        throw ConfigError("--compare-mpi", fmt::format("needs one rank per process under mpirun (backend mpi or ucx), "
                                                       "not '{}'", comm.backend()));
    CommBenchResult result;
    result.op = o.op;
    result.backend = comm.backend();
    result.ranks = comm.size();
    result.nodes = comm.topology().num_nodes();
    comm.reset_counters();
    double busbw_sum = 0;
    for (size_t bytes : bench_sizes(o, comm.size())) {
        Case c(comm, o.op, bytes, o);
        c.fill();
        CommBenchRow row;
        row.bytes = bytes;
        row.count = bytes / 4;
        if (o.check) {
            c.start(comm)->wait();
            row.wrong = sum_over_ranks(comm, c.count_wrong());
        }
        for (int i = 0; i < o.warmup; ++i) c.start(comm)->wait();
        auto time_ours = [&](int iters) {
            comm.barrier()->wait();
            Stopwatch sw;
            for (int i = 0; i < iters; ++i) c.start(comm)->wait();
            return max_over_ranks(comm, sw.seconds() / iters);
        };
        double t = 0;
        if (!o.compare_mpi) {
            t = time_ours(o.iters);
        } else {
#ifdef DUPLEX_HAVE_MPI
            // NOTE: a shared machine stalls a rank now and then for far longer than a small message takes: ours and
            // Open MPI alternate in rounds and each column is its median round, so one stall moves neither.
            MpiReferenceCase ref{o.op, c.send.data(), c.recv.data(), c.send.size() * 4, c.recv.size() * 4,
                                 c.sb, c.so, c.rb, c.ro};
            int rounds = std::min(kCompareRounds, o.iters);
            int per_round = std::max(1, o.iters / rounds);
            std::vector<double> ours, theirs;
            for (int r = 0; r < rounds; ++r) {
                ours.push_back(time_ours(per_round));
                theirs.push_back(max_over_ranks(comm, mpi_reference_time(ref, r == 0 ? o.warmup : 0, per_round)));
            }
            t = median(ours);
            row.mpi_time_us = median(theirs) * 1e6;
#endif
        }
        row.time_us = t * 1e6;
        row.algbw_gbs = t > 0 ? double(bytes) / t / 1e9 : 0;
        row.busbw_gbs = row.algbw_gbs * busbw_factor(o.op, comm.size());
        busbw_sum += row.busbw_gbs;
        result.rows.push_back(row);
        if (on_row && comm.rank() == 0) on_row(row);
    }
    result.avg_busbw_gbs = result.rows.empty() ? 0 : busbw_sum / double(result.rows.size());
    result.bytes_sent = comm.bytes_sent();
    return result;
}

double median(std::vector<double> v) {
    if (v.empty()) return 0;
    std::nth_element(v.begin(), v.begin() + long(v.size() / 2), v.end());
    return v[v.size() / 2];
}

double measure_memcpy_bandwidth(int threads, size_t bytes, int reps) {
    std::vector<std::vector<char>> src(threads, std::vector<char>(bytes, 1)), dst(threads, std::vector<char>(bytes, 0));
    auto copy_all = [&](int t) {
        for (int r = 0; r < reps; ++r) std::memcpy(dst[t].data(), src[t].data(), bytes);
    };
    auto trial = [&] {
        std::vector<std::thread> pool;
        Stopwatch sw;
        for (int t = 0; t < threads; ++t) pool.emplace_back(copy_all, t);
        for (auto& th : pool) th.join();
        return double(bytes) * reps * threads / sw.seconds();
    };
    trial();  // touch the pages
    // NOTE: the best of three trials: on a shared (virtual) machine a single trial can be far below what the
    // memory system delivers, which would flatter every ratio against it.
    return std::max({trial(), trial(), trial()});
}

}  // namespace duplex
