// The NCCL backend on the GPUs this machine has (ctest label `gpu`; skipped without one): one rank per device,
// ranks as threads, bootstrapped through an in-memory store; every op against its obvious result.
#include "comm/nccl/nccl_communicator.hpp"

#include <cuda_runtime.h>

#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "core/error.hpp"

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

}  // namespace
}  // namespace duplex
