// The Stage contract: a model that is not Duplex's trains under every schedule through the one executor and
// equals its single-rank run; a stage that breaks the contract gets an error naming it, never a hang.
#include <cmath>
#include <mutex>

#include <gtest/gtest.h>

#include "comm/launch.hpp"
#include "core/dlpack.hpp"
#include "examples/custom_stage/mlp_stage.hpp"
#include "parallel/plan.hpp"
#include "runtime/train/pipeline_trainer.hpp"
#include "runtime/train/reference.hpp"
#include "tests/runtime/custom_run.hpp"

namespace duplex {
namespace {

using sched::ScheduleKind;

using MlpRun = testing_support::CustomRun;

// Trains the MLP for `steps` on the layout; returns rank 0's losses and every owned parameter.
MlpRun train_mlp(ScheduleKind kind, int pp, int dp, int microbatches, int steps, const mlp::Config& mc) {
    TrainOptions o;
    o.microbatches = microbatches;
    o.lr = 1e-2;
    o.clip = 0.5;
    o.steps = std::max(steps, 1);  // validated; the loop runs `steps`
    return testing_support::train_custom(
        kind, pp, dp, mc.layers, o, steps,
        [mc](const StageInfo& info) { return std::make_unique<mlp::MlpStage>(mc, info); },
        kind == ScheduleKind::Interleaved ? 2 : 1);  // interleaved: 4 stages on 2 ranks
}

class CustomStage : public ::testing::TestWithParam<ScheduleKind> {};

TEST_P(CustomStage, DistributedEqualsItsSingleRankRun) {
    mlp::Config mc;
    const int pp = 4, dp = 2, n = 8, steps = 3;
    MlpRun dist = train_mlp(GetParam(), pp, dp, n, steps, mc);
    MlpRun single = train_mlp(ScheduleKind::OneFOneB, 1, 1, n * dp, steps, mc);
    ASSERT_EQ(dist.losses.size(), size_t(steps));
    EXPECT_GT(single.losses[0], 0.0);
    for (int s = 0; s < steps; ++s)
        EXPECT_NEAR(dist.losses[s], single.losses[s], 1e-12 * std::fabs(single.losses[s])) << "step " << s + 1;
    ParamDiff d = compare_parameters(dist.params, single.params);
    EXPECT_TRUE(d.missing.empty());
    EXPECT_LE(d.worst, 1e-12) << d.worst_name;
    EXPECT_EQ(dist.params.size(), size_t(2 * mc.layers));
    // Training moved the weights: an executor that skipped W would leave them where they started.
    MlpRun none = train_mlp(ScheduleKind::OneFOneB, 1, 1, n * dp, 0, mc);
    EXPECT_GT(compare_parameters(single.params, none.params).worst, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Schedules, CustomStage,
                         ::testing::Values(ScheduleKind::OneFOneB, ScheduleKind::ZB1P, ScheduleKind::DualPipe,
                                           ScheduleKind::DualPipeV, ScheduleKind::Interleaved),
                         [](const auto& info) { return std::string(sched::kind_name(info.param)); });

// Stage 1 of 2 returns one row too few from forward.
class ShortStage : public mlp::MlpStage {
public:
    using mlp::MlpStage::MlpStage;
    Tensor forward(const Microbatch& mb, const TensorView& input) override {
        Tensor t = mlp::MlpStage::forward(mb, input);
        if (!t.defined() || mb.id != 3) return t;
        return Tensor::copy_of(TensorView(t.raw(), t.dtype(), {t.shape()[0] - 1, t.shape()[1]}));
    }
};

TEST(StageContract, AWrongShapeIsAnErrorNamingStageMicrobatchAndShapes) {
    mlp::Config mc;
    PipelineOptions p{ScheduleKind::OneFOneB, 2, 1, 1};
    p.layers = mc.layers;
    TrainOptions o;
    o.microbatches = 4;
    StageFactory f = [mc](const StageInfo& info) -> std::unique_ptr<Stage> {
        if (info.stage == 0) return std::make_unique<ShortStage>(mc, info);
        return std::make_unique<mlp::MlpStage>(mc, info);
    };
    LaunchOptions l;
    l.ranks = 2;
    l.timeout_s = 30;
    try {
        launch(l, [&](const std::shared_ptr<Communicator>& world) {
            PipelineTrainer<double> t(world, p, o, f);
            t.step();
        });
        FAIL() << "a wrong shape went through";
    } catch (const Error& e) {
        std::string what = e.what();
        EXPECT_NE(what.find("mlp stage 0, microbatch 3: forward returned double[7, 16]"), std::string::npos) << what;
        EXPECT_NE(what.find("expected double[8, 16] on cpu"), std::string::npos) << what;
    }
}

TEST(StageContract, ParametersOfAnotherDtypeAreRefusedNamingTheBuffer) {
    mlp::Config mc;
    PipelineOptions p{ScheduleKind::OneFOneB, 1, 1, 1};
    p.layers = mc.layers;
    TrainOptions o;
    StageFactory f = [mc](const StageInfo& info) { return std::make_unique<mlp::MlpStage>(mc, info); };
    LaunchOptions l;
    l.ranks = 1;
    try {
        launch(l, [&](const std::shared_ptr<Communicator>& world) { PipelineTrainer<float> t(world, p, o, f); });
        FAIL() << "f64 parameters went into an f32 trainer";
    } catch (const StageError& e) {
        EXPECT_NE(std::string(e.what()).find("parameter 'layer0.w' is double[16, 16]"), std::string::npos) << e.what();
    }
}

TEST(Tensor, DlpackRoundTripSharesMemoryAndReleasesIt) {
    bool released = false;
    {
        auto values = std::make_shared<std::vector<float>>(std::vector<float>{1, 2, 3, 4, 5, 6});
        Tensor t = Tensor::wrap(values->data(), DType::F32, {2, 3}, Device::cpu(), values);
        DLManagedTensor* m = to_dlpack(t);
        Tensor back = from_dlpack(m);  // takes ownership of m
        EXPECT_EQ(back.raw(), values->data());
        EXPECT_EQ(back.shape(), (Shape{2, 3}));
        EXPECT_EQ(back.dtype(), DType::F32);
        back.data<float>()[4] = 50;
        EXPECT_EQ((*values)[4], 50);
        std::weak_ptr<std::vector<float>> watch = values;
        values.reset();
        t = Tensor();
        EXPECT_FALSE(watch.expired());  // `back` still holds it through the capsule
        back = Tensor();
        released = watch.expired();
    }
    EXPECT_TRUE(released);
}

TEST(Tensor, WrapRefusesAShapeLargerThanItsMemory) {
    auto v = std::make_shared<std::vector<double>>(5);
    EXPECT_THROW(Tensor::wrap(v->data(), DType::F64, {2, 3}, Device::cpu(), v, 5), ConfigError);
    Tensor m = Tensor::meta(DType::F32, {4096, 7168});
    EXPECT_TRUE(m.is_meta());
    EXPECT_FALSE(m.defined());
    EXPECT_EQ(m.nbytes(), size_t(4096) * 7168 * 4);
}

}  // namespace
}  // namespace duplex
