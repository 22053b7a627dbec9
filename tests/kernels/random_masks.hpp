// Routing masks for the exchange tests (tests/kernels/exchange_plan_test.cpp on the CPU, tests/cuda/kernels_test.cpp
// on the device): per rank, its tokens and for each the ranks it goes to.
#pragma once

#include <cstdint>
#include <vector>

#include "core/clock.hpp"

namespace duplex::test_support {

// `tokens` plus 0..6 tokens per rank; each token picks top_k ranks (repeats merge) on at most `max_nodes`
// consecutive nodes of the `nodes` (the node-limited routing); every 11th token goes nowhere (all its experts
// dropped).
inline std::vector<std::vector<uint64_t>> random_masks(int ranks, int nodes, int tokens, int top_k, int max_nodes,
                                                       uint64_t seed) {
    Rng rng(seed);
    int L = ranks / nodes;
    std::vector<std::vector<uint64_t>> m(ranks);
    for (int s = 0; s < ranks; ++s) {
        int count = tokens + int(rng.below(7));
        for (int t = 0; t < count; ++t) {
            uint64_t mask = 0;
            int first_node = int(rng.below(uint64_t(nodes)));
            for (int k = 0; k < top_k; ++k) {
                int node = (first_node + int(rng.below(uint64_t(max_nodes)))) % nodes;
                mask |= 1ull << (node * L + int(rng.below(uint64_t(L))));
            }
            if (t % 11 == 5) mask = 0;
            m[s].push_back(mask);
        }
    }
    return m;
}

}  // namespace duplex::test_support
