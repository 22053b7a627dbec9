// `duplex commbench --op pairs`: every ordered rank pair's link, to find the slow one a collective's average hides.
//
//   PairsResult r = run_pairs(comm, {.large = 4 << 20, .small = 8});   // a collective; the matrices on rank 0
//   for (const SlowPair& s : r.slow) ...                                // pairs slow_factor from the median
//
// Three matrices, [from][to]:
//   bandwidth  one pair at a time: `from` sends `iters` messages of `large` bytes to `to` (the others wait); GB/s as
//              `to` receives them, timed from a barrier (the reverse direction carries nothing);
//   loaded     all pairs at once, in rounds of a perfect matching (the circle method: n - 1 rounds for n ranks, or
//              n for odd n with one rank out each round): both ranks of each pair send to each other at once, so
//              every link of the round carries traffic; GB/s as each rank receives;
//   latency    one pair at a time, `small` bytes: half the median round trip of a ping-pong, microseconds — a
//              round trip uses both directions, so [a][b] = [b][a] and a slow latency names the pair once (a < b).
// A pair is slow when its bandwidth is below the median of all pairs divided by slow_factor, or its latency above
// the median times slow_factor. Latency is the median round trip of the iterations (a stalled thread or a
// descheduled process shows in one, not in the median). With repeat > 1 every pair is measured that many times and
// each cell is the median of its passes: on a busy machine one pass names a stalled pair now and then, the median of
// three names a pair slow in two of them.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.hpp"

namespace duplex {

struct PairsOptions {
    size_t large = 4u << 20;  // bytes per message for bandwidth
    size_t small = 8;         // bytes per message for latency
    int iters = 10;
    int warmup = 2;
    double slow_factor = 2.0;  // how far from the median a slow pair is (x slower)
    int repeat = 1;            // passes over every pair; each cell is the median of its passes
    // Where the messages live: a buffer of at least the given size (device memory for the nccl backend); unset, the
    // backend's host memory (Communicator::allocate_host).
    std::function<std::shared_ptr<void>(size_t)> allocate;
};

struct SlowPair {
    int from = 0, to = 0;
    std::string what;  // "bandwidth" or "latency"
    double value = 0, median = 0;
};

struct PairsResult {
    int ranks = 0;
    std::vector<int> node_of;  // by rank
    std::vector<std::vector<double>> bandwidth_gbs, loaded_gbs, latency_us;  // [from][to]; the diagonal 0
    double median_bandwidth_gbs = 0, median_loaded_gbs = 0, median_latency_us = 0;
    std::vector<SlowPair> slow;
};

// ConfigError for bad options (sizes of 0, fewer than 2 ranks, a slow factor not above 1).
void validate(const PairsOptions& o, int ranks);
PairsResult run_pairs(Communicator& comm, const PairsOptions& o);

}  // namespace duplex
