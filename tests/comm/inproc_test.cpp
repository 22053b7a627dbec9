// The Communicator over the in-process backend: every operation × world size × message size against the
// reference checks, plus sub-communicators, out-of-order completion, timeouts and failure propagation.
#include <algorithm>
#include <atomic>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <tuple>

#include <gtest/gtest.h>

#include "comm/launch.hpp"
#include "tests/comm/checks.hpp"

namespace duplex {
namespace {

using testing::check_many_in_flight;
using testing::check_op;
using testing::check_split;

// Runs fn on `ranks` threads and returns the failures it reported, one line per rank.
std::string run_ranks(int ranks, const std::function<std::string(Communicator&)>& fn, double timeout_s = 60) {
    std::mutex mutex;
    std::string failures;
    LaunchOptions o;
    o.ranks = ranks;
    o.timeout_s = timeout_s;
    launch(o, [&](const std::shared_ptr<Communicator>& comm) {
        std::string e = fn(*comm);
        if (!e.empty()) {
            std::lock_guard<std::mutex> lock(mutex);
            failures += e + "\n";
        }
    });
    return failures;
}

class InprocOps : public ::testing::TestWithParam<std::tuple<std::string, int, size_t>> {};

TEST_P(InprocOps, MatchesReference) {
    auto [op, ranks, size] = GetParam();
    EXPECT_EQ(run_ranks(ranks, [&](Communicator& c) { return check_op(c, op, size); }), "");
}

INSTANTIATE_TEST_SUITE_P(All, InprocOps,
                         ::testing::Combine(::testing::ValuesIn(testing::kOps), ::testing::Values(1, 2, 3, 4, 8),
                                            ::testing::ValuesIn(testing::kMessageSizes)),
                         [](const auto& info) {
                             return fmt::format("{}_np{}_{}B", std::get<0>(info.param), std::get<1>(info.param),
                                                std::get<2>(info.param));
                         });

class InprocWorld : public ::testing::TestWithParam<int> {};

TEST_P(InprocWorld, SplitIntoSubCommunicators) { EXPECT_EQ(run_ranks(GetParam(), check_split), ""); }
TEST_P(InprocWorld, ManyInFlightCompleteOutOfOrder) { EXPECT_EQ(run_ranks(GetParam(), check_many_in_flight), ""); }
TEST_P(InprocWorld, BarrierHoldsEveryRankUntilTheLastArrives) {
    EXPECT_EQ(run_ranks(GetParam(), testing::check_barrier), "");
}

INSTANTIATE_TEST_SUITE_P(All, InprocWorld, ::testing::Values(1, 2, 3, 4, 8));

TEST(Inproc, ReduceScatterIsDeterministicAcrossRuns) {
    std::vector<float> first;
    for (int run = 0; run < 3; ++run) {
        std::vector<float> got;
        std::mutex m;
        LaunchOptions o;
        o.ranks = 5;
        launch(o, [&](const std::shared_ptr<Communicator>& c) {
            std::vector<float> send(5 * 1000), recv(1000);
            testing::fill_values(send.data(), send.size(), 0, c->rank(), DType::F32);
            c->reduce_scatter(send.data(), recv.data(), 1000, DType::F32)->wait();
            if (c->rank() == 2) {
                std::lock_guard<std::mutex> lock(m);
                got = recv;
            }
        });
        if (run == 0) first = got;
        else EXPECT_EQ(std::memcmp(first.data(), got.data(), first.size() * 4), 0);
    }
}

TEST(Inproc, ReceiveThatNeverMatchesTimesOutNamingThePeer) {
    std::string message;
    LaunchOptions o;
    o.ranks = 2;
    launch(o, [&](const std::shared_ptr<Communicator>& c) {
        if (c->rank() != 0) return;
        char buf[8];
        auto w = c->irecv(buf, 8, 1, 3);
        Stopwatch sw;
        try {
            w->wait(0.2);
        } catch (const TimeoutError& e) {
            message = e.what();
        }
        EXPECT_LT(sw.seconds(), 5.0);
    });
    EXPECT_NE(message.find("irecv with peer 1"), std::string::npos) << message;
    EXPECT_NE(message.find("rank 0"), std::string::npos) << message;
}

TEST(Inproc, CollectiveWithAMissingRankTimesOut) {
    std::string message;
    LaunchOptions o;
    o.ranks = 3;
    o.timeout_s = 0.3;
    launch(o, [&](const std::shared_ptr<Communicator>& c) {
        if (c->rank() == 2) return;  // never joins
        try {
            std::vector<float> buf(64, 1.0f);
            c->all_reduce(buf.data(), buf.size(), DType::F32)->wait();
        } catch (const TimeoutError& e) {
            if (c->rank() == 0) message = e.what();
        }
    });
    EXPECT_NE(message.find("all_reduce"), std::string::npos) << message;
    EXPECT_NE(message.find("peer 2"), std::string::npos) << message;
}

TEST(Inproc, ARankThatThrowsFailsEveryWaitingRank) {
    std::mutex m;
    std::vector<std::string> seen;
    LaunchOptions o;
    o.ranks = 4;
    o.timeout_s = 60;  // far longer than the test may take: failure must come from the abort, not a timeout
    Stopwatch sw;
    try {
        launch(o, [&](const std::shared_ptr<Communicator>& c) {
            if (c->rank() == 1) throw std::runtime_error("boom in layer 3");
            try {
                c->barrier()->wait();
            } catch (const CommError& e) {
                std::lock_guard<std::mutex> lock(m);
                seen.push_back(e.what());
                throw;
            }
        });
        FAIL() << "launch did not rethrow";
    } catch (const std::runtime_error& e) {
        EXPECT_NE(std::string(e.what()).find("boom"), std::string::npos);
    }
    EXPECT_LT(sw.seconds(), 10.0);
    ASSERT_EQ(seen.size(), 3u);
    for (auto& s : seen) EXPECT_NE(s.find("rank 1 failed: boom in layer 3"), std::string::npos) << s;
}

TEST(Inproc, SizeMismatchFailsBothSides) {
    std::atomic<int> errors{0};
    LaunchOptions o;
    o.ranks = 2;
    launch(o, [&](const std::shared_ptr<Communicator>& c) {
        char buf[16] = {};
        auto w = c->rank() == 0 ? c->isend(buf, 16, 1, 0) : c->irecv(buf, 8, 0, 0);
        try {
            w->wait();
        } catch (const CommError& e) {
            if (std::string(e.what()).find("size mismatch") != std::string::npos) ++errors;
        }
    });
    EXPECT_EQ(errors.load(), 2);
}

// A collective whose first request fails withdraws the others before its error reaches the caller, who may then
// free or reuse their buffers: a message that arrives afterwards must not land in them. Rank 2 sends rank 0 half
// the bytes it expects (rank 0's first receive fails); rank 1 joins only once rank 0 has given up and refilled its
// buffer. Bug it catches: rethrowing a failed request's error with the other receives still posted.
TEST(Inproc, FailedCollectiveWithdrawsItsOtherReceives) {
    constexpr size_t B = 64;
    std::atomic<int> phase{0};
    std::atomic<int> rank0_errors{0};
    std::vector<char> rank0_recv;
    LaunchOptions o;
    o.ranks = 3;
    o.timeout_s = 2;
    launch(o, [&](const std::shared_ptr<Communicator>& c) {
        std::vector<size_t> offsets = {0, B, 2 * B}, bytes(3, B), send_bytes = bytes;
        std::vector<char> send(3 * B, char('a' + c->rank())), recv(3 * B, 0);
        if (c->rank() == 2) send_bytes[0] = B / 2;
        if (c->rank() == 1)
            while (phase.load() < 1) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        try {
            c->all_to_all_v(send.data(), send_bytes, offsets, recv.data(), bytes, offsets)->wait();
        } catch (const CommError&) {
            if (c->rank() == 0) ++rank0_errors;
        }
        if (c->rank() == 0) {
            std::fill(recv.begin(), recv.end(), 'z');  // the caller owns its buffer again
            phase = 1;
            while (phase.load() < 2) std::this_thread::sleep_for(std::chrono::milliseconds(1));
            rank0_recv = recv;
        } else if (c->rank() == 1) {
            phase = 2;  // its collective ended (rank 0 no longer takes part: it timed out)
        }
    });
    EXPECT_EQ(rank0_errors.load(), 1);
    ASSERT_EQ(rank0_recv.size(), 3 * B);
    EXPECT_EQ(std::count(rank0_recv.begin(), rank0_recv.end(), 'z'), long(3 * B)) << "rank 1's block landed after the error";
}

TEST(Inproc, BadArgumentsAreRejected) {
    LaunchOptions o;
    o.ranks = 2;
    launch(o, [&](const std::shared_ptr<Communicator>& c) {
        char b = 0;
        EXPECT_THROW(c->isend(&b, 1, 2, 0), ConfigError);
        EXPECT_THROW(c->irecv(&b, 1, -1, 0), ConfigError);
        EXPECT_THROW(c->isend(&b, 1, 0, kMaxUserTag), ConfigError);
        std::vector<size_t> wrong(3, 0);
        EXPECT_THROW(c->all_to_all_v(&b, wrong, wrong, &b, wrong, wrong), ConfigError);
        EXPECT_THROW(c->all_reduce(&b, 1, DType::E4M3), ConfigError);
    });
    o.ranks = 0;
    EXPECT_THROW(launch(o, [](const std::shared_ptr<Communicator>&) {}), ConfigError);
    o.ranks = 6;
    o.virtual_nodes = 4;
    EXPECT_THROW(launch(o, [](const std::shared_ptr<Communicator>&) {}), ConfigError);
}

TEST(Inproc, CountsBytesPerLinkClass) {
    std::mutex m;
    LinkBytes rank0;
    LaunchOptions o;
    o.ranks = 4;
    o.virtual_nodes = 2;  // ranks 0,1 | 2,3
    launch(o, [&](const std::shared_ptr<Communicator>& c) {
        std::vector<char> send(4 * 100), recv(4 * 100);
        c->all_to_all(send.data(), recv.data(), 100)->wait();
        if (c->rank() == 0) {
            std::lock_guard<std::mutex> lock(m);
            rank0 = c->bytes_sent();
        }
    });
    EXPECT_EQ(rank0.intra_node, 100u);  // to rank 1
    EXPECT_EQ(rank0.inter_node, 200u);  // to ranks 2 and 3
}

TEST_P(InprocWorld, WorkNobodyWaitsOnCompletes) {
    EXPECT_EQ(run_ranks(GetParam(), testing::check_progress_without_waiting), "");
}

TEST(Inproc, OverlapsWithCompute) {
    // The exchange completes while this rank computes: a posted receive finishes without a wait() call.
    LaunchOptions o;
    o.ranks = 2;
    launch(o, [&](const std::shared_ptr<Communicator>& c) {
        std::vector<char> a(1 << 20, 1), b(1 << 20, 0);
        if (c->rank() == 0) {
            auto w = c->irecv(b.data(), b.size(), 1, 5);
            Deadline d(30);
            while (!w->test() && !d.expired()) std::this_thread::yield();
            EXPECT_TRUE(w->test());
            EXPECT_EQ(b[12345], 1);
        } else {
            c->isend(a.data(), a.size(), 0, 5)->wait();
        }
    });
}

}  // namespace
}  // namespace duplex
