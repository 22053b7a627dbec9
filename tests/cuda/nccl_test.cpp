// The NCCL backend on the GPUs this machine has (ctest label `gpu`; skipped without one): one rank per device,
// ranks as threads, bootstrapped through an in-memory store; every op against its obvious result. Then the nccl
// transport launch() selects (needs two GPUs: NCCL puts one rank per device): the Communicator's reference checks
// on host buffers, and point-to-point on device buffers in any tag order.
#include "comm/nccl/nccl_communicator.hpp"

#include <cuda_runtime.h>

#include <functional>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "comm/launch.hpp"
#include "core/error.hpp"
#include "tests/comm/checks.hpp"

#include "kernels/cuda/device.hpp"
#include "tests/cuda/device_copy.hpp"

namespace duplex {
namespace {

using test_support::to_device;
using test_support::to_host;

TEST(Nccl, EveryOpOnEveryDevice) {
    int devices = int(cuda_devices().size());
    if (devices == 0) GTEST_SKIP() << "no CUDA device";
    InMemoryStore store;
    std::vector<std::string> failures(devices);
    std::vector<std::thread> ranks;
    for (int r = 0; r < devices; ++r)
        ranks.emplace_back([&, r] {
            try {
                auto c = NcclCommunicator::create(store, r, devices, r, "nccl/test", 60);
                const int n = 1000;
                // all_reduce: sum of (rank + 1) * i
                std::vector<float> v(n);
                for (int i = 0; i < n; ++i) v[i] = float((r + 1) * i);
                float* d = to_device(v);
                c->all_reduce(d, n, DType::F32)->wait();
                auto got = to_host(d, n);
                float ranks_sum = float(devices * (devices + 1) / 2);
                for (int i = 0; i < n; ++i)
                    if (got[i] != ranks_sum * i) throw Error(fmt::format("all_reduce[{}] = {}", i, got[i]));
                // all_to_all_v: rank r sends p + 1 bytes of value r to each p
                std::vector<size_t> sb(devices), so(devices), rb(devices), ro(devices);
                size_t st = 0, rt = 0;
                for (int p = 0; p < devices; ++p) sb[p] = p + 1, so[p] = st, st += sb[p];
                for (int p = 0; p < devices; ++p) rb[p] = r + 1, ro[p] = rt, rt += rb[p];
                std::vector<uint8_t> send(st, uint8_t(r));
                uint8_t* ds = to_device(send);
                uint8_t* dr = to_device(std::vector<uint8_t>(rt, 0xEE));
                c->all_to_all_v(ds, sb, so, dr, rb, ro)->wait();
                auto recv = to_host(dr, rt);
                for (int p = 0; p < devices; ++p)
                    for (size_t i = 0; i < rb[p]; ++i)
                        if (recv[ro[p] + i] != p) throw Error(fmt::format("all_to_all_v from {} wrong", p));
                c->barrier()->wait();
                cudaFree(d);
                cudaFree(ds);
                cudaFree(dr);
            } catch (const std::exception& e) {
                failures[r] = e.what();
            }
        });
    for (auto& t : ranks) t.join();
    for (int r = 0; r < devices; ++r) EXPECT_EQ(failures[r], "") << "rank " << r;
}

#define NEED_GPUS(n)                                                                                       \
    if (int(cuda_devices().size()) < (n))                                                                  \
    GTEST_SKIP() << "the nccl backend puts each rank on a GPU of its own: needs " << (n) << ", this machine has " \
                 << cuda_devices().size()

std::string on_nccl(int ranks, const std::function<std::string(Communicator&)>& fn) {
    std::mutex mutex;
    std::string failures;
    LaunchOptions o;
    o.backend = "nccl";
    o.ranks = ranks;
    o.timeout_s = 120;
    launch(o, [&](const std::shared_ptr<Communicator>& comm) {
        std::string e = fn(*comm);
        std::lock_guard<std::mutex> lock(mutex);
        if (!e.empty()) failures += fmt::format("rank {}: {}\n", comm->rank(), e);
    });
    return failures;
}

TEST(NcclTransport, EveryCommunicatorOpOnHostBuffersMatchesTheReference) {
    NEED_GPUS(2);
    int ranks = int(cuda_devices().size());
    EXPECT_EQ(on_nccl(ranks, [](Communicator& c) -> std::string {
                  if (c.backend_description().find("nccl (payloads over NCCL") != 0) return c.backend_description();
                  for (const std::string& op : testing::kOps)
                      for (size_t size : testing::kMessageSizes)
                          if (std::string e = testing::check_op(c, op, size); !e.empty()) return op + ": " + e;
                  if (std::string e = testing::check_split(c); !e.empty()) return e;
                  return testing::check_many_in_flight(c);
              }),
              "");
}

TEST(NcclTransport, DeviceBuffersGoPointToPointInAnyTagOrderAndCollectivesRefuseThem) {
    NEED_GPUS(2);
    EXPECT_EQ(on_nccl(2, [](Communicator& c) -> std::string {
                  const int tags = 6;
                  const size_t n = (1 << 20) + 5;
                  std::vector<uint8_t*> bufs(tags);
                  std::vector<WorkPtr> works;
                  for (int t = 0; t < tags; ++t) {
                      std::vector<uint8_t> v(n + t, c.rank() == 0 ? uint8_t(t * 17 + 3) : uint8_t(0));
                      bufs[t] = to_device(v);
                  }
                  // The receiver posts in reverse tag order: the payloads still land by tag.
                  for (int i = 0; i < tags; ++i) {
                      int t = c.rank() == 0 ? i : tags - 1 - i;
                      works.push_back(c.rank() == 0 ? c.isend(bufs[t], n + t, 1, uint32_t(t))
                                                    : c.irecv(bufs[t], n + t, 0, uint32_t(t)));
                  }
                  wait_all(works);
                  std::string error;
                  if (c.rank() == 1)
                      for (int t = 0; t < tags && error.empty(); ++t) {
                          auto got = to_host(bufs[t], n + t);
                          for (size_t i = 0; i < got.size(); ++i)
                              if (got[i] != uint8_t(t * 17 + 3)) {
                                  error = fmt::format("tag {} byte {} is {}", t, i, got[i]);
                                  break;
                              }
                      }
                  try {
                      c.all_reduce(bufs[0], 16, DType::F32);
                      error += "all_reduce took a device buffer";
                  } catch (const ConfigError&) {
                  }
                  for (uint8_t* b : bufs) cudaFree(b);
                  return error;
              }),
              "");
}

}  // namespace
}  // namespace duplex
