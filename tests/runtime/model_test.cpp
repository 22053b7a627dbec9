// The reference model: whole-model gradient checks in fp64, stage splits, recompute, routing properties.
#include <cmath>
#include <map>
#include <set>

#include <gtest/gtest.h>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "runtime/model/router.hpp"
#include "runtime/model/stage.hpp"

namespace duplex {
namespace {

ModelConfig two_layer() {
    ModelConfig c = ModelConfig::preset("tiny");
    c.vocab = 11;
    c.hidden = 8;
    c.heads = 2;
    c.head_dim = 4;
    c.layers = 2;
    c.dense_layers = 1;
    c.dense_ffn = 12;
    c.experts = 4;
    c.expert_ffn = 6;
    c.top_k = 2;
    c.groups = 2;
    c.top_groups = 1;
    c.seq_len = 5;
    c.init_std = 0.5;  // large enough that every path carries signal
    return c;
}

Batch random_batch(const ModelConfig& c, int sequences, uint64_t seed) {
    Batch b;
    b.sequences = sequences;
    b.seq_len = c.seq_len;
    Rng rng(seed);
    for (int i = 0; i < b.num_tokens(); ++i) {
        b.tokens.push_back(int(rng.below(c.vocab)));
        b.targets.push_back(int(rng.below(c.vocab)));
    }
    return b;
}

double loss_of(ModelStage<double>& s, const Batch& b) {
    s.forward(999, b, {});
    double l = s.loss(999) + s.aux_loss(999);
    s.backward(999, {});  // clear the stash
    return l;
}

class WholeModel : public ::testing::TestWithParam<double> {};  // the balance-loss weight

TEST_P(WholeModel, TwoLayerGradientsMatchFiniteDifferences) {
    ModelConfig c = two_layer();
    c.balance_alpha = GetParam();
    ModelStage<double> s(c, 0, 2, true, true, 7);
    Batch b = random_batch(c, 2, 3);
    s.zero_grad();
    s.forward(0, b, {});
    s.backward_input(0, {});
    s.backward_weight(0);
    std::vector<std::vector<double>> analytic;
    for (Param<double>* p : s.parameters()) analytic.push_back(p->grad);
    s.zero_grad();
    int checked = 0;
    double worst = 0;
    auto params = s.parameters();
    for (size_t pi = 0; pi < params.size(); ++pi) {
        Param<double>* p = params[pi];
        Rng rng(pi + 100);
        for (int trial = 0; trial < 4; ++trial) {
            size_t i = rng.below(p->value.size());
            double keep = p->value[i], h = 1e-5;
            p->value[i] = keep + h;
            double up = loss_of(s, b);
            p->value[i] = keep - h;
            double down = loss_of(s, b);
            p->value[i] = keep;
            double numeric = (up - down) / (2 * h);
            double err = std::fabs(numeric - analytic[pi][i]) / std::max(1e-3, std::fabs(numeric));
            worst = std::max(worst, err);
            EXPECT_LT(err, 1e-5) << p->name << "[" << i << "] numeric " << numeric << " analytic " << analytic[pi][i];
            ++checked;
        }
    }
    EXPECT_GT(checked, 60);
}

INSTANTIATE_TEST_SUITE_P(BalanceLoss, WholeModel, ::testing::Values(0.0, 0.3));

TEST(Model, SplitIntoStagesEqualsTheWholeModel) {
    ModelConfig c = two_layer();
    Batch b = random_batch(c, 2, 4);
    ModelStage<double> whole(c, 0, 2, true, true, 9);
    ModelStage<double> first(c, 0, 1, true, false, 9), second(c, 1, 1, false, true, 9);
    whole.forward(0, b, {});
    double whole_loss = whole.loss(0);
    whole.backward(0, {});
    auto h = first.forward(0, b, {});
    second.forward(0, b, h);
    EXPECT_EQ(whole_loss, second.loss(0));
    auto dh = second.backward(0, {});
    first.backward(0, dh);
    std::map<std::string, std::vector<double>> grads;
    for (auto* p : whole.parameters()) grads[p->name] = p->grad;
    size_t seen = 0;
    for (auto* stage : {&first, &second})
        for (auto* p : stage->parameters()) {
            ASSERT_TRUE(grads.count(p->name)) << p->name;
            EXPECT_EQ(grads[p->name], p->grad) << p->name;
            ++seen;
        }
    EXPECT_EQ(seen, grads.size());
}

TEST(Model, RecomputeGivesIdenticalResultsWithLessActivationMemory) {
    ModelConfig c = ModelConfig::preset("tiny");
    Batch b = random_batch(c, 4, 5);
    ModelStage<float> plain(c, 0, c.layers, true, true, 1), recompute(c, 0, c.layers, true, true, 1);
    recompute.set_recompute(true);
    plain.forward(0, b, {});
    recompute.forward(0, b, {});
    EXPECT_EQ(plain.loss(0), recompute.loss(0));
    plain.backward(0, {});
    recompute.backward(0, {});
    auto pa = plain.parameters(), pb = recompute.parameters();
    for (size_t i = 0; i < pa.size(); ++i) EXPECT_EQ(pa[i]->grad, pb[i]->grad) << pa[i]->name;
    EXPECT_LT(recompute.ledger().peak("activations"), plain.ledger().peak("activations"));
    EXPECT_EQ(plain.ledger().live_total(), 0);
}

TEST(Model, WeightGradientCanRunLaterAndOutOfOrder) {
    ModelConfig c = ModelConfig::preset("tiny");
    Batch b0 = random_batch(c, 2, 6), b1 = random_batch(c, 2, 7);
    ModelStage<double> split(c, 0, c.layers, true, true, 2), fused(c, 0, c.layers, true, true, 2);
    split.forward(0, b0, {});
    split.forward(1, b1, {});
    split.backward_input(0, {});
    split.backward_input(1, {});
    EXPECT_GT(split.ledger().live("wgrad_inputs"), 0);
    split.backward_weight(1);
    split.backward_weight(0);
    fused.forward(0, b0, {});
    fused.backward(0, {});
    fused.forward(1, b1, {});
    fused.backward(1, {});
    auto pa = split.parameters(), pb = fused.parameters();
    for (size_t i = 0; i < pa.size(); ++i)
        for (size_t j = 0; j < pa[i]->grad.size(); ++j) ASSERT_NEAR(pa[i]->grad[j], pb[i]->grad[j], 1e-13) << pa[i]->name;
    EXPECT_THROW(split.backward_weight(0), Error);
    EXPECT_THROW(split.backward_input(5, {}), Error);
}

TEST(Router, NodeLimitedRoutingNeverExceedsMGroups) {
    ModelConfig c = ModelConfig::preset("small");  // 16 experts, 4 groups, top-4 within 2 groups
    Rng rng(11);
    int tokens = 500;
    std::vector<float> s(size_t(tokens) * c.experts);
    for (float& v : s) v = float(rng.uniform());
    std::vector<double> bias(c.experts);
    for (double& v : bias) v = rng.normal() * 0.1;
    Routing r = route<float>(s.data(), bias, tokens, c);
    int per_group = c.experts / c.groups;
    for (int t = 0; t < tokens; ++t) {
        std::set<int> groups, experts;
        double gsum = 0;
        for (int k = 0; k < c.top_k; ++k) {
            int e = r.expert[size_t(t) * c.top_k + k];
            groups.insert(e / per_group);
            experts.insert(e);
            gsum += r.gate[size_t(t) * c.top_k + k];
        }
        ASSERT_LE(int(groups.size()), c.top_groups);
        ASSERT_EQ(int(experts.size()), c.top_k);
        ASSERT_NEAR(gsum, c.route_scale, 1e-9);  // gates normalized over the selected experts
    }
}

TEST(Router, BiasSelectsButDoesNotWeight) {
    ModelConfig c = two_layer();
    c.top_groups = 2;
    std::vector<float> s = {0.9f, 0.8f, 0.1f, 0.2f};
    std::vector<double> bias = {0, 0, 0, 0};
    Routing r = route<float>(s.data(), bias, 1, c);
    EXPECT_EQ(r.expert, (std::vector<int>{0, 1}));
    bias[3] = 1.0;  // pushes expert 3 in
    r = route<float>(s.data(), bias, 1, c);
    EXPECT_EQ(r.expert, (std::vector<int>{0, 3}));
    EXPECT_NEAR(r.gate[1], c.route_scale * 0.2 / (0.9 + 0.2), 1e-6);
}

TEST(Router, BiasUpdateAndMaxVio) {
    std::vector<double> bias(4, 0.0);
    update_bias(bias, {8, 2, 5, 5}, 0.001);
    EXPECT_EQ(bias, (std::vector<double>{-0.001, 0.001, 0.0, 0.0}));
    EXPECT_NEAR(max_violation({10, 2, 4, 4}), (10 - 5.0) / 5.0, 1e-12);
    EXPECT_EQ(max_violation({3, 3, 3}), 0.0);
}

TEST(Model, BadConfigurationsAreRejected) {
    ModelConfig c = ModelConfig::preset("tiny");
    c.groups = 3;
    EXPECT_THROW(c.validate(), ConfigError);
    c = ModelConfig::preset("tiny");
    c.top_k = 3;  // not a multiple of top_groups = 2
    EXPECT_THROW(c.validate(), ConfigError);
    EXPECT_THROW(ModelConfig::preset("huge"), ConfigError);
    c = ModelConfig::preset("tiny");
    EXPECT_THROW(ModelStage<float>(c, 3, 2, true, true, 1), ConfigError);
}

}  // namespace
}  // namespace duplex
