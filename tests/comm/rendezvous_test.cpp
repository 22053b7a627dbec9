// The rendezvous protocol that lets order-only channels (NCCL's point-to-point calls) carry tagged messages:
// the Communicator's whole reference suite over it, with host channels that, like NCCL, match a pair's
// payloads strictly in posting order and know nothing of tags. A payload posted out of the receiver's
// matching order lands in the wrong buffer here, so the checks catch it.
#include <atomic>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "comm/inproc/inproc_transport.hpp"
#include "comm/launch.hpp"
#include "comm/rendezvous_transport.hpp"
#include "core/clock.hpp"
#include "tests/comm/checks.hpp"
#ifdef DUPLEX_HAVE_NCCL
#include "comm/nccl/nccl_channels.hpp"
#endif

namespace duplex {
namespace {

constexpr uint64_t kPayloadTag = 7;

// Host channels that call one buffer per rank "device memory" (to test the Communicator's refusal of it).
class MarkedChannels : public ByteChannels {
public:
    MarkedChannels(std::shared_ptr<ByteChannels> inner, const void* device_buf)
        : inner_(std::move(inner)), device_buf_(device_buf) {}
    std::string describe() const override { return inner_->describe(); }
    void post_send(int peer, const void* buf, size_t bytes, Done done) override {
        inner_->post_send(peer, buf, bytes, std::move(done));
    }
    void post_recv(int peer, void* buf, size_t bytes, Done done) override {
        inner_->post_recv(peer, buf, bytes, std::move(done));
    }
    bool poll() override { return inner_->poll(); }
    void fail(int peer, const std::string& reason) override { inner_->fail(peer, reason); }
    bool device_memory(const void* buf) const override { return buf == device_buf_; }

private:
    std::shared_ptr<ByteChannels> inner_;
    const void* device_buf_;
};

using ChannelsFor = std::function<std::shared_ptr<ByteChannels>(std::shared_ptr<Transport> control)>;

// Runs fn on `ranks` threads, each with a Communicator over a RendezvousTransport whose control and payload
// messages are in-process messages on different tags; returns the failures fn reported, one line per rank.
std::string run_rendezvous(int ranks, const std::function<std::string(Communicator&)>& fn, double timeout_s = 60,
                           const ChannelsFor& channels_for = nullptr) {
    auto fabric = InprocFabric::create(ranks);
    std::mutex mutex;
    std::string failures;
    std::vector<std::thread> threads;
    for (int r = 0; r < ranks; ++r)
        threads.emplace_back([&, r] {
            std::shared_ptr<Transport> control = fabric->transport(r);
            auto channels = channels_for ? channels_for(control) : make_transport_channels(control, kPayloadTag);
            auto transport = std::make_shared<RendezvousTransport>(control, channels, "rendezvous");
            std::string e;
            try {
                auto comm = Communicator::create(transport, Topology::single_node(ranks), {timeout_s});
                e = fn(*comm);
            } catch (const std::exception& ex) {
                e = fmt::format("rank {} threw: {}", r, ex.what());
                transport->abort(ex.what());
            }
            if (!e.empty()) {
                std::lock_guard<std::mutex> lock(mutex);
                failures += e + "\n";
            }
        });
    for (auto& t : threads) t.join();
    return failures;
}

class RendezvousOps : public ::testing::TestWithParam<std::tuple<std::string, int, size_t>> {};

TEST_P(RendezvousOps, MatchesReference) {
    auto [op, ranks, size] = GetParam();
    EXPECT_EQ(run_rendezvous(ranks, [&](Communicator& c) { return testing::check_op(c, op, size); }), "");
}

INSTANTIATE_TEST_SUITE_P(All, RendezvousOps,
                         ::testing::Combine(::testing::ValuesIn(testing::kOps), ::testing::Values(1, 2, 3, 5),
                                            ::testing::ValuesIn(testing::kMessageSizes)),
                         [](const auto& info) {
                             return fmt::format("{}_np{}_{}B", std::get<0>(info.param), std::get<1>(info.param),
                                                std::get<2>(info.param));
                         });

TEST(Rendezvous, SplitAndManyInFlight) {
    EXPECT_EQ(run_rendezvous(4, testing::check_split), "");
    EXPECT_EQ(run_rendezvous(4, testing::check_many_in_flight), "");
    EXPECT_EQ(run_rendezvous(3, testing::check_barrier), "");
}

// The receiver posts its tags in the reverse of the sender's order, half of them before the sends and half after:
// each payload still reaches the receive of its tag. (Channels that move payloads in the sender's order would put
// tag 0's bytes into tag 15's buffer.)
TEST(Rendezvous, TagsPostedInAnyOrderReachTheirReceives) {
    constexpr int kTags = 16;
    EXPECT_EQ(run_rendezvous(2, [](Communicator& c) -> std::string {
                  auto payload = [](int tag, size_t i) { return uint8_t(tag * 31 + i * 7 + 1); };
                  auto size_of = [](int tag) { return size_t(1000 + 37 * tag); };
                  if (c.rank() == 0) {
                      std::vector<std::vector<uint8_t>> bufs(kTags);
                      std::vector<WorkPtr> works;
                      for (int t = 0; t < kTags; ++t) {
                          bufs[t].resize(size_of(t));
                          for (size_t i = 0; i < bufs[t].size(); ++i) bufs[t][i] = payload(t, i);
                          works.push_back(c.isend(bufs[t].data(), bufs[t].size(), 1, uint32_t(t)));
                          if (t == kTags / 2) std::this_thread::sleep_for(std::chrono::milliseconds(20));
                      }
                      wait_all(works);
                      return "";
                  }
                  std::vector<std::vector<uint8_t>> bufs(kTags);
                  std::vector<WorkPtr> works;
                  for (int t = kTags - 1; t >= 0; --t) {
                      bufs[t].assign(size_of(t), 0);
                      works.push_back(c.irecv(bufs[t].data(), bufs[t].size(), 0, uint32_t(t)));
                      if (t == kTags / 2) std::this_thread::sleep_for(std::chrono::milliseconds(20));
                  }
                  wait_all(works);
                  for (int t = 0; t < kTags; ++t)
                      for (size_t i = 0; i < bufs[t].size(); ++i)
                          if (bufs[t][i] != payload(t, i)) return fmt::format("tag {} byte {} wrong", t, i);
                  return "";
              }),
              "");
}

// Two messages with the same tag arrive in the order they were sent, even when the second receive is posted first
// to a different tag in between.
TEST(Rendezvous, SameTagKeepsItsOrder) {
    EXPECT_EQ(run_rendezvous(2, [](Communicator& c) -> std::string {
                  int a = 0, b = 0, x = 0;
                  if (c.rank() == 0) {
                      int one = 1, two = 2, three = 3;
                      wait_all({c.isend(&one, 4, 1, 5), c.isend(&three, 4, 1, 6), c.isend(&two, 4, 1, 5)});
                      return "";
                  }
                  auto wx = c.irecv(&x, 4, 0, 6);
                  auto wa = c.irecv(&a, 4, 0, 5);
                  auto wb = c.irecv(&b, 4, 0, 5);
                  wait_all({wx, wa, wb});
                  return a == 1 && b == 2 && x == 3 ? "" : fmt::format("got a={} b={} x={}", a, b, x);
              }),
              "");
}

TEST(Rendezvous, SizeMismatchFailsBothSidesBeforeAnyPayloadMoves) {
    std::mutex m;
    std::vector<std::string> errors;
    run_rendezvous(2, [&](Communicator& c) -> std::string {
        std::vector<char> buf(64, 'x');
        auto w = c.rank() == 0 ? c.isend(buf.data(), 64, 1, 3) : c.irecv(buf.data(), 16, 0, 3);
        try {
            w->wait();
        } catch (const CommError& e) {
            std::lock_guard<std::mutex> lock(m);
            errors.push_back(e.what());
        }
        if (c.rank() == 1 && buf[0] != 'x') return "the receive buffer was written";
        // The pair still works afterwards.
        int v = 41 + c.rank();
        if (c.rank() == 0) c.isend(&v, 4, 1, 3)->wait();
        else c.irecv(&v, 4, 0, 3)->wait();
        return v == 41 ? "" : fmt::format("rank {}: later message carried {}", c.rank(), v);
    });
    ASSERT_EQ(errors.size(), 2u);
    for (auto& e : errors)
        EXPECT_NE(e.find("message size mismatch: rank 0 sent 64 bytes to rank 1 which posted 16 bytes"),
                  std::string::npos)
            << e;
}

TEST(Rendezvous, ACancelledReceiveLeavesTheNextOneItsMessage) {
    EXPECT_EQ(run_rendezvous(2, [](Communicator& c) -> std::string {
                  int v = 0;
                  if (c.rank() == 1) {
                      auto w = c.irecv(&v, 4, 0, 9);
                      try {
                          w->wait(0.05);  // nothing sent yet: times out and withdraws the receive
                          return "the first receive completed";
                      } catch (const TimeoutError&) {
                      }
                      c.barrier()->wait();
                      c.irecv(&v, 4, 0, 9)->wait();
                      return v == 77 ? "" : fmt::format("got {}", v);
                  }
                  c.barrier()->wait();
                  int w = 77;
                  c.isend(&w, 4, 1, 9)->wait();
                  return "";
              }),
              "");
}

TEST(Rendezvous, ARankThatGivesUpFailsItsPeersWaits) {
    std::mutex m;
    std::vector<std::string> seen;
    Stopwatch sw;
    std::string failures = run_rendezvous(
        3,
        [&](Communicator& c) -> std::string {
            if (c.rank() == 2) throw std::runtime_error("out of memory in layer 7");
            int v = 0;
            try {
                c.irecv(&v, 4, 2, 1)->wait();
            } catch (const CommError& e) {
                std::lock_guard<std::mutex> lock(m);
                seen.push_back(e.what());
            }
            return "";
        },
        /*timeout_s=*/60);
    EXPECT_LT(sw.seconds(), 10.0);
    EXPECT_NE(failures.find("out of memory in layer 7"), std::string::npos) << failures;
    ASSERT_EQ(seen.size(), 2u);
    for (auto& s : seen) EXPECT_NE(s.find("rank 2 failed: out of memory in layer 7"), std::string::npos) << s;
}

TEST(Rendezvous, CollectivesRefuseDeviceBuffersAndPointToPointTakesThem) {
    std::vector<std::vector<float>> marked(2, std::vector<float>(8, 1.0f));
    std::atomic<int> refused{0};
    EXPECT_EQ(run_rendezvous(
                  2,
                  [&](Communicator& c) -> std::string {
                      float* dev = marked[c.rank()].data();
                      try {
                          c.all_reduce(dev, 8, DType::F32)->wait();
                      } catch (const ConfigError& e) {
                          if (std::string(e.what()).find("device memory") != std::string::npos) ++refused;
                      }
                      std::vector<float> host(8, float(c.rank() + 2));
                      c.all_reduce(host.data(), 8, DType::F32)->wait();
                      if (host[3] != 5.0f) return fmt::format("host all_reduce gave {}", host[3]);
                      // Point-to-point moves the "device" buffer through the channels.
                      if (c.rank() == 0) {
                          dev[0] = 9.0f;
                          c.isend(dev, 32, 1, 2)->wait();
                      } else {
                          c.irecv(dev, 32, 0, 2)->wait();
                          if (dev[0] != 9.0f) return "p2p did not move the marked buffer";
                      }
                      return "";
                  },
                  60,
                  [&](std::shared_ptr<Transport> control) {
                      return std::make_shared<MarkedChannels>(make_transport_channels(control, kPayloadTag),
                                                              marked[control->rank()].data());
                  }),
              "");
    EXPECT_EQ(refused.load(), 2);
}

TEST(Rendezvous, DescribesItsLayers) {
    EXPECT_EQ(run_rendezvous(1, [](Communicator& c) -> std::string {
                  std::string d = c.backend_description();
                  return d.find("rendezvous (payloads over inproc messages, control over inproc)") == 0 ? "" : d;
              }),
              "");
    auto fabric = InprocFabric::create(1);
    EXPECT_THROW(make_transport_channels(fabric->transport(0), RendezvousTransport::kControlTag), ConfigError);
}

#ifdef DUPLEX_HAVE_NCCL
// Without a GPU the nccl backend says so before any rank starts; with fewer GPUs than ranks, the same.
TEST(Rendezvous, NcclBackendNeedsOneGpuPerRank) {
    int gpus = visible_cuda_devices();
    LaunchOptions o;
    o.backend = "nccl";
    o.ranks = gpus + 1;
    bool ran = false;
    try {
        launch(o, [&](const std::shared_ptr<Communicator>&) { ran = true; });
        FAIL() << "launch accepted " << o.ranks << " ranks on " << gpus << " GPUs";
    } catch (const ConfigError& e) {
        std::string what = e.what();
        if (gpus == 0)
            EXPECT_NE(what.find("nccl needs a CUDA device and this machine shows none"), std::string::npos) << what;
        else
            EXPECT_NE(what.find("each rank on a GPU of its own"), std::string::npos) << what;
    }
    EXPECT_FALSE(ran);
    EXPECT_TRUE(backend_built("nccl"));
}
#endif

}  // namespace
}  // namespace duplex
