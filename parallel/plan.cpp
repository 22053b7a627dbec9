#include "parallel/plan.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

int pipeline_ranks(sched::ScheduleKind kind, int pp) { return kind == sched::ScheduleKind::DualPipeV ? pp / 2 : pp; }

LayerRange layers_of_stage(int s, int pp, int layers) {
    DUPLEX_CHECK_ARG(pp >= 1 && s >= 0 && s < pp, "layer split", "stage {} of {}", s, pp);
    int first = int(int64_t(s) * layers / pp), next = int(int64_t(s + 1) * layers / pp);
    return {first, next - first};
}

void RunPlan::validate(int microbatches, int experts) const {
    DUPLEX_CHECK_ARG(pp >= 1, "--pp", "needs at least 1 pipeline stage, got {}", pp);
    DUPLEX_CHECK_ARG(dp >= 1, "--dp", "needs at least 1 data-parallel replica, got {}", dp);
    DUPLEX_CHECK_ARG(ep >= 1, "--ep", "needs at least 1, got {}", ep);
    sched::check_arguments(schedule, pp, microbatches);
    DUPLEX_CHECK_ARG(dp % ep == 0, "--ep", "EP={} must divide DP={} (expert groups live inside data parallelism)", ep, dp);
    DUPLEX_CHECK_ARG(experts % ep == 0, "--ep", "EP={} must divide the {} routed experts", ep, experts);
}

ExpertPlacement::ExpertPlacement(int experts, int ranks) : experts_(experts), ranks_(ranks) {
    DUPLEX_CHECK_ARG(ranks >= 1 && experts >= 1 && experts % ranks == 0, "expert placement",
                     "{} experts do not split evenly over {} ranks", experts, ranks);
    per_rank_ = experts / ranks;
}

int ExpertPlacement::relay(int expert, int me, const Topology& t) const {
    const std::vector<int>& on = t.ranks_on_node(node_of(expert, t));
    int local = t.local_rank(me);
    DUPLEX_CHECK_ARG(local < int(on.size()), "expert placement", "rank {} has local index {} but node {} has {} ranks",
                     me, local, node_of(expert, t), on.size());
    return on[local];
}

DispatchPlan plan_dispatch(const std::vector<int>& expert, int tokens, int top_k, const ExpertPlacement& pl,
                           const Topology& t, int me) {
    int n = pl.ranks();
    DispatchPlan d;
    d.slots_to.assign(n, 0);
    d.rows_to_relay.assign(n, 0);
    int local = t.local_size(t.node(me));
    d.slots_via_relay.assign(n, std::vector<int>(local, 0));
    std::vector<int> relays;
    for (int tok = 0; tok < tokens; ++tok) {
        relays.clear();
        for (int k = 0; k < top_k; ++k) {
            int e = expert[size_t(tok) * top_k + k], owner = pl.rank_of(e), relay = pl.relay(e, me, t);
            ++d.slots_to[owner];
            if (std::find(relays.begin(), relays.end(), relay) == relays.end()) relays.push_back(relay), ++d.rows_to_relay[relay];
            ++d.slots_via_relay[relay][t.local_rank(owner)];
        }
    }
    return d;
}

long node_crossings(const std::vector<int>& expert, int tokens, int top_k, const ExpertPlacement& pl, const Topology& t) {
    long rows = 0;
    std::vector<int> nodes;
    for (int tok = 0; tok < tokens; ++tok) {
        nodes.clear();
        for (int k = 0; k < top_k; ++k) {
            int node = pl.node_of(expert[size_t(tok) * top_k + k], t);
            if (std::find(nodes.begin(), nodes.end(), node) == nodes.end()) nodes.push_back(node);
        }
        rows += long(nodes.size());
    }
    return rows;
}

}  // namespace duplex
