// The expert exchange the simulator charges: per rank of an expert-parallel group, for one MoE layer and one
// microbatch, the rows, metadata values and count messages of each of the four exchanges on each link class —
// the group's average of the moves parallel/expert_plan.hpp plans for a routing of every rank (the moves the host
// exchange sends and emulate charges).
//
//   auto v = group_traffic(experts_per_rank, tokens, top_k, ExpertPlacement(256, 64), topology, ExpertPath::NodeLimited);
//   TrafficBytes combine = v[size_t(Exchange::Combine)].bytes(/*row=*/hidden * 2.0, /*value=*/2);
#pragma once

#include <array>
#include <vector>

#include "parallel/expert_plan.hpp"
#include "runtime/model/config.hpp"

namespace duplex {

using GroupTraffic = std::array<TrafficVolume, kExchanges>;  // by Exchange, per rank (the group's mean)

// experts[rank]: the expert of each slot of that rank's `tokens` tokens.
GroupTraffic group_traffic(const std::vector<std::vector<int>>& experts, int tokens, int top_k,
                           const ExpertPlacement& placement, const Topology& group, ExpertPath path);

// The model's routing (node-limited top-K on synthetic affinities) of kSampleTokens tokens spread over an EP
// group of `ep` ranks, `gpus_per_node` to a node, planned for `path`; cached (a sweep asks for the same one
// many times). tokens_per_rank: the sample each rank routed.
GroupTraffic sampled_group_traffic(const ModelConfig& cfg, int ep, int gpus_per_node, ExpertPath path,
                                   int* tokens_per_rank);

// The traffic of `sample` tokens per rank for `tokens`: rows and values scale, count messages do not.
TrafficVolume scale_tokens(TrafficVolume v, double sample, double tokens);

}  // namespace duplex
