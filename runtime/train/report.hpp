// What a distributed run reports beside its steps, computed here so every entry point (`duplex train`, a framework
// embedding the trainer) reports the same: the schedule replay's prediction of an emulated step, the expert
// traffic against the node-limited bound, a single-rank reference stepping beside the run, and the EMA's loss on a
// held-out batch.
//
//   EmulatePrediction e = predict_emulated_step(p, o, sizeof(float));   // e.step_s, e.chunk.f, ...
//   ReferenceCheck<float> ref(o, p);  ... ref.step(m.loss) each step ...  auto r = ref.finish(params, false);
#pragma once

#include <map>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "runtime/sim/cost_model.hpp"
#include "runtime/train/pipeline_trainer.hpp"
#include "runtime/train/reference.hpp"
#include "runtime/train/trainer.hpp"

namespace duplex {

// An emulated step as the schedule replay predicts it: the chunk costs of a middle stage (its own layers,
// recompute or not, or the given costs) and one activation's transfer over an intra-node link.
struct EmulatePrediction {
    ChunkCosts chunk;
    double transfer_s = 0;
    double step_s = 0;
};
EmulatePrediction predict_emulated_step(const PipelineOptions& p, const TrainOptions& o, size_t elem_bytes);

// The expert exchanges' bytes of a whole run (summed over the world), and the inter-node ones per token, MoE
// layer and direction (dispatch, combine and their two gradients) against the node-limited bound
// M x hidden x element size.
struct ExpertTrafficReport {
    LinkBytes bytes;
    double inter_node_per_token_direction = 0;
    double node_limited_bound = 0;
};
ExpertTrafficReport expert_traffic_report(const LinkBytes& world_bytes, const PipelineOptions& p, const TrainOptions& o,
                                          long steps_run, size_t elem_bytes);

// The single-rank reference beside a distributed run of the same global batch (on one rank): each step's loss
// compared as it comes, the parameters at the end, against the tolerance of the run's precision and layout.
template <typename T>
class ReferenceCheck {
public:
    ReferenceCheck(const TrainOptions& o, const PipelineOptions& p);
    // Steps the reference; returns its loss and keeps the worst relative difference from the run's `loss`.
    double step(double loss);
    struct Result {
        double worst_loss_diff = 0;
        ParamDiff params;
        Tolerance tolerance;
        bool ok = true;
    };
    // The run's parameters (every owned one, gathered) against the reference's.
    Result finish(const std::map<std::string, std::vector<T>>& params, bool on_gpu);

private:
    ReferenceTrainer<T> ref_;
    int ep_;
    double worst_ = 0;
};

// The loss of the trained weights and of their EMA on a held-out batch of the synthetic task (8 sequences).
struct EmaEvaluation {
    double live = 0, smoothed = 0;
};
template <typename T>
EmaEvaluation evaluate_ema(const ModelConfig& c, uint64_t seed, const std::map<std::string, std::vector<T>>& params,
                           const std::map<std::string, std::vector<T>>& ema);

}  // namespace duplex
