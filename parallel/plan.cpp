#include "parallel/plan.hpp"

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

int pipeline_ranks(sched::ScheduleKind kind, int pp, int vpp) {
    if (kind == sched::ScheduleKind::DualPipeV) return pp / 2;
    if (sched::is_interleaved(kind)) return vpp >= 1 ? pp / vpp : pp;
    return pp;
}

LayerRange layers_of_stage(int s, int pp, int layers) {
    DUPLEX_CHECK_ARG(pp >= 1 && s >= 0 && s < pp, "layer split", "stage {} of {}", s, pp);
    int first = int(int64_t(s) * layers / pp), next = int(int64_t(s + 1) * layers / pp);
    return {first, next - first};
}

void RunPlan::validate(int microbatches, int experts) const {
    DUPLEX_CHECK_ARG(pp >= 1, "--pp", "needs at least 1 pipeline stage, got {}", pp);
    DUPLEX_CHECK_ARG(dp >= 1, "--dp", "needs at least 1 data-parallel replica, got {}", dp);
    DUPLEX_CHECK_ARG(ep >= 1, "--ep", "needs at least 1, got {}", ep);
    sched::check_arguments(schedule, pp, microbatches, vpp);
    DUPLEX_CHECK_ARG(dp % ep == 0, "--ep", "EP={} must divide DP={} (expert groups live inside data parallelism)", ep, dp);
    DUPLEX_CHECK_ARG(experts % ep == 0, "--ep", "EP={} must divide the {} routed experts", ep, experts);
}

}  // namespace duplex
