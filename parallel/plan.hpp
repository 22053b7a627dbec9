// The formulas every part of Duplex must agree on, each in one function: the run plan (how many ranks a
// schedule needs, the layer split over stages, the world a layout takes) and the expert-parallel plan
// (expert -> rank -> node placement, the relay of the node-limited path, the dispatch plan of a routed
// microbatch). The trainer, the executor's stages, emulate mode, the simulator, the host exchanges and the
// device paths call these; none recomputes them.
//
//   RunPlan plan{sched::ScheduleKind::DualPipeV, /*pp=*/8, /*dp=*/2, /*ep=*/2};
//   plan.pipeline_ranks() == 4;   plan.world_size() == 8;   plan.layers_of_stage(3, 61) == LayerRange{22, 8};
//   ExpertPlacement pl(/*experts=*/256, /*ranks=*/64);
//   pl.rank_of(200) == 50;  pl.relay(200, /*me=*/3, topology);
#pragma once

#include <vector>

#include "comm/topology.hpp"
#include "parallel/schedule.hpp"

namespace duplex {

// Pipeline ranks a schedule needs for `pp` model stages: DualPipeV folds two stages on each rank.
int pipeline_ranks(sched::ScheduleKind kind, int pp);

struct LayerRange {
    int first = 0, count = 0;
    bool operator==(const LayerRange&) const = default;
};
// Layers of stage s when `layers` layers are split over `pp` stages as evenly as possible (earlier stages get
// the smaller share).
LayerRange layers_of_stage(int s, int pp, int layers);

struct RunPlan {
    sched::ScheduleKind schedule = sched::ScheduleKind::OneFOneB;
    int pp = 1, dp = 1, ep = 1;
    int pipeline_ranks() const { return duplex::pipeline_ranks(schedule, pp); }
    int world_size() const { return pipeline_ranks() * dp; }
    LayerRange layers_of_stage(int s, int layers) const { return duplex::layers_of_stage(s, pp, layers); }
    // ConfigError naming what is wrong (pp < 1, a schedule's own constraints, ep not dividing dp or the experts).
    void validate(int microbatches, int experts) const;
};

// Experts of one MoE layer spread over an expert-parallel group of `ranks`: expert e on group rank
// e / (experts / ranks), contiguous blocks.
class ExpertPlacement {
public:
    ExpertPlacement(int experts, int ranks);  // ConfigError unless ranks divides experts
    int experts() const { return experts_; }
    int ranks() const { return ranks_; }
    int per_rank() const { return per_rank_; }
    int rank_of(int expert) const { return expert / per_rank_; }
    int first_expert(int rank) const { return rank * per_rank_; }
    // The node holding the expert, by the group's topology.
    int node_of(int expert, const Topology& t) const { return t.node(rank_of(expert)); }
    // The node-limited path's relay for a token on rank `me`: the rank on the expert's node with me's local index.
    int relay(int expert, int me, const Topology& t) const;

private:
    int experts_, ranks_, per_rank_;
};

// What one rank sends for a routed microbatch (expert[token * top_k + k]), per peer of the group.
struct DispatchPlan {
    std::vector<int> slots_to;      // flat path: one row per (token, k) to the expert's rank
    std::vector<int> rows_to_relay; // node-limited path: one row per (token, target node) to that node's relay
    // node-limited path: slots each relay forwards, per local rank of its node ([peer][local rank])
    std::vector<std::vector<int>> slots_via_relay;
};
DispatchPlan plan_dispatch(const std::vector<int>& expert, int tokens, int top_k, const ExpertPlacement& placement,
                           const Topology& topology, int me);

// Distinct nodes each token's experts sit on (the inter-node rows of the node-limited path), summed.
long node_crossings(const std::vector<int>& expert, int tokens, int top_k, const ExpertPlacement& placement,
                    const Topology& topology);

}  // namespace duplex
