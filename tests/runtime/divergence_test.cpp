// The divergence guard: a step whose loss or gradient norm is not finite is not applied — parameters, ZeRO-1
// moments, EMA and router bias exactly as before it — and is reported with where it started; the training loop
// stops after N such steps in a row with DivergenceError, its last checkpoint the one before, which resumes.
//
// Bad steps are planted: a wrapper around the built-in stage puts a NaN into one weight gradient of one stage on
// chosen steps (the loss stays finite: only the guard's gradient-norm check can catch it). A guard that applied
// the update anyway, updated the EMA or the moments, moved the router bias, or saved the bad step fails here.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <set>

#include <gtest/gtest.h>

#include "tests/runtime/temp_dir.hpp"

#include "comm/launch.hpp"
#include "core/error.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/train/fit.hpp"
#include "runtime/train/pipeline_trainer.hpp"

namespace duplex {
namespace {

namespace fs = std::filesystem;

struct TempDir : testing_support::TempDir {
    TempDir() : testing_support::TempDir("duplex-diverge") {}
};

// The built-in stage, with a NaN written into its last parameter's gradient after the weight gradients of
// microbatch 1 on the steps in `bad` (stage `stage` only).
class Poisoned : public Stage {
public:
    Poisoned(std::unique_ptr<Stage> inner, int stage, std::set<int> bad)
        : s_(std::move(inner)), poison_(stage), bad_(std::move(bad)) {}
    std::string name() const override { return s_->name(); }
    TensorSpec input_spec(const Microbatch& mb) const override { return s_->input_spec(mb); }
    TensorSpec output_spec(const Microbatch& mb) const override { return s_->output_spec(mb); }
    Tensor forward(const Microbatch& mb, const TensorView& x) override { return s_->forward(mb, x); }
    double loss(const Microbatch& mb) override { return s_->loss(mb); }
    Tensor backward_input(const Microbatch& mb, const TensorView& dy) override { return s_->backward_input(mb, dy); }
    void backward_weight(const Microbatch& mb) override {
        s_->backward_weight(mb);
        if (bad_.count(mb.step) && mb.id == 1 && info_stage_ == poison_) {
            std::vector<StateBuffer> state = s_->state();
            StateBuffer* last = nullptr;
            for (StateBuffer& b : state)
                if (b.kind == StateKind::Parameter) last = &b;
            last->grad.template data<double>()[0] = std::numeric_limits<double>::quiet_NaN();
            poisoned_name_ = last->name;
        }
    }
    std::vector<StateBuffer> state() override { return s_->state(); }
    void zero_grad() override { s_->zero_grad(); }
    void prepare(StageContext& ctx) override { s_->prepare(ctx); }
    std::map<std::string, std::vector<double>> take_statistics() override { return s_->take_statistics(); }
    void end_step(const std::map<std::string, std::vector<double>>& summed) override { s_->end_step(summed); }

    int info_stage_ = -1;
    std::string poisoned_name_;

private:
    std::unique_ptr<Stage> s_;
    int poison_;
    std::set<int> bad_;
};

TrainOptions options() {
    TrainOptions o;
    o.model = "tiny";
    o.microbatches = 4;
    o.sequences_per_microbatch = 2;
    o.steps = 10;
    return o;
}

PipelineOptions layout() {
    PipelineOptions p{sched::ScheduleKind::OneFOneB, /*pp=*/2, /*dp=*/2, /*ep=*/1};
    p.ema_decay = 0.9;
    p.layers = options().model_config().layers;  // a custom factory: the trainer splits these over the stages
    return p;
}

StageFactory poisoned_factory(const TrainOptions& o, std::set<int> bad) {
    StageFactory inner = builtin_stage_factory<double>(builtin_stage_options(o, "hierarchical"));
    return [inner, bad](const StageInfo& info) -> std::unique_ptr<Stage> {
        auto s = std::make_unique<Poisoned>(inner(info), /*stage=*/1, bad);
        s->info_stage_ = info.stage;
        return s;
    };
}

// The built-in model's synthetic task (a custom factory brings its own data).
std::shared_ptr<const BatchSource> batches(const TrainOptions& o) {
    ModelConfig c = o.model_config();
    return make_batch_source(o.data, c.vocab, c.seq_len, o.sequences_per_microbatch, o.seed, o.token_skew);
}

std::string file_bytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(Divergence, AStepThatIsNotFiniteIsNotAppliedAndSaysWhereItStarted) {
    TempDir dir;
    TrainOptions o = options();
    std::mutex m;
    StepMetrics bad, after;
    std::string poisoned;
    launch({.ranks = 4}, [&](const std::shared_ptr<Communicator>& world) {
        PipelineTrainer<double> t(world, layout(), o, poisoned_factory(o, {2}), batches(o));
        StepMetrics s1 = t.step();
        ASSERT_TRUE(s1.applied);
        auto params = t.owned_parameters();
        auto ema = t.ema_parameters();
        std::string first = t.save_checkpoint(dir / "run");
        StepMetrics s2 = t.step();
        EXPECT_EQ(t.owned_parameters(), params) << "parameters changed by a step that was not applied";
        EXPECT_EQ(t.ema_parameters(), ema) << "EMA changed by a step that was not applied";
        std::string second = t.save_checkpoint(dir / "run");
        // Values, ZeRO-1 moments, EMA, router bias: this rank's shard is byte for byte the one before the bad step.
        std::string shard = fmt::format("rank-{:05d}.bin", world->rank());
        EXPECT_TRUE(file_bytes(first + "/" + shard) == file_bytes(second + "/" + shard))
            << shard << " of the checkpoint after the bad step differs from the one before it";
        StepMetrics s3 = t.step();
        std::lock_guard<std::mutex> lock(m);
        if (world->rank() == 0) bad = s2, after = s3;
        if (world->rank() == 2) poisoned = dynamic_cast<Poisoned&>(*t.stages().at(1)).poisoned_name_;
    });
    EXPECT_FALSE(bad.applied);
    EXPECT_EQ(bad.bad_steps_in_a_row, 1);
    EXPECT_TRUE(std::isfinite(bad.loss)) << "the poison is in a gradient only";
    EXPECT_FALSE(std::isfinite(bad.grad_norm));
    EXPECT_NE(bad.not_applied.find("step 2 not applied"), std::string::npos) << bad.not_applied;
    EXPECT_NE(bad.not_applied.find("every loss is finite"), std::string::npos) << bad.not_applied;
    // Stage 1 lives on pipeline rank 1: world ranks 2 and 3 (DP 2); the lower of the two is named.
    ASSERT_FALSE(poisoned.empty());
    EXPECT_NE(bad.not_applied.find(fmt::format("stage 1 on rank 2, parameter '{}'", poisoned)), std::string::npos)
        << bad.not_applied;
    EXPECT_TRUE(after.applied);
    EXPECT_EQ(after.bad_steps_in_a_row, 0);
    EXPECT_TRUE(std::isfinite(after.grad_norm));
}

TEST(Divergence, FitStopsAfterNBadStepsInARowAndTheCheckpointBeforeResumes) {
    TempDir dir;
    TrainOptions o = options();
    std::mutex m;
    std::string error;
    std::vector<long> saved;
    launch({.ranks = 4}, [&](const std::shared_ptr<Communicator>& world) {
        PipelineTrainer<double> t(world, layout(), o, poisoned_factory(o, {3, 4, 5, 6, 7, 8, 9, 10}), batches(o));
        FitOptions f;
        f.steps = 10, f.save = dir / "run", f.save_every = 1, f.max_bad_steps = 2;
        FitCallbacks cb;
        cb.on_save = [&](const std::string&, const char*, double) {
            std::lock_guard<std::mutex> lock(m);
            if (world->rank() == 0) saved.push_back(t.steps_done());
        };
        try {
            fit(t, f, cb);
        } catch (const DivergenceError& e) {
            std::lock_guard<std::mutex> lock(m);
            if (world->rank() == 0) error = e.what();
        }
    });
    EXPECT_EQ(saved, (std::vector<long>{1, 2})) << "bad steps are not checkpointed, nor is the end of a stopped run";
    EXPECT_NE(error.find("stopped after 2 step(s) in a row"), std::string::npos) << error;
    EXPECT_NE(error.find("step 4 not applied"), std::string::npos) << error;
    EXPECT_EQ(ckpt::latest_checkpoint(dir / "run").value_or(""), dir / "run/step-00000002");

    // The checkpoint before resumes, without the poison, and trains on.
    std::vector<StepMetrics> resumed;
    launch({.ranks = 4}, [&](const std::shared_ptr<Communicator>& world) {
        PipelineTrainer<double> t(world, layout(), o, poisoned_factory(o, {}), batches(o));
        FitOptions f;
        f.steps = 4, f.resume = dir / "run";
        FitCallbacks cb;
        cb.on_step = [&](const StepMetrics& s) {
            std::lock_guard<std::mutex> lock(m);
            if (world->rank() == 0) resumed.push_back(s);
        };
        fit(t, f, cb);
    });
    ASSERT_EQ(resumed.size(), 2u);
    EXPECT_EQ(resumed[0].step, 3);
    for (const StepMetrics& s : resumed) EXPECT_TRUE(s.applied && std::isfinite(s.loss)) << "step " << s.step;

    FitOptions negative;
    negative.max_bad_steps = -1;
    EXPECT_THROW(negative.validate(), ConfigError);
}

}  // namespace
}  // namespace duplex
