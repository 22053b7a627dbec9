// The forward-only pass (PipelineTrainer::evaluate, Executor::run_forward): on the built-in model under DualPipe
// (F&B pairs, both directions) and 1F1B with EP = 2, its losses equal the ones the training step computes on the
// same batch with the same weights, bit for bit; it keeps no activations; and it leaves training as it was — the
// step after an evaluation equals the step of a run that never evaluated (weights, router bias: the evaluation's
// expert counts must not reach the bias update).
#include <mutex>

#include <gtest/gtest.h>

#include "comm/launch.hpp"
#include "runtime/model/builtin_stage.hpp"
#include "runtime/train/pipeline_trainer.hpp"

namespace duplex {
namespace {

struct Seen {
    std::vector<double> eval, step1, step2, step3;
    std::map<std::string, std::vector<double>> params;
    int64_t live_activations = -1;
};

Seen run(sched::ScheduleKind kind, bool evaluate) {
    TrainOptions o;
    o.model = "tiny";
    o.microbatches = 4;
    o.sequences_per_microbatch = 2;
    PipelineOptions p{kind, /*pp=*/2, /*dp=*/2, /*ep=*/2};
    std::mutex m;
    Seen seen;
    launch({.ranks = kind == sched::ScheduleKind::DualPipeV ? 2 : 4}, [&](const std::shared_ptr<Communicator>& world) {
        PipelineTrainer<double> t(world, p, o);
        Seen mine;
        if (evaluate) {
            mine.eval = t.evaluate(1).losses;  // the batch step 1 trains on, with the initial weights
            int64_t live = 0;
            for (auto& [s, st] : t.stages()) live += dynamic_cast<BuiltinStage<double>&>(*st).model().ledger().live("activations");
            mine.live_activations = live;
        }
        mine.step1 = t.step().losses;
        if (evaluate) t.evaluate(7);  // another batch than step 2 trains on: its expert loads differ
        mine.step2 = t.step().losses;
        mine.step3 = t.step().losses;  // with the router bias step 2's loads set
        auto params = t.owned_parameters();
        std::lock_guard<std::mutex> lock(m);
        for (auto& [k, v] : params) seen.params[k] = v;
        if (world->rank() == 0) {
            seen.eval = mine.eval, seen.step1 = mine.step1, seen.step2 = mine.step2, seen.step3 = mine.step3;
            seen.live_activations = mine.live_activations;
        }
    });
    return seen;
}

class Evaluate : public ::testing::TestWithParam<sched::ScheduleKind> {};

TEST_P(Evaluate, LossesEqualTheTrainingForwardAndTrainingIsUntouched) {
    Seen with = run(GetParam(), true), without = run(GetParam(), false);
    ASSERT_EQ(with.eval.size(), 8u);  // DP 2 x 4 microbatches
    EXPECT_EQ(with.eval, with.step1) << "an evaluation of the batch step 1 trains on, before it, gives its losses";
    EXPECT_EQ(with.live_activations, 0) << "activations kept after a forward-only pass";
    EXPECT_EQ(with.step1, without.step1);
    EXPECT_EQ(with.step2, without.step2) << "an evaluation between steps changed the next step";
    EXPECT_EQ(with.step3, without.step3) << "an evaluation's expert loads reached the router-bias update";
    EXPECT_EQ(with.params, without.params);
}

INSTANTIATE_TEST_SUITE_P(Schedules, Evaluate,
                         ::testing::Values(sched::ScheduleKind::OneFOneB, sched::ScheduleKind::DualPipe),
                         [](const auto& info) { return std::string(sched::kind_name(info.param)); });

}  // namespace
}  // namespace duplex
