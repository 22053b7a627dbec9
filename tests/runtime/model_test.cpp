// The reference model: whole-model gradient checks in fp64, stage splits, recompute, routing properties.
#include <cmath>
#include <map>
#include <set>

#include <gtest/gtest.h>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "kernels/cpu/ops.hpp"
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

// An ExpertCompute on the host with the device path's discipline (forward keeps inputs and projections under
// the key, backward recomputes the SwiGLU output, the weight gradients come back as the W work) — so the stage's
// hook is proven here, on the CPU, the way tests/cuda/stage_test.cpp proves the CUDA implementation on a GPU.
class HostExperts : public ExpertCompute<double> {
public:
    std::string name() const override { return "host"; }
    struct Kept {
        std::vector<std::vector<double>> x, a1, a3;
    };
    void forward(uint64_t key, const Weights& w, const std::vector<std::vector<double>>& rows,
                 std::vector<std::vector<double>>& out) override {
        Kept k;
        out.assign(rows.size(), {});
        for (size_t e = 0; e < rows.size(); ++e) {
            int d = int(w.w1[e]->shape[0]), f = int(w.w1[e]->shape[1]), r = int(rows[e].size()) / d;
            std::vector<double> a1(size_t(r) * f), a3(a1.size()), s(a1.size());
            kernels::gemm<double>(false, false, r, f, d, 1, rows[e].data(), w.w1[e]->value.data(), 0, a1.data());
            kernels::gemm<double>(false, false, r, f, d, 1, rows[e].data(), w.w3[e]->value.data(), 0, a3.data());
            kernels::swiglu_forward<double>(a1.data(), a3.data(), s.size(), s.data());
            out[e].resize(size_t(r) * d);
            kernels::gemm<double>(false, false, r, d, f, 1, s.data(), w.w2[e]->value.data(), 0, out[e].data());
            k.x.push_back(rows[e]), k.a1.push_back(a1), k.a3.push_back(a3);
        }
        ASSERT_TRUE(kept.emplace(key, std::move(k)).second) << "forward twice for one key";
        ++forwards;
    }
    std::function<void()> backward(uint64_t key, const Weights& w, const std::vector<std::vector<double>>& d_out,
                                   std::vector<std::vector<double>>& d_rows) override {
        auto it = kept.find(key);
        if (it == kept.end()) throw Error("backward without forward");
        auto k = std::make_shared<Kept>(std::move(it->second));
        kept.erase(it);
        auto douts = std::make_shared<std::vector<std::vector<double>>>(d_out);
        auto da1s = std::make_shared<std::vector<std::vector<double>>>(), da3s = std::make_shared<std::vector<std::vector<double>>>();
        d_rows.assign(d_out.size(), {});
        for (size_t e = 0; e < d_out.size(); ++e) {
            int d = int(w.w1[e]->shape[0]), f = int(w.w1[e]->shape[1]), r = int(d_out[e].size()) / d;
            std::vector<double> s(size_t(r) * f), ds(s.size()), da1(s.size()), da3(s.size());
            kernels::swiglu_forward<double>(k->a1[e].data(), k->a3[e].data(), s.size(), s.data());
            kernels::gemm<double>(false, true, r, f, d, 1, d_out[e].data(), w.w2[e]->value.data(), 0, ds.data());
            kernels::swiglu_backward<double>(ds.data(), k->a1[e].data(), k->a3[e].data(), s.size(), da1.data(), da3.data());
            d_rows[e].assign(size_t(r) * d, 0);
            kernels::gemm<double>(false, true, r, d, f, 1, da1.data(), w.w1[e]->value.data(), 0, d_rows[e].data());
            kernels::gemm<double>(false, true, r, d, f, 1, da3.data(), w.w3[e]->value.data(), 1, d_rows[e].data());
            da1s->push_back(da1), da3s->push_back(da3);
        }
        ++backwards;
        return [k, douts, da1s, da3s, w] {
            for (size_t e = 0; e < douts->size(); ++e) {
                int d = int(w.w1[e]->shape[0]), f = int(w.w1[e]->shape[1]), r = int((*douts)[e].size()) / d;
                std::vector<double> s(size_t(r) * f);
                kernels::swiglu_forward<double>(k->a1[e].data(), k->a3[e].data(), s.size(), s.data());
                kernels::gemm<double>(true, false, d, f, r, 1, k->x[e].data(), (*da1s)[e].data(), 1, w.w1[e]->grad.data());
                kernels::gemm<double>(true, false, d, f, r, 1, k->x[e].data(), (*da3s)[e].data(), 1, w.w3[e]->grad.data());
                kernels::gemm<double>(true, false, f, d, r, 1, s.data(), (*douts)[e].data(), 1, w.w2[e]->grad.data());
            }
        };
    }
    void weights_changed() override { ++weight_changes; }
    std::map<uint64_t, Kept> kept;
    int forwards = 0, backwards = 0, weight_changes = 0;
};

TEST(Model, ExpertComputeHookGivesTheCpuStageResults) {
    ModelConfig c = ModelConfig::preset("tiny");
    Batch b0 = random_batch(c, 2, 8), b1 = random_batch(c, 2, 9);
    ModelStage<double> plain(c, 0, c.layers, true, true, 3), hooked(c, 0, c.layers, true, true, 3);
    auto host = std::make_shared<HostExperts>();
    hooked.set_expert_compute(host);
    std::vector<double> losses;
    for (ModelStage<double>* st : {&plain, &hooked}) {  // two microbatches in flight, W later and out of order
        st->forward(0, b0, {});
        st->forward(1, b1, {});
        losses.push_back(st->loss(0) + st->loss(1));
        st->backward_input(1, {});
        st->backward_input(0, {});
        st->backward_weight(0);
        st->backward_weight(1);
    }
    int moe_layers = 0;
    for (int l = 0; l < c.layers; ++l) moe_layers += c.is_moe_layer(l);
    EXPECT_EQ(host->forwards, 2 * moe_layers);
    EXPECT_EQ(host->backwards, 2 * moe_layers);
    EXPECT_TRUE(host->kept.empty());
    EXPECT_EQ(losses[0], losses[1]);  // the same GEMMs in the same order
    auto pa = plain.parameters(), pb = hooked.parameters();
    ASSERT_EQ(pa.size(), pb.size());
    for (size_t i = 0; i < pa.size(); ++i)
        for (size_t j = 0; j < pa[i]->grad.size(); ++j)
            ASSERT_NEAR(pa[i]->grad[j], pb[i]->grad[j], 1e-12 * (1 + std::fabs(pa[i]->grad[j]))) << pa[i]->name;
    // Each step's zero_grad tells the expert compute the weights may have changed (a device refreshes its copies).
    EXPECT_EQ(host->weight_changes, 0);
    hooked.zero_grad();
    EXPECT_EQ(host->weight_changes, 1);
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
