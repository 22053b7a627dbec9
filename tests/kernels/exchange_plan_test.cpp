// The node-limited exchange's plans, run on the CPU the way kernels/cuda/node_limited.cu runs them on the device
// (each output row the sum, from 0, of its sources in order; a copy when it has one), against references that do
// not use the plans: the plain gather of the dispatch, kernels::combine_node_limited(_bf16) for the combine.
#include "kernels/exchange_plan.hpp"

#include <gtest/gtest.h>

#include <cstring>

#include "core/clock.hpp"
#include "core/dtype.hpp"
#include "core/error.hpp"
#include "kernels/cpu/permute.hpp"
#include "tests/kernels/random_masks.hpp"

namespace duplex::kernels {
namespace {

using test_support::random_masks;

std::vector<float> random_floats(size_t n, uint64_t seed) {
    Rng rng(seed);
    std::vector<float> v(n);
    for (float& x : v) x = float(rng.normal());
    return v;
}

// The device kernels' loops on the CPU. buffers: 2R + 1 row arrays (sources, targets, relay) of `dim` elements.
template <typename T, typename Load, typename Store>
void run_plan(const NodeLimitedPlan& p, std::vector<T*> buffers, const std::vector<const float*>& weights, int dim,
              bool copy, Load load, Store store) {
    const int R = p.ranks;
    std::vector<T> relay(size_t(std::max<int64_t>(p.relay_rows, 1)) * dim);
    buffers.resize(2 * R + 1);
    buffers[2 * R] = relay.data();
    for (const PlanRound& round : p.rounds) {
        ASSERT_LE(round.relay_rows, p.relay_rows);
        for (const Hop& hop : round.hops) {
            ASSERT_EQ(hop.first.size(), hop.to.size() + 1);
            for (int64_t i = 0; i < hop.outputs(); ++i) {
                T* out = buffers[hop.to[i].buffer] + hop.to[i].row * dim;
                if (copy) {
                    ASSERT_EQ(hop.first[i + 1] - hop.first[i], 1) << "a dispatch output has one source";
                    const RowRef& f = hop.from[hop.first[i]];
                    std::memcpy(out, buffers[f.buffer] + f.row * dim, sizeof(T) * dim);
                    continue;
                }
                for (int c = 0; c < dim; ++c) {
                    float acc = 0.0f;
                    for (int64_t j = hop.first[i]; j < hop.first[i + 1]; ++j) {
                        const RowRef& f = hop.from[j];
                        float x = load(buffers[f.buffer][f.row * dim + c]);
                        volatile float v = f.buffer < R && !weights.empty() ? weights[f.buffer][f.row] * x : x;
                        acc = acc + v;
                    }
                    out[c] = store(acc);
                }
            }
        }
    }
}

// Rows crossing nodes, counted from the masks: one per (token, other node) vs one per (token, rank there).
void count_crossings(const std::vector<std::vector<uint64_t>>& masks, int nodes, int64_t& inter, int64_t& flat) {
    int R = int(masks.size()), L = R / nodes;
    inter = flat = 0;
    for (int s = 0; s < R; ++s)
        for (uint64_t mk : masks[s])
            for (int m = 0; m < nodes; ++m)
                for (int ld = 0, hit = 0; ld < L; ++ld)
                    if (m != s / L && ((mk >> (m * L + ld)) & 1)) {
                        ++flat;
                        if (!hit++) ++inter;
                    }
}

struct Shape {
    int ranks, nodes;
    int64_t capacity;
};
void PrintTo(const Shape& s, std::ostream* os) {
    *os << s.ranks << " ranks, " << s.nodes << " nodes, relay capacity " << s.capacity;
}

class PlanShapes : public ::testing::TestWithParam<Shape> {};
INSTANTIATE_TEST_SUITE_P(Shapes, PlanShapes,
                         ::testing::Values(Shape{8, 1, 0}, Shape{8, 2, 0}, Shape{8, 2, 2}, Shape{8, 4, 7},
                                           Shape{8, 8, 0}, Shape{64, 8, 100}, Shape{2, 2, 0}));

TEST_P(PlanShapes, DispatchDeliversWhatAPlainGatherDoesCrossingEachNodeOnce) {
    const auto [R, nodes, capacity] = GetParam();
    const int dim = 5;
    auto masks = random_masks(R, nodes, R > 8 ? 40 : 150, std::min(8, R), std::min(2, nodes), 3 + R + nodes);
    NodeLimitedPlan p = plan_node_limited_dispatch(masks, nodes, capacity);
    // The reference: rank d gets rank 0's tokens for d (ascending), then rank 1's, ...
    std::vector<std::vector<float>> x(R), want(R), recv(R);
    for (int s = 0; s < R; ++s) x[s] = random_floats(masks[s].size() * dim, 40 + s);
    for (int d = 0; d < R; ++d)
        for (int s = 0; s < R; ++s)
            for (size_t t = 0; t < masks[s].size(); ++t)
                if ((masks[s][t] >> d) & 1) want[d].insert(want[d].end(), x[s].begin() + t * dim, x[s].begin() + (t + 1) * dim);
    std::vector<float*> buffers;
    for (int s = 0; s < R; ++s) buffers.push_back(x[s].data());
    for (int d = 0; d < R; ++d) {
        ASSERT_EQ(p.target_rows[d] * dim, int64_t(want[d].size())) << "rank " << d;
        ASSERT_EQ(p.source_rows[d], int64_t(masks[d].size()));
        recv[d].assign(want[d].size(), -1.0f);
        buffers.push_back(recv[d].data());
    }
    auto same = [](float v) { return v; };
    run_plan<float>(p, buffers, {}, dim, /*copy=*/true, same, same);
    for (int d = 0; d < R; ++d) ASSERT_EQ(recv[d], want[d]) << "rank " << d;
    int64_t inter = 0, flat = 0;
    count_crossings(masks, nodes, inter, flat);
    EXPECT_EQ(p.inter_node_rows, inter);
    EXPECT_EQ(p.flat_inter_node_rows, flat);
    if (nodes > 1 && R / nodes > 1) {
        EXPECT_LT(p.inter_node_rows, p.flat_inter_node_rows);
    }
    // One node: a single hop, each row written once straight into its target; several: two hops through a relay
    // that never holds more than the capacity.
    for (const PlanRound& round : p.rounds) EXPECT_EQ(round.hops.size(), nodes > 1 ? 2u : 1u);
    if (capacity > 0) {
        EXPECT_LE(p.relay_rows, capacity);
    }
    if (nodes == 1) {
        EXPECT_EQ(p.relay_rows, 0);
    }
}

TEST_P(PlanShapes, CombineSumsLikeTheReferenceBitForBitInF32AndBf16) {
    const auto [R, nodes, capacity] = GetParam();
    const int dim = 7;
    auto masks = random_masks(R, nodes, R > 8 ? 40 : 120, std::min(8, R), std::min(2, nodes), 17 + R + nodes);
    NodeLimitedPlan p = plan_node_limited_combine(masks, nodes, capacity);
    NodeLimitedPlan dispatch = plan_node_limited_dispatch(masks, nodes, capacity);
    EXPECT_EQ(p.source_rows, dispatch.target_rows) << "combine reads what the dispatch delivered";
    EXPECT_EQ(p.inter_node_rows, dispatch.inter_node_rows);
    std::vector<std::vector<float>> in(R), w(R), y(R), want(R), want_unweighted(R);
    std::vector<std::vector<uint16_t>> in16(R), y16(R), want16(R);
    std::vector<const float*> in_p, w_p;
    std::vector<const uint16_t*> in16_p;
    std::vector<float*> y_p, want_p, want_u_p;
    std::vector<uint16_t*> y16_p, want16_p;
    for (int r = 0; r < R; ++r) {
        in[r] = random_floats(size_t(p.source_rows[r]) * dim, 70 + r);
        w[r] = random_floats(size_t(p.source_rows[r]), 90 + r);
        for (float v : in[r]) in16[r].push_back(fp32_to_bf16(v));
        size_t out = masks[r].size() * dim;
        y[r].assign(out, -1.0f), want[r].resize(out), want_unweighted[r].resize(out);
        y16[r].assign(out, 0xFFFF), want16[r].resize(out);
        in_p.push_back(in[r].data()), w_p.push_back(w[r].data()), in16_p.push_back(in16[r].data());
        want_p.push_back(want[r].data()), want_u_p.push_back(want_unweighted[r].data()), want16_p.push_back(want16[r].data());
    }
    combine_node_limited(in_p, w_p, masks, nodes, dim, want_p);
    combine_node_limited(in_p, {}, masks, nodes, dim, want_u_p);
    // The byte-row entry (what the GPU tests and commbench call) on BF16 rows.
    combine_node_limited_rows(true, std::vector<const void*>(in16_p.begin(), in16_p.end()), w_p, masks, nodes, dim,
                              std::vector<void*>(want16_p.begin(), want16_p.end()));
    auto same = [](float v) { return v; };
    for (bool weighted : {true, false}) {
        std::vector<float*> buffers;
        for (int r = 0; r < R; ++r) buffers.push_back(in[r].data());
        for (int r = 0; r < R; ++r) buffers.push_back(y[r].data());
        run_plan<float>(p, buffers, weighted ? w_p : std::vector<const float*>{}, dim, false, same, same);
        for (int s = 0; s < R; ++s) ASSERT_EQ(y[s], weighted ? want[s] : want_unweighted[s]) << "rank " << s;
    }
    std::vector<uint16_t*> buffers16;
    for (int r = 0; r < R; ++r) buffers16.push_back(in16[r].data());
    for (int r = 0; r < R; ++r) buffers16.push_back(y16[r].data());
    run_plan<uint16_t>(p, buffers16, w_p, dim, false, bf16_to_fp32, fp32_to_bf16);
    for (int s = 0; s < R; ++s) ASSERT_EQ(y16[s], want16[s]) << "rank " << s;
}

TEST(ExchangePlan, Bf16ReferenceRoundsEachNodesPartialBeforeTheCrossing) {
    // 4 ranks, 2 nodes: token 0 of rank 0 goes to ranks 0, 1 (node 0) and 2 (node 1). Node 0's partial
    // 1 + 2^-8 rounds (to even) to 1 before it crosses; 1 + 2^-8 rounds to 1 again. Without the partial's
    // rounding the sum would be 1 + 2^-7, which BF16 holds.
    std::vector<std::vector<uint64_t>> masks = {{0b0111}, {}, {}, {}};
    uint16_t one = fp32_to_bf16(1.0f), eighth = fp32_to_bf16(0.00390625f);
    std::vector<uint16_t> in0 = {one}, in1 = {eighth}, in2 = {eighth}, y0 = {0};
    std::vector<uint16_t> none;
    combine_node_limited_bf16({in0.data(), in1.data(), in2.data(), none.data()}, {}, masks, 2, 1,
                              {y0.data(), none.data(), none.data(), none.data()});
    EXPECT_EQ(y0[0], one);
    combine_node_limited_bf16({in0.data(), in1.data(), in2.data(), none.data()}, {}, masks, 1, 1,
                              {y0.data(), none.data(), none.data(), none.data()});
    EXPECT_EQ(y0[0], fp32_to_bf16(1.0078125f)) << "one node: one sum, rounded once";
}

TEST(ExchangePlan, RefusesBadTopologiesRoutingAndCapacities) {
    auto masks = random_masks(8, 2, 20, 4, 2, 9);
    EXPECT_THROW(plan_node_limited_dispatch(masks, 3, 0), ConfigError);
    EXPECT_THROW(plan_node_limited_combine(masks, 0, 0), ConfigError);
    EXPECT_THROW(plan_node_limited_dispatch(masks, 2, 1), ConfigError) << "a token can need a row on both nodes";
    auto beyond = masks;
    beyond[1][0] = 1ull << 9;
    EXPECT_THROW(plan_node_limited_dispatch(beyond, 2, 0), ConfigError);
    EXPECT_THROW(plan_node_limited_combine(std::vector<std::vector<uint64_t>>(65), 1, 0), ConfigError);
    EXPECT_NO_THROW(plan_node_limited_combine(masks, 2, 2));
}

TEST(ExchangePlan, SmallCapacitiesSplitTheTokensIntoRounds) {
    auto masks = random_masks(8, 4, 100, 8, 3, 4);
    NodeLimitedPlan one = plan_node_limited_dispatch(masks, 4, 0), bounded = plan_node_limited_dispatch(masks, 4, 5);
    EXPECT_EQ(one.rounds.size(), 1u);
    EXPECT_GT(bounded.rounds.size(), one.relay_rows / 5);
    EXPECT_LE(bounded.relay_rows, 5);
    int64_t total = 0;
    for (const PlanRound& r : bounded.rounds) total += r.relay_rows;
    EXPECT_EQ(total, one.relay_rows) << "every relay row is written once, whatever the rounds";
}

}  // namespace
}  // namespace duplex::kernels
