#include "comm/topology.hpp"

#include <pthread.h>
#include <sched.h>

#include <string>
#include <thread>
#include <vector>

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

// Where hwloc reports cores, binding must take: the thread's affinity narrows to that core's processing units
// (all of the machine's when it has one core) and the thread then runs on one of them.
TEST(Topology, RanksOutnumberCoresCountsOnlyTheirHost) {
    int cores = num_cores();
    std::vector<std::string> hosts(size_t(cores), "a");
    hosts.push_back("b");
    EXPECT_FALSE(ranks_outnumber_cores(hosts, "a")) << cores << " ranks on " << cores << " cores";
    hosts.push_back("a");
    EXPECT_TRUE(ranks_outnumber_cores(hosts, "a")) << cores + 1 << " ranks on " << cores << " cores";
    EXPECT_FALSE(ranks_outnumber_cores(hosts, "b")) << "one rank on host b";
}

TEST(Topology, BindsToACore) {
    ASSERT_GE(num_cores(), 1);
    int core = -2, allowed = 0, ran_on = -1, before = 0;
    bool on_allowed = false;
    std::thread([&] {
        cpu_set_t set;
        CPU_ZERO(&set);
        pthread_getaffinity_np(pthread_self(), sizeof(set), &set);
        before = CPU_COUNT(&set);
        core = bind_thread_to_core(num_cores() + 1);  // wraps modulo the cores
        CPU_ZERO(&set);
        pthread_getaffinity_np(pthread_self(), sizeof(set), &set);
        allowed = CPU_COUNT(&set);
        ran_on = sched_getcpu();
        on_allowed = ran_on >= 0 && CPU_ISSET(ran_on, &set);
    }).join();
    EXPECT_EQ(core, 1 % num_cores());
    EXPECT_TRUE(on_allowed) << "ran on CPU " << ran_on;
    if (num_cores() > 1) {
        EXPECT_LT(allowed, before) << "binding left the thread free on every CPU";
    }
    EXPECT_GE(allowed, 1);
}

}  // namespace
}  // namespace duplex
