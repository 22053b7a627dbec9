#include "comm/bench.hpp"

#include <numeric>

#include <gtest/gtest.h>

#include "comm/launch.hpp"
#include "core/error.hpp"

namespace duplex {
namespace {

TEST(CommBench, BusBandwidthFactorsFollowNcclTests) {
    EXPECT_DOUBLE_EQ(busbw_factor("alltoall", 8), 7.0 / 8);
    EXPECT_DOUBLE_EQ(busbw_factor("allgather", 4), 3.0 / 4);
    EXPECT_DOUBLE_EQ(busbw_factor("reducescatter", 4), 3.0 / 4);
    EXPECT_DOUBLE_EQ(busbw_factor("allreduce", 8), 2 * 7.0 / 8);
    EXPECT_DOUBLE_EQ(busbw_factor("p2p", 8), 1.0);
}

TEST(CommBench, SizesStepByFactorAndSplitEvenly) {
    CommBenchOptions o;
    o.op = "alltoall";
    o.min_bytes = 1000;
    o.max_bytes = 8000;
    auto s = bench_sizes(o, 3);
    ASSERT_EQ(s.size(), 4u);
    for (size_t b : s) EXPECT_EQ(b % 12, 0u);
    EXPECT_EQ(s[0], 996u);
}

TEST(CommBench, SkewedCountsSumAndAreSkewed) {
    auto c = skewed_counts(10000, 8, 3, 1.2, 7);
    EXPECT_EQ(std::accumulate(c.begin(), c.end(), size_t(0)), 10000u);
    EXPECT_GT(*std::max_element(c.begin(), c.end()), 3 * *std::min_element(c.begin(), c.end()));
    EXPECT_EQ(c, skewed_counts(10000, 8, 3, 1.2, 7));  // deterministic
    auto u = skewed_counts(800, 8, 0, 0.0, 7);
    for (size_t v : u) EXPECT_EQ(v, 100u);
}

TEST(CommBench, RunsEveryOpWithoutWrongElements) {
    for (std::string op : {"p2p", "alltoall", "alltoallv", "allgather", "reducescatter", "allreduce"}) {
        CommBenchOptions o;
        o.op = op;
        o.min_bytes = 64;
        o.max_bytes = 64 << 10;
        o.factor = 8;
        o.iters = 2;
        o.warmup = 1;
        LaunchOptions l;
        l.ranks = 4;
        l.virtual_nodes = 2;
        std::vector<CommBenchResult> results(4);
        launch(l, [&](const std::shared_ptr<Communicator>& c) { results[c->rank()] = run_commbench(*c, o); });
        ASSERT_EQ(results[0].rows.size(), 4u) << op;  // 64, 512, 4K, 32K
        for (auto& row : results[0].rows) {
            EXPECT_EQ(row.wrong, 0u) << op << " " << row.bytes;
            EXPECT_GT(row.time_us, 0) << op;
        }
        EXPECT_EQ(results[0].nodes, 2);
        if (op != "p2p") {
            EXPECT_GT(results[0].bytes_sent.inter_node, 0u) << op;
        }
    }
}

TEST(CommBench, RejectsBadOptions) {
    CommBenchOptions o;
    o.op = "broadcastish";
    EXPECT_THROW(validate(o), ConfigError);
    o.op = "alltoall";
    o.min_bytes = 10;
    o.max_bytes = 5;
    EXPECT_THROW(validate(o), ConfigError);
    o.max_bytes = 100;
    o.iters = 0;
    EXPECT_THROW(validate(o), ConfigError);
}

}  // namespace
}  // namespace duplex
