// GPU tests (ctest label `gpu`): skipped, not failed, where no GPU is present.
#include "kernels/cuda/device.hpp"

#include <cmath>

#include <gtest/gtest.h>

#include "core/clock.hpp"
#include "core/dtype.hpp"

namespace duplex {
namespace {

TEST(Cuda, Fp8ConversionMatchesHostBitForBit) {
    if (cuda_devices().empty()) GTEST_SKIP() << "no CUDA device";
    Rng rng(3);
    std::vector<float> in(1 << 16);
    for (size_t i = 0; i < in.size(); ++i) in[i] = float(rng.normal() * std::pow(2.0, double(rng.below(20)) - 10));
    in[0] = INFINITY;
    in[1] = NAN;
    in[2] = 464.0f;
    std::vector<unsigned char> out(in.size());
    cuda_fp32_to_e4m3(in.data(), out.data(), in.size());
    for (size_t i = 0; i < in.size(); ++i) ASSERT_EQ(out[i], fp32_to_e4m3(in[i])) << in[i];
}

TEST(Cuda, ReportsDevicesWithoutFailing) {
    for (const auto& d : cuda_devices()) EXPECT_GT(d.num_sms, 0);
}

}  // namespace
}  // namespace duplex
