// The reference trainer: it learns, it is deterministic, aux-loss-free balancing works, recompute is exact.
#include "runtime/train/trainer.hpp"

#include <algorithm>

#include <gtest/gtest.h>

#include "core/error.hpp"
#include "runtime/device/device_experts.hpp"

namespace duplex {
namespace {

TEST(Trainer, TinyModelLearnsTheTaskBelowFortyPercentOfTheInitialLoss) {
    TrainOptions o;
    o.model = "tiny";
    o.steps = 300;
    ReferenceTrainer<float> t(o);
    auto m = t.run();
    EXPECT_NEAR(m.front().loss, std::log(64.0), 0.3);  // uniform guessing at the start
    EXPECT_LT(m.back().loss, 0.4 * m.front().loss);
}

TEST(Trainer, DeterministicForASeed) {
    TrainOptions o;
    o.steps = 15;
    auto run = [&](uint64_t seed) {
        o.seed = seed;
        ReferenceTrainer<float> t(o);
        std::vector<double> l;
        for (auto& m : t.run()) l.push_back(m.loss);
        return l;
    };
    EXPECT_EQ(run(3), run(3));
    EXPECT_NE(run(3), run(4));
}

TEST(Trainer, RecomputeOnAndOffGiveIdenticalLosses) {
    TrainOptions o;
    o.steps = 10;
    ReferenceTrainer<float> a(o);
    o.recompute = true;
    ReferenceTrainer<float> b(o);
    auto ma = a.run(), mb = b.run();
    for (size_t i = 0; i < ma.size(); ++i) EXPECT_EQ(ma[i].loss, mb[i].loss) << "step " << i + 1;
    EXPECT_LT(b.model().ledger().peak("activations"), a.model().ledger().peak("activations"));
}

// Skewed inputs overload some experts; the bias update rebalances them, a frozen bias does not.
TEST(Trainer, AuxLossFreeBalancingBringsMaxVioDown) {
    TrainOptions o;
    o.steps = 300;
    o.sequences_per_microbatch = 16;
    o.token_skew = 0.8;
    o.bias_update_speed = 0.01;
    auto min_late_vio = [&](bool update) {
        o.bias_update = update;
        ReferenceTrainer<float> t(o);
        auto m = t.run();
        double best = 1e9;
        for (size_t i = m.size() / 2; i < m.size(); ++i) best = std::min(best, m[i].max_vio);
        return std::make_pair(m.front().max_vio, best);
    };
    auto [start_on, with_update] = min_late_vio(true);
    auto [start_off, frozen] = min_late_vio(false);
    EXPECT_GT(start_on, 0.5);  // the skew is real
    EXPECT_LT(with_update, 0.2);
    EXPECT_GT(frozen, 0.5);
}

TEST(Trainer, BadOptionsAreRejected) {
    TrainOptions o;
    o.steps = 0;
    EXPECT_THROW(ReferenceTrainer<float>{o}, ConfigError);
    o = TrainOptions{};
    o.model = "gigantic";
    EXPECT_THROW(ReferenceTrainer<float>{o}, ConfigError);
}

// --experts-on: cpu, cuda or cuda:N; the CUDA path is fp32 and needs a device (its math is checked against the CPU
// in tests/cuda/stage_test.cpp, on a GPU).
TEST(Trainer, DeviceChoicesAreChecked) {
    TrainOptions o;
    EXPECT_EQ(o.device_index(3), -1);
    o.device = "gpu";
    EXPECT_THROW(o.validate(), ConfigError);
    EXPECT_THROW(ReferenceTrainer<float>{o}, ConfigError);
    o.device = "cuda:x";
    EXPECT_THROW(o.device_index(0), ConfigError);
    o.device = "cuda:9999";
    EXPECT_THROW(o.device_index(0), ConfigError);
    o.device = "cuda";
    o.steps = 1;
    EXPECT_THROW(ReferenceTrainer<double>{o}, ConfigError);  // fp32 only (or no device here)
    if (!device_experts_available()) {
        EXPECT_THROW(o.device_index(0), ConfigError);
        EXPECT_THROW(ReferenceTrainer<float>{o}, ConfigError);
    }
    // The exchange on the GPU: a known place, the experts on a GPU, and a positive SM budget.
    TrainOptions e;
    e.exchange_on = "gpu";
    EXPECT_THROW(e.validate(), ConfigError);
    e.exchange_on = "cuda";
    EXPECT_THROW(e.validate(), ConfigError);  // --experts-on cpu
    e.device = "cuda";
    EXPECT_NO_THROW(e.validate());
    e.comm_sms = 0;
    EXPECT_THROW(e.validate(), ConfigError);
}

}  // namespace
}  // namespace duplex
