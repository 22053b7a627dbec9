#include "comm/bench_pairs.hpp"

#include <algorithm>
#include <chrono>

#include <fmt/format.h>

#include "comm/bench.hpp"
#include "core/error.hpp"

namespace duplex {

namespace {

using Clock = std::chrono::steady_clock;
double since_us(Clock::time_point t0) { return std::chrono::duration<double, std::micro>(Clock::now() - t0).count(); }

constexpr uint32_t kData = 7101, kPing = 7103, kPong = 7104;

// `from` streams iters x large bytes to `to`; GB/s as `to` receives them, timed from when both left a barrier (a
// slow reverse direction does not enter it). At `to` (0 elsewhere).
double stream(Communicator& c, int from, int to, const PairsOptions& o, void* buf, int iters) {
    const int me = c.rank();
    if (me == from) {
        std::vector<WorkPtr> works;
        for (int i = 0; i < iters; ++i) works.push_back(c.isend(buf, o.large, to, kData));
        wait_all(works);
    }
    if (me != to) return 0;
    auto t0 = Clock::now();
    std::vector<WorkPtr> works;
    for (int i = 0; i < iters; ++i) works.push_back(c.irecv(buf, o.large, from, kData));
    wait_all(works);
    return double(iters) * double(o.large) / (since_us(t0) * 1e3);
}

// Half the median round trip of `from` and `to` ping-ponging small messages, in microseconds, at `from`.
double ping_pong(Communicator& c, int from, int to, const PairsOptions& o, void* buf, int iters) {
    const int me = c.rank();
    if (me != from && me != to) return 0;
    std::vector<double> trips;
    for (int i = 0; i < iters; ++i) {
        auto t0 = Clock::now();
        if (me == from) {
            c.isend(buf, o.small, to, kPing)->wait();
            c.irecv(buf, o.small, to, kPong)->wait();
            trips.push_back(since_us(t0));
        } else {
            c.irecv(buf, o.small, from, kPing)->wait();
            c.isend(buf, o.small, from, kPong)->wait();
        }
    }
    if (me != from) return 0;
    return median(std::move(trips)) / 2;
}

// Round r of the circle method over n ranks (n even: n - 1 rounds; odd: n rounds with a bye): my partner or -1.
int partner(int me, int n, int r) {
    int m = n % 2 == 0 ? n : n + 1;  // with a phantom rank for odd n
    auto slot = [&](int x) { return x == m - 1 ? m - 1 : (x + r) % (m - 1); };
    // Position p of the circle holds rank_at(p); position p pairs with position m - 1 - p.
    std::vector<int> at(static_cast<size_t>(m));
    for (int x = 0; x < m; ++x) at[size_t(slot(x))] = x;
    int my_pos = slot(me), other = at[size_t(m - 1 - my_pos)];
    return other >= n ? -1 : other;
}

// Every rank's row gathered to every rank: out[from][to].
std::vector<std::vector<double>> gather_rows(Communicator& c, const std::vector<double>& row) {
    const int n = c.size();
    std::vector<double> all(static_cast<size_t>(n) * n);
    c.all_gather(row.data(), all.data(), sizeof(double) * size_t(n))->wait();
    std::vector<std::vector<double>> out(static_cast<size_t>(n), std::vector<double>(static_cast<size_t>(n)));
    for (int f = 0; f < n; ++f)
        for (int t = 0; t < n; ++t) out[size_t(f)][size_t(t)] = all[size_t(f) * n + size_t(t)];
    return out;
}

double median_off_diagonal(const std::vector<std::vector<double>>& m) {
    std::vector<double> v;
    for (size_t f = 0; f < m.size(); ++f)
        for (size_t t = 0; t < m.size(); ++t)
            if (f != t) v.push_back(m[f][t]);
    return median(std::move(v));
}

// One pass over every pair: at each rank what it received from each peer (bandwidth, loaded) and its round trip with
// each higher rank.
struct LocalRows {
    std::vector<double> bw_in, lat, loaded_in;
};

LocalRows measure_pairs(Communicator& c, const PairsOptions& o, void* buf, void* in) {
    const int n = c.size(), me = c.rank();
    const size_t un = static_cast<size_t>(n);
    LocalRows rows{std::vector<double>(un, 0), std::vector<double>(un, 0), std::vector<double>(un, 0)};
    for (int from = 0; from < n; ++from)
        for (int to = 0; to < n; ++to) {
            if (from == to) continue;
            c.barrier()->wait();
            stream(c, from, to, o, buf, o.warmup);
            c.barrier()->wait();
            double g = stream(c, from, to, o, buf, o.iters);
            if (me == to) rows.bw_in[size_t(from)] = g;
            if (from < to) {  // a round trip is the pair's, both directions: measured once
                ping_pong(c, from, to, o, buf, o.warmup);
                double l = ping_pong(c, from, to, o, buf, o.iters);
                if (me == from) rows.lat[size_t(to)] = l;
            }
        }
    // All pairs at once: each round a perfect matching, both directions of every pair together; each rank times what
    // it receives.
    for (int r = 0; r < (n % 2 == 0 ? n - 1 : n); ++r) {
        int p = partner(me, n, r);
        for (int pass = 0; pass < 2; ++pass) {  // a warm-up pass, then the timed one
            int iters = pass == 0 ? std::max(o.warmup, 1) : o.iters;
            c.barrier()->wait();
            if (p < 0) continue;
            auto t0 = Clock::now();
            std::vector<WorkPtr> recvs, sends;
            for (int i = 0; i < iters; ++i) {
                recvs.push_back(c.irecv(in, o.large, p, kData));
                sends.push_back(c.isend(buf, o.large, p, kData));
            }
            wait_all(recvs);
            if (pass == 1) rows.loaded_in[size_t(p)] = double(iters) * double(o.large) / (since_us(t0) * 1e3);
            wait_all(sends);
        }
    }
    return rows;
}

}  // namespace

void validate(const PairsOptions& o, int ranks) {
    DUPLEX_CHECK_ARG(ranks >= 2, "--ranks", "pairs needs at least 2 ranks, got {}", ranks);
    DUPLEX_CHECK_ARG(o.large >= 1 && o.small >= 1, "--pair-bytes", "message sizes must be positive");
    DUPLEX_CHECK_ARG(o.iters >= 1 && o.warmup >= 0, "-n", "need at least one iteration");
    DUPLEX_CHECK_ARG(o.slow_factor > 1, "--slow-factor", "must be above 1, got {}", o.slow_factor);
    DUPLEX_CHECK_ARG(o.repeat >= 1, "--repeat", "must be at least 1, got {}", o.repeat);
}

PairsResult run_pairs(Communicator& c, const PairsOptions& o) {
    validate(o, c.size());
    const int n = c.size(), me = c.rank();
    // Buffers from o.allocate (device memory for nccl) or the backend's host memory, filled with this rank's number.
    auto allocate = [&](size_t size) -> std::shared_ptr<void> {
        if (o.allocate) return o.allocate(size);
        auto host = std::make_shared<HostBuffer>(c.allocate_host(size));
        std::fill_n(static_cast<char*>(host->data()), size, char(me));
        return {host, host->data()};
    };
    std::shared_ptr<void> out_buf = allocate(std::max(o.large, o.small)), in = allocate(o.large);
    const size_t un = static_cast<size_t>(n);
    // Every cell the median of its repeats: a pair named slow was slow in most passes, not in one stall.
    std::vector<LocalRows> passes;
    for (int k = 0; k < o.repeat; ++k) passes.push_back(measure_pairs(c, o, out_buf.get(), in.get()));
    auto cell = [&](std::vector<double> LocalRows::*row, size_t peer) {
        std::vector<double> v;
        for (const LocalRows& p : passes) v.push_back((p.*row)[peer]);
        return median(std::move(v));
    };
    std::vector<double> bw_in(un), lat(un), loaded_in(un);
    for (size_t q = 0; q < un; ++q) {
        bw_in[q] = cell(&LocalRows::bw_in, q);
        lat[q] = cell(&LocalRows::lat, q);
        loaded_in[q] = cell(&LocalRows::loaded_in, q);
    }
    PairsResult res;
    res.ranks = n;
    auto received = gather_rows(c, bw_in), loaded = gather_rows(c, loaded_in);  // [to][from]
    res.latency_us = gather_rows(c, lat);
    res.bandwidth_gbs = res.loaded_gbs = std::vector<std::vector<double>>(un, std::vector<double>(un, 0));
    for (size_t f = 0; f < un; ++f)
        for (size_t t = 0; t < un; ++t) {
            res.bandwidth_gbs[f][t] = received[t][f];
            res.loaded_gbs[f][t] = loaded[t][f];
            if (t < f) res.latency_us[f][t] = res.latency_us[t][f];  // the pair's round trip, both ways
        }
    for (int r = 0; r < n; ++r) res.node_of.push_back(c.topology().node(r));
    res.median_bandwidth_gbs = median_off_diagonal(res.bandwidth_gbs);
    res.median_loaded_gbs = median_off_diagonal(res.loaded_gbs);
    res.median_latency_us = median_off_diagonal(res.latency_us);
    for (int f = 0; f < n; ++f)
        for (int t = 0; t < n; ++t) {
            if (f == t) continue;
            double b = res.bandwidth_gbs[size_t(f)][size_t(t)], l = res.latency_us[size_t(f)][size_t(t)];
            if (b < res.median_bandwidth_gbs / o.slow_factor)
                res.slow.push_back({f, t, "bandwidth", b, res.median_bandwidth_gbs});
            if (f < t && l > res.median_latency_us * o.slow_factor)  // a round trip: the pair, once
                res.slow.push_back({f, t, "latency", l, res.median_latency_us});
        }
    return res;
}

}  // namespace duplex
