// The CPU reference of dispatch permutation and combine: layouts, round trips, fixed-order sums.
#include "kernels/cpu/permute.hpp"

#include <gtest/gtest.h>

#include "core/clock.hpp"
#include "core/error.hpp"

namespace duplex::kernels {
namespace {

TEST(Permute, LayoutGroupsItemsByPeerInOrder) {
    DispatchLayout l = dispatch_layout({2, 0, 2, 1, 0}, 3);
    EXPECT_EQ(l.counts, (std::vector<int64_t>{2, 1, 2}));
    EXPECT_EQ(l.offsets, (std::vector<int64_t>{0, 2, 3, 5}));
    EXPECT_EQ(l.item_row, (std::vector<int64_t>{3, 0, 4, 2, 1}));
    EXPECT_EQ(l.num_rows(), 5);
    EXPECT_THROW(dispatch_layout({0, 3}, 3), ConfigError);
    EXPECT_THROW(dispatch_layout({-1}, 3), ConfigError);
    EXPECT_EQ(dispatch_layout({}, 4).num_rows(), 0);
}

TEST(Permute, PermuteThenCombineSumsGatedRowsPerToken) {
    const int tokens = 37, top_k = 4, dim = 24, peers = 5;
    Rng rng(11);
    std::vector<float> x(size_t(tokens) * dim), gates(size_t(tokens) * top_k);
    for (float& v : x) v = float(rng.normal());
    for (float& g : gates) g = float(rng.uniform());
    std::vector<int> dest(size_t(tokens) * top_k), src(dest.size());
    for (size_t i = 0; i < dest.size(); ++i) dest[i] = int(rng.below(peers)), src[i] = int(i / top_k);
    DispatchLayout l = dispatch_layout(dest, peers);
    std::vector<float> send(size_t(l.num_rows()) * dim, -1.0f);
    permute_rows(x.data(), dim, src, l, send.data());
    for (size_t i = 0; i < dest.size(); ++i) {
        // every item lands in its peer's block, with its token's row
        EXPECT_GE(l.item_row[i], l.offsets[dest[i]]);
        EXPECT_LT(l.item_row[i], l.offsets[dest[i] + 1]);
        for (int c = 0; c < dim; ++c) ASSERT_EQ(send[size_t(l.item_row[i]) * dim + c], x[size_t(src[i]) * dim + c]);
    }
    std::vector<float> y(x.size());
    combine_rows(send.data(), dim, l, gates.data(), tokens, top_k, y.data());
    for (int t = 0; t < tokens; ++t)
        for (int c = 0; c < dim; ++c) {
            float want = 0;
            for (int k = 0; k < top_k; ++k) {
                volatile float p = gates[size_t(t) * top_k + k] * x[size_t(t) * dim + c];
                want = want + p;
            }
            ASSERT_EQ(y[size_t(t) * dim + c], want);
        }
}

TEST(Permute, CombineBackwardGatesRowsAndDotsEachSlot) {
    const int tokens = 9, top_k = 3, dim = 7, peers = 4;
    Rng rng(12);
    std::vector<float> dy(size_t(tokens) * dim), gates(size_t(tokens) * top_k);
    for (float& v : dy) v = float(rng.normal());
    for (float& g : gates) g = float(rng.uniform());
    std::vector<int> dest(gates.size()), src(gates.size());
    for (size_t i = 0; i < dest.size(); ++i) dest[i] = int(rng.below(peers)), src[i] = int(i / top_k);
    DispatchLayout l = dispatch_layout(dest, peers);
    std::vector<float> rows(size_t(l.num_rows()) * dim), outputs(rows.size()), dots(gates.size());
    for (float& v : outputs) v = float(rng.normal());
    permute_rows(dy.data(), dim, src, l, rows.data());
    gate_rows(rows.data(), dim, l, gates.data());
    slot_dots(dy.data(), outputs.data(), dim, l, tokens, top_k, dots.data());
    for (size_t slot = 0; slot < gates.size(); ++slot) {
        const float* o = outputs.data() + size_t(l.item_row[slot]) * dim;
        double want = 0;
        for (int c = 0; c < dim; ++c) {
            ASSERT_EQ(rows[size_t(l.item_row[slot]) * dim + c], dy[(slot / top_k) * dim + c] * gates[slot]);
            want += double(dy[(slot / top_k) * dim + c]) * o[c];
        }
        EXPECT_NEAR(dots[slot], want, 1e-5 * (1 + std::fabs(want)));
    }
    EXPECT_THROW(slot_dots(dy.data(), outputs.data(), dim, l, tokens + 1, top_k, dots.data()), ConfigError);
}

TEST(Permute, NodeItemsCrossToEachTargetNodeOnce) {
    // 4 ranks of 2 experts, 2 ranks per node: experts 0-3 on node 0, 4-7 on node 1.
    std::vector<int> expert = {0, 1, 2, 3,   // token 0: node 0 only
                               1, 5, 6, 2,   // token 1: nodes 0 and 1
                               7, 4, 5, 6};  // token 2: node 1 only
    std::vector<int> node, token;
    node_items(expert, 3, 4, 2, 2, node, token);
    EXPECT_EQ(node, (std::vector<int>{0, 0, 1, 1}));
    EXPECT_EQ(token, (std::vector<int>{0, 1, 1, 2}));
    EXPECT_THROW(node_items(expert, 4, 4, 2, 2, node, token), ConfigError);
}

TEST(Permute, NodeLimitedCombineSumsInsideEachNodeThenAcrossNodes) {
    // 4 ranks, 2 nodes of 2. Rank 0: token 0 -> ranks {0, 1, 3}, token 1 -> {2}; rank 1: one token no rank took;
    // rank 2: token 0 -> {1, 2, 3}; rank 3: no tokens. Rows arrive source-major, as the dispatch delivers them.
    std::vector<std::vector<uint64_t>> masks = {{0b1011, 0b0100}, {0}, {0b1110}, {}};
    const int dim = 2;
    std::vector<float> in0 = {1e8f, 5}, in1 = {1, 1, 3, 6}, in2 = {7, 1, 4, 2}, in3 = {-1e8f, 2, 8, 4};
    std::vector<float> w0 = {1}, w1 = {1, 2}, w2 = {1, 0.5f}, w3 = {1, 0.25f};
    std::vector<std::vector<float>> y = {std::vector<float>(4, 99.0f), std::vector<float>(2, 99.0f),
                                         std::vector<float>(2, 99.0f), {}};
    std::vector<float*> yp = {y[0].data(), y[1].data(), y[2].data(), y[3].data()};
    combine_node_limited({in0.data(), in1.data(), in2.data(), in3.data()}, {w0.data(), w1.data(), w2.data(), w3.data()},
                         masks, 2, dim, yp);
    // Token (0, 0): node 0 first (1e8 + 1 rounds to 1e8), then node 1 (-1e8): exactly 0 — slot order would give 1.
    EXPECT_EQ(y[0], (std::vector<float>{0.0f, 5 + 1 + 2, 7, 1}));
    EXPECT_EQ(y[1], (std::vector<float>{0, 0}));
    // Token (2, 0): node 0: 2 * 3, 2 * 6; node 1: 0.5 * 4 + 0.25 * 8, 0.5 * 2 + 0.25 * 4.
    EXPECT_EQ(y[2], (std::vector<float>{6 + 4, 12 + 2}));
    // Without weights every factor is 1.
    combine_node_limited({in0.data(), in1.data(), in2.data(), in3.data()}, {}, masks, 2, dim, yp);
    EXPECT_EQ(y[2], (std::vector<float>{3 + 4 + 8, 6 + 2 + 4}));
    EXPECT_THROW(combine_node_limited({in0.data(), in1.data(), in2.data(), in3.data()}, {}, masks, 3, dim, yp),
                 ConfigError);
    EXPECT_THROW(combine_node_limited({in0.data()}, {}, masks, 2, dim, yp), ConfigError);
}

}  // namespace
}  // namespace duplex::kernels
