// The run plan, each formula in one function: how many ranks a schedule needs, the layer split over stages,
// the world a layout takes and whether it can run. The trainer, the executor's stages, emulate mode and the
// simulator call these; none recomputes them. The expert-parallel plan is parallel/expert_plan.hpp.
//
//   RunPlan plan{sched::ScheduleKind::DualPipeV, /*pp=*/8, /*dp=*/2, /*ep=*/2};
//   plan.pipeline_ranks() == 4;   plan.world_size() == 8;   plan.layers_of_stage(3, 61) == LayerRange{22, 8};
#pragma once

#include <vector>

#include "parallel/schedule.hpp"

namespace duplex {

// Pipeline ranks a schedule needs for `pp` model stages: DualPipeV folds two stages on each rank, Interleaved
// `vpp` stages.
int pipeline_ranks(sched::ScheduleKind kind, int pp, int vpp = 1);

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
    int vpp = 1;  // model stages per rank, Interleaved only
    int pipeline_ranks() const { return duplex::pipeline_ranks(schedule, pp, vpp); }
    int world_size() const { return pipeline_ranks() * dp; }
    LayerRange layers_of_stage(int s, int layers) const { return duplex::layers_of_stage(s, pp, layers); }
    // ConfigError naming what is wrong (pp < 1, a schedule's own constraints, ep not dividing dp or the experts).
    void validate(int microbatches, int experts) const;
};

}  // namespace duplex
