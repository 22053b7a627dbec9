#include "runtime/sim/expert_traffic.hpp"

#include <cmath>
#include <map>
#include <mutex>
#include <tuple>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "runtime/model/router.hpp"

namespace duplex {

GroupTraffic group_traffic(const std::vector<std::vector<int>>& experts, int tokens, int top_k,
                           const ExpertPlacement& placement, const Topology& group, ExpertPath path) {
    const int n = group.size();
    DUPLEX_CHECK_ARG(int(experts.size()) == n, "expert traffic", "{} routings for a group of {}", experts.size(), n);
    std::vector<DispatchPlan> plans;
    for (int p = 0; p < n; ++p)
        plans.push_back(plan_dispatch(path, placement.ranks_of(experts[size_t(p)]), tokens, top_k, group, p));
    GroupTraffic mean{};
    for (int me = 0; me < n; ++me) {
        ExchangeTraffic x = exchange_traffic(plans[size_t(me)], arrivals_at(plans, group, me), group, me);
        for (int e = 0; e < kExchanges; ++e) mean[size_t(e)] += traffic_volume(x.moves[size_t(e)], group, me);
    }
    for (TrafficVolume& v : mean) v *= 1.0 / n;
    return mean;
}

GroupTraffic sampled_group_traffic(const ModelConfig& cfg, int ep, int gpus_per_node, ExpertPath path,
                                   int* tokens_per_rank) {
    constexpr int kSampleTokens = 2048;
    static std::mutex m;
    static std::map<std::tuple<std::string, int, int, int, int, int>, GroupTraffic> cache;
    const int tokens = std::max(16, kSampleTokens / ep);
    *tokens_per_rank = tokens;
    auto key = std::make_tuple(cfg.name, cfg.experts, cfg.top_k, ep, gpus_per_node, int(path));
    {
        std::lock_guard<std::mutex> lock(m);
        if (auto it = cache.find(key); it != cache.end()) return it->second;
    }
    const int node_size = std::min(gpus_per_node, ep);
    Rng rng(0x5157ull);
    std::vector<std::vector<int>> experts(static_cast<size_t>(ep));
    std::vector<double> scores(size_t(tokens) * cfg.experts);
    for (auto& rank : experts) {
        for (double& s : scores) s = 1.0 / (1.0 + std::exp(-rng.normal()));
        rank = route<double>(scores.data(), std::vector<double>(cfg.experts, 0.0), tokens, cfg).expert;
    }
    GroupTraffic g = group_traffic(experts, tokens, cfg.top_k, ExpertPlacement(cfg.experts, ep),
                                   Topology::virtual_nodes(ep, ep / node_size), path);
    std::lock_guard<std::mutex> lock(m);
    cache[key] = g;
    return g;
}

TrafficVolume scale_tokens(TrafficVolume v, double sample, double tokens) {
    for (int l = 0; l < 2; ++l) {
        v.rows[l] *= tokens / sample;
        v.values[l] *= tokens / sample;
    }
    return v;
}

}  // namespace duplex
