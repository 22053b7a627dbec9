// Trains a model of one's own (a StageFactory) on a layout through PipelineTrainer<double> on in-process ranks:
// rank 0's losses per step and every owned parameter by name — what the Stage-contract tests compare between a
// distributed layout and its single-rank run.
#pragma once

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "comm/launch.hpp"
#include "parallel/plan.hpp"
#include "runtime/train/pipeline_trainer.hpp"

namespace duplex::testing_support {

struct CustomRun {
    std::vector<double> losses;
    std::map<std::string, std::vector<double>> params;
};

// vpp: interleaved's model stages per rank (1 for every other schedule).
inline CustomRun train_custom(sched::ScheduleKind kind, int pp, int dp, int layers, const TrainOptions& o, int steps,
                              const StageFactory& factory, int vpp = 1) {
    PipelineOptions p{kind, pp, dp, 1, vpp};
    p.layers = layers;
    LaunchOptions l;
    l.ranks = pipeline_ranks(kind, pp, vpp) * dp;
    l.timeout_s = 60;
    CustomRun out;
    std::mutex m;
    launch(l, [&](const std::shared_ptr<Communicator>& world) {
        PipelineTrainer<double> t(world, p, o, factory);
        std::vector<double> losses;
        for (int s = 0; s < steps; ++s) losses.push_back(t.step().loss);
        auto owned = t.owned_parameters();
        std::lock_guard<std::mutex> lock(m);
        if (world->rank() == 0) out.losses = losses;
        for (auto& [name, v] : owned) out.params[name] = v;
    });
    return out;
}

}  // namespace duplex::testing_support
