// ZeRO-1 equals single-rank AdamW on the summed gradients; the rank grid builds the right groups.
#include "parallel/zero1.hpp"

#include <cmath>
#include <array>
#include <mutex>

#include <gtest/gtest.h>

#include "comm/launch.hpp"
#include "core/error.hpp"
#include "parallel/grid.hpp"

namespace duplex {
namespace {

float grad_value(int rank, int step, size_t i) { return float(std::sin(0.37 * i + rank * 1.3 + step * 0.7)); }

struct World {
    std::vector<float> a, b;  // two tensors: a matrix (decayed) and a norm (not decayed)
};

World initial() {
    World w;
    for (int i = 0; i < 37; ++i) w.a.push_back(0.01f * float(i) - 0.2f);
    for (int i = 0; i < 5; ++i) w.b.push_back(1.0f + 0.1f * float(i));
    return w;
}

// Single-rank reference: gradients summed in rank order, clipped by the global norm, AdamW.
World reference(int ranks, int steps, double clip, const kernels::AdamWConfig& cfg) {
    World w = initial();
    std::vector<float> ma(w.a.size()), va(w.a.size()), mb(w.b.size()), vb(w.b.size());
    for (int s = 1; s <= steps; ++s) {
        std::vector<float> ga(w.a.size()), gb(w.b.size());
        for (int r = 0; r < ranks; ++r) {
            for (size_t i = 0; i < ga.size(); ++i) ga[i] = r == 0 ? grad_value(r, s, i) : ga[i] + grad_value(r, s, i);
            for (size_t i = 0; i < gb.size(); ++i)
                gb[i] = r == 0 ? grad_value(r, s, 37 + i) : gb[i] + grad_value(r, s, 37 + i);
        }
        double norm = std::sqrt(kernels::sum_squares<float>(ga.data(), ga.size()) +
                                kernels::sum_squares<float>(gb.data(), gb.size()));
        double scale = clip > 0 && norm > clip ? clip / norm : 1.0;
        for (auto& g : ga) g = float(g * scale);
        for (auto& g : gb) g = float(g * scale);
        kernels::AdamWConfig c = cfg;
        kernels::adamw_step<float>(w.a.data(), ga.data(), ma.data(), va.data(), ga.size(), c, s);
        c.weight_decay = 0;
        kernels::adamw_step<float>(w.b.data(), gb.data(), mb.data(), vb.data(), gb.size(), c, s);
    }
    return w;
}

class Zero1 : public ::testing::TestWithParam<std::tuple<int, double>> {};

TEST_P(Zero1, EqualsSingleRankAdamWOnSummedGradients) {
    auto [ranks, clip] = GetParam();
    kernels::AdamWConfig cfg;
    cfg.lr = 0.05;
    const int steps = 3;
    World want = reference(ranks, steps, clip, cfg);
    std::mutex m;
    std::vector<World> got(ranks);
    LaunchOptions o;
    o.ranks = ranks;
    launch(o, [&](const std::shared_ptr<Communicator>& comm) {
        World w = initial();
        std::vector<float> ga(w.a.size()), gb(w.b.size());
        Zero1AdamW<float> opt(comm, {{w.a.data(), ga.data(), ga.size()}, {w.b.data(), gb.data(), gb.size()}}, cfg,
                              {cfg.weight_decay, 0.0});
        for (int s = 1; s <= steps; ++s) {
            for (size_t i = 0; i < ga.size(); ++i) ga[i] = grad_value(comm->rank(), s, i);
            for (size_t i = 0; i < gb.size(); ++i) gb[i] = grad_value(comm->rank(), s, 37 + i);
            double sq = opt.reduce();
            comm->all_reduce(&sq, 1, DType::F64)->wait();
            double norm = std::sqrt(sq);
            opt.apply(s, clip > 0 && norm > clip ? clip / norm : 1.0);
        }
        std::lock_guard<std::mutex> lock(m);
        got[comm->rank()] = w;
    });
    for (int r = 0; r < ranks; ++r) {
        for (size_t i = 0; i < want.a.size(); ++i) {
            if (clip == 0) {
                ASSERT_EQ(got[r].a[i], want.a[i]) << "rank " << r << " a[" << i << "]";  // bitwise without clipping
            } else {
                ASSERT_NEAR(got[r].a[i], want.a[i], 1e-6) << "rank " << r << " a[" << i << "]";
            }
        }
        for (size_t i = 0; i < want.b.size(); ++i) ASSERT_NEAR(got[r].b[i], want.b[i], clip == 0 ? 0 : 1e-6);
    }
}

INSTANTIATE_TEST_SUITE_P(RanksAndClip, Zero1,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4), ::testing::Values(0.0, 1.0)));

TEST(RankGrid, PlacesRanksAndExperts) {
    RankGrid g = RankGrid::make({4, 4, 2}, 16, 8, 13);  // stage 3, dp 1
    EXPECT_EQ(g.stage, 3);
    EXPECT_EQ(g.dp_index, 1);
    EXPECT_EQ(g.ep_group, 0);
    EXPECT_EQ(g.ep_index, 1);
    EXPECT_EQ(g.num_local_experts, 4);
    EXPECT_EQ(g.first_local_expert, 4);
    EXPECT_EQ(g.world_rank(3, 1), 13);
}

TEST(RankGrid, RejectsImpossibleGrids) {
    auto msg = [](GridConfig c, int world, int experts) {
        try {
            RankGrid::validate(c, world, experts);
        } catch (const ConfigError& e) {
            return std::string(e.what());
        }
        return std::string("ok");
    };
    EXPECT_NE(msg({4, 3, 1}, 8, 8).find("12 ranks, but the world has 8"), std::string::npos);
    EXPECT_NE(msg({2, 4, 3}, 8, 9).find("must divide DP"), std::string::npos);
    EXPECT_NE(msg({2, 4, 4}, 8, 6).find("must divide the 6 routed experts"), std::string::npos);
    EXPECT_EQ(msg({2, 4, 2}, 8, 8), "ok");
}

TEST(RankGrid, BuildsPipelineDataExpertAndExpertDataGroups) {
    std::mutex m;
    std::vector<std::array<int, 8>> seen(8);
    LaunchOptions o;
    o.ranks = 8;
    launch(o, [&](const std::shared_ptr<Communicator>& world) {
        RankGrid g = RankGrid::make({2, 4, 2}, 8, 8, world->rank());
        GroupComms c = make_groups(*world, g);
        // Sum of world ranks inside each group identifies its members.
        auto sum = [&](Communicator& comm) {
            int64_t v = world->rank();
            comm.all_reduce(&v, 1, DType::I64)->wait();
            return int(v);
        };
        std::array<int, 8> row = {c.pp->size(), c.dp->size(), c.ep->size(), c.edp->size(),
                                  sum(*c.pp),   sum(*c.dp),   sum(*c.ep),   sum(*c.edp)};
        std::lock_guard<std::mutex> lock(m);
        seen[world->rank()] = row;
    });
    // Rank 5: stage 1, dp 1 -> pp {1, 5}; dp {4..7}; ep group 0 of stage 1 {4, 5}; edp (ep_index 1) {5, 7}.
    EXPECT_EQ(seen[5], (std::array<int, 8>{2, 4, 2, 2, 6, 22, 9, 12}));
    EXPECT_EQ(seen[0], (std::array<int, 8>{2, 4, 2, 2, 4, 6, 1, 2}));
}

}  // namespace
}  // namespace duplex
