// A stage's step-end gradient synchronization, as the simulator (runtime/sim/step_end.cpp) and emulate mode (the
// pipeline trainer's timed sync) both charge it: DualPipe's pair sum of the two copies' fp32 gradients with the
// partner rank, then ZeRO-1's ring reduce-scatter of fp32 gradients and all-gather of BF16 weights over the dense
// parameters' data-parallel group and the experts' expert-DP group.
//
//   StageParams p = stage_params(cfg, first_layer, layers, stage == 0, stage == S - 1, ep);
//   double s = stage_sync_s(cost_model, p, dp, dp / ep, LinkClass::InterNode, /*pair_sum=*/false, LinkClass::Self);
#pragma once

#include "runtime/model/config.hpp"
#include "runtime/sim/cost_model.hpp"

namespace duplex {

struct StageParams {
    double dense = 0;    // parameters a GPU holds of the stage's dense part (embedding, head, attention, FFN, router)
    double experts = 0;  // of its routed experts
};

// Layers [first, first + n): the embedding with the first stage, the head and the MTP modules with the last; dense
// parameters over TP, routed experts over EP x ETP.
StageParams stage_params(const ModelConfig& c, int first, int n, bool first_stage, bool last_stage, int ep, int tp = 1,
                         int etp = 1);

// Ring reduce-scatter or all-gather of `bytes` over n ranks.
double ring_s(const CostModel& cm, double bytes, int n, LinkClass link);

// Seconds of the stage's synchronization (the pair sum only with pair_sum).
double stage_sync_s(const CostModel& cm, const StageParams& p, int dense_dp, int edp, LinkClass dp_link, bool pair_sum,
                    LinkClass pair_link);

}  // namespace duplex
