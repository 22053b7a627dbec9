// The rank grid: world = PP × DP. Rank r sits at pipeline stage r / DP and data-parallel index r % DP.
// Expert parallelism runs inside the DP dimension of a stage: EP consecutive DP indices form an EP group
// (its experts are spread over it), and ranks with the same position in their EP groups form an
// expert-data-parallel group (DP / EP copies of each expert).
//
//   RankGrid g = RankGrid::make({.pp = 4, .dp = 2, .ep = 2}, /*world=*/8, /*experts=*/8, rank);
//   GroupComms groups = make_groups(*world, g);   // collective over the world communicator
#pragma once

#include <memory>
#include <string>

#include "comm/communicator.hpp"

namespace duplex {

struct GridConfig {
    int pp = 1, dp = 1, ep = 1;
};

struct RankGrid {
    GridConfig cfg;
    int rank = 0;
    int stage = 0;      // 0 .. pp-1
    int dp_index = 0;   // 0 .. dp-1
    int ep_group = 0;   // dp_index / ep
    int ep_index = 0;   // dp_index % ep: position inside the EP group
    int num_local_experts = 0;
    int first_local_expert = 0;

    // ConfigError naming the violated constraint (world != pp*dp, ep not dividing dp or the experts, ...).
    static void validate(const GridConfig& c, int world_size, int num_experts);
    static RankGrid make(const GridConfig& c, int world_size, int num_experts, int rank);
    int world_rank(int stage, int dp_index) const { return stage * cfg.dp + dp_index; }
    std::string describe() const;
};

struct GroupComms {
    std::shared_ptr<Communicator> pp;   // same dp_index, all stages (pipeline transfers)
    std::shared_ptr<Communicator> dp;   // same stage, all dp indices (dense-parameter ZeRO-1)
    std::shared_ptr<Communicator> ep;   // same stage and EP group (token all-to-all)
    std::shared_ptr<Communicator> edp;  // same stage and ep_index (expert-parameter ZeRO-1)
};

GroupComms make_groups(Communicator& world, const RankGrid& g);

}  // namespace duplex
