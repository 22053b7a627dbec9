#include "parallel/grid.hpp"

#include "parallel/expert_plan.hpp"
#include "parallel/plan.hpp"

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

void RankGrid::validate(const GridConfig& c, int world_size, int num_experts) {
    DUPLEX_CHECK_ARG(c.pp >= 1 && c.dp >= 1 && c.ep >= 1, "--pp/--dp/--ep", "must all be at least 1, got {}/{}/{}", c.pp,
                     c.dp, c.ep);
    DUPLEX_CHECK_ARG(c.pp * c.dp == world_size, "--pp x --dp", "{} x {} = {} ranks, but the world has {}", c.pp, c.dp,
                     c.pp * c.dp, world_size);
    DUPLEX_CHECK_ARG(c.dp % c.ep == 0, "--ep", "EP ({}) must divide DP ({}): expert parallelism runs inside the DP "
                     "dimension", c.ep, c.dp);
    DUPLEX_CHECK_ARG(num_experts % c.ep == 0, "--ep", "EP ({}) must divide the {} routed experts", c.ep, num_experts);
}

RankGrid RankGrid::make(const GridConfig& c, int world_size, int num_experts, int rank) {
    validate(c, world_size, num_experts);
    DUPLEX_CHECK_ARG(rank >= 0 && rank < world_size, "rank", "{} outside 0..{}", rank, world_size - 1);
    RankGrid g;
    g.cfg = c;
    g.rank = rank;
    g.stage = rank / c.dp;
    g.dp_index = rank % c.dp;
    g.ep_group = g.dp_index / c.ep;
    g.ep_index = g.dp_index % c.ep;
    ExpertPlacement placement(num_experts, c.ep);
    g.num_local_experts = placement.per_rank();
    g.first_local_expert = placement.first_expert(g.ep_index);
    return g;
}

std::string RankGrid::describe() const {
    return fmt::format("rank {}: stage {}/{}, dp {}/{}, ep {}/{} (group {}), experts {}..{}", rank, stage, cfg.pp,
                       dp_index, cfg.dp, ep_index, cfg.ep, ep_group, first_local_expert,
                       first_local_expert + num_local_experts - 1);
}

GroupComms make_groups(Communicator& world, const RankGrid& g) {
    GroupComms out;
    int dp = g.cfg.dp, ep = g.cfg.ep;
    out.pp = world.split(g.dp_index, g.stage);
    out.dp = world.split(g.stage, g.dp_index);
    out.ep = world.split(g.stage * (dp / ep) + g.ep_group, g.ep_index);
    out.edp = world.split(g.stage * ep + g.ep_index, g.ep_group);
    return out;
}

}  // namespace duplex
