// The engine behind `duplex commbench`: nccl-tests-style measurements of one operation over a range of
// sizes on one communicator. Every rank calls run_commbench with the same options; rank 0's result holds
// the rows (time is the slowest rank's average per iteration; with compare_mpi the median of 5 rounds of it).
//
//   CommBenchOptions o; o.op = "alltoall"; o.min_bytes = 1024; o.max_bytes = 64 << 20;
//   CommBenchResult r = run_commbench(*comm, o);
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "comm/communicator.hpp"

namespace duplex {

struct CommBenchOptions {
    std::string op = "alltoall";  // p2p, alltoall, alltoallv, allgather, reducescatter, allreduce
    size_t min_bytes = 1024;
    size_t max_bytes = 64u << 20;
    double factor = 2.0;
    int iters = 20;
    int warmup = 5;
    bool check = true;
    double skew = 1.0;  // alltoallv: Zipf exponent of the per-peer counts (0: uniform)
    uint64_t seed = 1;
    // Also time plain MPI on the same buffers (needs MPI initialized): both then run in 5 alternating rounds of
    // iters / 5 and each time is its median round.
    bool compare_mpi = false;
    bool plain_buffers = false;  // buffers from the system allocator instead of Communicator::allocate_host
};

struct CommBenchRow {
    size_t bytes = 0;    // per-rank size in the nccl-tests sense
    size_t count = 0;    // elements of `type`
    std::string type = "float";
    double time_us = 0;  // slowest rank, average per iteration (compare_mpi: its median round)
    double algbw_gbs = 0;
    double busbw_gbs = 0;
    uint64_t wrong = 0;  // elements that differ from the reference (all ranks), -c 1
    double mpi_time_us = 0;  // --compare-mpi: the same operation through plain MPI
};

struct CommBenchResult {
    std::string op;
    std::string backend;
    int ranks = 0;
    int nodes = 0;
    std::vector<CommBenchRow> rows;
    double avg_busbw_gbs = 0;
    LinkBytes bytes_sent;  // this rank, over the whole run
};

void validate(const CommBenchOptions& o);
// (n-1)/n for alltoall(v)/allgather/reducescatter, 2(n-1)/n for allreduce, 1 for p2p.
double busbw_factor(const std::string& op, int ranks);
// Sizes from min to max by factor, each rounded down to what the op can split evenly (at least one unit).
std::vector<size_t> bench_sizes(const CommBenchOptions& o, int ranks);
// Per-peer element counts of rank `sender` for alltoallv: Zipf(skew) over a seeded permutation of peers,
// summing to `total` elements. Every rank computes the same matrix.
std::vector<size_t> skewed_counts(size_t total, int ranks, int sender, double skew, uint64_t seed);

// Called after each row on rank 0 (for progress output).
using RowCallback = std::function<void(const CommBenchRow&)>;
CommBenchResult run_commbench(Communicator& comm, const CommBenchOptions& o, const RowCallback& on_row = {});

// The middle value (the upper one of an even count; 0 for none).
double median(std::vector<double> v);

// Aggregate memcpy bandwidth (bytes/s) of `threads` threads copying `bytes` each: the copy ceiling.
double measure_memcpy_bandwidth(int threads, size_t bytes = 64u << 20, int reps = 5);

}  // namespace duplex
