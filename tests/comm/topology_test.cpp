#include "comm/topology.hpp"

#include <thread>

#include <gtest/gtest.h>

#include "core/error.hpp"

namespace duplex {
namespace {

TEST(Topology, VirtualNodes) {
    Topology t = Topology::virtual_nodes(8, 2);
    EXPECT_EQ(t.num_nodes(), 2);
    EXPECT_EQ(t.local_size(1), 4);
    EXPECT_EQ(t.node(5), 1);
    EXPECT_EQ(t.local_rank(5), 1);
    EXPECT_EQ(t.link(1, 5), LinkClass::InterNode);
    EXPECT_EQ(t.link(4, 5), LinkClass::IntraNode);
    EXPECT_EQ(t.link(5, 5), LinkClass::Self);
    EXPECT_THROW(Topology::virtual_nodes(8, 3), ConfigError);
    EXPECT_THROW(Topology::virtual_nodes(8, 0), ConfigError);
}

TEST(Topology, FromHostnamesAndSubset) {
    Topology t = Topology::from_hostnames({"b", "a", "b", "a", "c"});
    EXPECT_EQ(t.num_nodes(), 3);
    EXPECT_EQ(t.node(0), 0);  // numbered by first appearance
    EXPECT_EQ(t.node(1), 1);
    EXPECT_EQ(t.ranks_on_node(0), (std::vector<int>{0, 2}));
    Topology s = t.subset({4, 1, 3});
    EXPECT_EQ(s.size(), 3);
    EXPECT_EQ(s.num_nodes(), 2);
    EXPECT_TRUE(s.same_node(1, 2));
}

TEST(Topology, BindsToACore) {
    EXPECT_GE(num_cores(), 1);
    int core = -2;
    std::thread([&] { core = bind_thread_to_core(num_cores() + 1); }).join();  // wraps modulo the cores
    EXPECT_TRUE(core == 1 % num_cores() || core == -1) << core;
}

}  // namespace
}  // namespace duplex
