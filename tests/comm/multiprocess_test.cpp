// The reference checks with one rank per process: run under mpirun by ctest, e.g.
//   mpirun -np 4 duplex_comm_mp_tests --backend=ucx
// Every process runs every test on its own rank; only rank 0 prints; any failing rank fails the job.
#include <cstring>

#include <gtest/gtest.h>

#include "comm/launch.hpp"
#include "tests/comm/checks.hpp"

namespace duplex {
namespace {

std::shared_ptr<Communicator> g_world;

class MultiProcessOps : public ::testing::TestWithParam<std::tuple<std::string, size_t>> {};

TEST_P(MultiProcessOps, MatchesReference) {
    auto [op, size] = GetParam();
    EXPECT_EQ(testing::check_op(*g_world, op, size), "");
}

INSTANTIATE_TEST_SUITE_P(All, MultiProcessOps,
                         ::testing::Combine(::testing::ValuesIn(testing::kOps),
                                            ::testing::ValuesIn(testing::kMessageSizes)),
                         [](const auto& info) {
                             return fmt::format("{}_{}B", std::get<0>(info.param), std::get<1>(info.param));
                         });

TEST(MultiProcess, Split) { EXPECT_EQ(testing::check_split(*g_world), ""); }
TEST(MultiProcess, ManyInFlight) { EXPECT_EQ(testing::check_many_in_flight(*g_world), ""); }
TEST(MultiProcess, BarrierHoldsEveryRankUntilTheLastArrives) { EXPECT_EQ(testing::check_barrier(*g_world), ""); }

TEST(MultiProcess, ReceiveTimesOut) {
    char buf[4];
    int peer = (g_world->rank() + 1) % g_world->size();
    auto w = g_world->irecv(buf, 4, peer, 4000000);  // nobody sends this tag
    EXPECT_THROW(w->wait(0.2), TimeoutError);
    g_world->barrier()->wait();
}

}  // namespace
}  // namespace duplex

int main(int argc, char** argv) {
    ::testing::InitGoogleTest(&argc, argv);
    std::string backend = "mpi";
    for (int i = 1; i < argc; ++i)
        if (std::strncmp(argv[i], "--backend=", 10) == 0) backend = argv[i] + 10;
    if (!duplex::backend_built(backend)) {
        std::printf("backend %s is not built: skipped\n", backend.c_str());
        return 77;  // ctest's SKIP_RETURN_CODE: reported as skipped, not passed
    }
    int rc = 0;
    duplex::LaunchOptions o;
    o.backend = backend;
    duplex::launch(o, [&](const std::shared_ptr<duplex::Communicator>& world) {
        duplex::g_world = world;
        if (world->rank() != 0) {
            auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
            delete listeners.Release(listeners.default_result_printer());
        }
        rc = RUN_ALL_TESTS();
        // Every rank learns whether any rank failed.
        int64_t failed = rc != 0;
        world->all_reduce(&failed, 1, duplex::DType::I64)->wait();
        if (failed && world->rank() == 0) std::printf("%lld rank(s) failed\n", static_cast<long long>(failed));
        rc = failed ? 1 : 0;
        duplex::g_world.reset();
    });
    return rc;
}
