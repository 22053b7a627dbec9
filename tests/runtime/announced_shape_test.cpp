// Shapes announced with the microbatch (TensorSpec::kAnnounced): a stage whose activation has a different number of
// rows in every microbatch and step trains under every schedule equal to its single-rank run; an announcement that
// does not fit the receiver's spec is an error naming both.
#include <cmath>
#include <mutex>

#include <gtest/gtest.h>

#include "comm/launch.hpp"
#include "examples/custom_stage/mlp_stage.hpp"
#include "runtime/exec/pipe_transport.hpp"
#include "runtime/train/pipeline_trainer.hpp"
#include "runtime/train/reference.hpp"
#include "tests/runtime/custom_run.hpp"

namespace duplex {
namespace {

using sched::ScheduleKind;
constexpr int kWidth = 6, kLayers = 4;

// Rows of microbatch (step, global): 2..5, so every step and microbatch differs from its neighbours.
int64_t rows_of(const Microbatch& mb) { return 2 + (mb.global * 3 + mb.step) % 4; }

// Per layer y = tanh(x * w + b), element-wise over [rows, kWidth]; loss 0.5 * mean over rows of |y - target|^2.
class RowsStage : public Stage {
public:
    explicit RowsStage(const StageInfo& info) : info_(info) {
        for (int l = info.first_layer; l < info.first_layer + info.num_layers; ++l) {
            layers_.push_back({l, std::vector<double>(kWidth), std::vector<double>(kWidth, 0.1), {}, {}});
            for (int j = 0; j < kWidth; ++j) layers_.back().w[j] = 0.5 + mlp::hash_unit(3, l, j) * 0.4;
            layers_.back().dw.assign(kWidth, 0), layers_.back().db.assign(kWidth, 0);
        }
    }
    std::string name() const override { return "rows stage " + std::to_string(info_.stage); }
    TensorSpec input_spec(const Microbatch&) const override {
        return {DType::F64, {TensorSpec::kAnnounced, kWidth}, Device::cpu()};
    }
    TensorSpec output_spec(const Microbatch& mb) const override { return input_spec(mb); }
    Tensor forward(const Microbatch& mb, const TensorView& input) override {
        int64_t rows = rows_of(mb);
        std::vector<double> x(size_t(rows) * kWidth);
        if (info_.stage == 0) {
            for (size_t i = 0; i < x.size(); ++i) x[i] = mlp::hash_unit(5, uint64_t(mb.step) * 1000 + mb.global, i);
        } else {
            EXPECT_EQ(input.shape()[0], rows) << "the announced rows";
            x.assign(input.data<double>(), input.data<double>() + input.numel());
        }
        auto& st = stash_[mb.id];
        for (const Layer& L : layers_) {
            st.ys.push_back(x);  // the input of each layer, then its output last
            for (size_t i = 0; i < x.size(); ++i) x[i] = std::tanh(x[i] * L.w[i % kWidth] + L.b[i % kWidth]);
        }
        st.ys.push_back(x);
        if (info_.stage < info_.num_stages - 1) return Tensor::from_vector(std::move(x), {rows, kWidth});
        st.loss = 0;
        st.dout.resize(x.size());
        for (size_t i = 0; i < x.size(); ++i) {
            double t = 0.3 * std::cos(double(i));
            st.loss += 0.5 * (x[i] - t) * (x[i] - t) / double(rows);
            st.dout[i] = (x[i] - t) / double(rows) * info_.loss_scale;
        }
        return {};
    }
    double loss(const Microbatch& mb) override { return stash_[mb.id].loss; }
    Tensor backward_input(const Microbatch& mb, const TensorView& grad) override {
        auto& st = stash_[mb.id];
        std::vector<double> dy = info_.stage == info_.num_stages - 1
                                     ? st.dout
                                     : std::vector<double>(grad.data<double>(), grad.data<double>() + grad.numel());
        for (size_t l = layers_.size(); l-- > 0;) {
            Layer& L = layers_[l];
            const std::vector<double>&x = st.ys[l], &y = st.ys[l + 1];
            for (size_t i = 0; i < dy.size(); ++i) {
                double dz = dy[i] * (1 - y[i] * y[i]);
                L.dw[i % kWidth] += dz * x[i], L.db[i % kWidth] += dz;
                dy[i] = dz * L.w[i % kWidth];
            }
        }
        stash_.erase(mb.id);
        if (info_.stage == 0) return {};
        int64_t rows = rows_of(mb);
        return Tensor::from_vector(std::move(dy), {rows, kWidth});
    }
    void backward_weight(const Microbatch&) override {}  // accumulated in B
    std::vector<StateBuffer> state() override {
        std::vector<StateBuffer> out;
        for (Layer& L : layers_) {
            std::string p = "layer" + std::to_string(L.index);
            out.push_back({p + ".w", StateKind::Parameter, TensorView::of(L.w), TensorView::of(L.dw), false, false});
            out.push_back({p + ".b", StateKind::Parameter, TensorView::of(L.b), TensorView::of(L.db), false, false});
        }
        return out;
    }

private:
    struct Layer {
        int index;
        std::vector<double> w, b, dw, db;
    };
    struct Stash {
        std::vector<std::vector<double>> ys;
        std::vector<double> dout;
        double loss = 0;
    };
    StageInfo info_;
    std::vector<Layer> layers_;
    std::map<int, Stash> stash_;  // a stage's calls never overlap (the two halves of a pair are two stages)
};

using testing_support::CustomRun;

CustomRun train(ScheduleKind kind, int pp, int dp, int microbatches, int steps) {
    TrainOptions o;
    o.microbatches = microbatches, o.lr = 0.05, o.clip = 0;
    return testing_support::train_custom(kind, pp, dp, kLayers, o, steps,
                                         [](const StageInfo& info) { return std::make_unique<RowsStage>(info); });
}

class AnnouncedShapes : public ::testing::TestWithParam<ScheduleKind> {};

TEST_P(AnnouncedShapes, RowsChangingEveryMicrobatchTrainEqualToOneRank) {
    const int pp = 4, dp = 2, n = 8, steps = 3;
    CustomRun dist = train(GetParam(), pp, dp, n, steps);
    CustomRun single = train(ScheduleKind::OneFOneB, 1, 1, n * dp, steps);
    ASSERT_EQ(dist.losses.size(), size_t(steps));
    for (int s = 0; s < steps; ++s)
        EXPECT_NEAR(dist.losses[s], single.losses[s], 1e-12 * std::fabs(single.losses[s])) << "step " << s + 1;
    ParamDiff d = compare_parameters(dist.params, single.params);
    EXPECT_TRUE(d.missing.empty());
    EXPECT_LE(d.worst, 1e-12) << d.worst_name;
    EXPECT_GT(compare_parameters(single.params, train(ScheduleKind::OneFOneB, 1, 1, n * dp, 0).params).worst, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Schedules, AnnouncedShapes,
                         ::testing::Values(ScheduleKind::OneFOneB, ScheduleKind::ZB1P, ScheduleKind::DualPipe,
                                           ScheduleKind::DualPipeV),
                         [](const auto& info) { return std::string(sched::kind_name(info.param)); });

TEST(AnnouncedShapes, AnAnnouncementThatDoesNotFitIsAnErrorNamingBoth) {
    LaunchOptions l;
    l.ranks = 2;
    l.timeout_s = 30;
    std::string error;
    std::mutex m;
    launch(l, [&](const std::shared_ptr<Communicator>& world) {
        CommPipeTransport t(world);
        if (world->rank() == 0) {
            t.send_announced(Tensor::zeros(DType::F64, {3, 5}), 1, 7);
            t.drain();
            return;
        }
        try {
            t.recv_announced({DType::F64, {TensorSpec::kAnnounced, 4}, Device::cpu()}, 0, 7);
        } catch (const ConfigError& e) {
            std::lock_guard<std::mutex> lock(m);
            error = e.what();
        }
        // The payload is still on its way: take it, so the sender's drain finishes.
        t.recv({DType::F64, {3, 5}, Device::cpu()}, 0, 7);
    });
    EXPECT_NE(error.find("rank 0 announced double[3, 5] on cpu, this stage expects double[?, 4] on cpu"), std::string::npos) << error;
}

}  // namespace
}  // namespace duplex
