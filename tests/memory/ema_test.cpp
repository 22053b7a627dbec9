#include "memory/ema.hpp"

#include <cstdio>
#include <fstream>

#include <gtest/gtest.h>

#include "core/error.hpp"
#include "memory/ledger.hpp"

namespace duplex {
namespace {

TEST(CpuEma, EqualsAStraightforwardEma) {
    std::vector<float> w0(1000), w1(3);
    CpuEma<float> ema({w0.size(), w1.size()}, 0.9);
    for (size_t i = 0; i < w0.size(); ++i) w0[i] = float(i);
    ema.initialize({w0.data(), w1.data()});
    std::vector<float> ref0 = w0, ref1 = w1;
    for (int step = 1; step <= 20; ++step) {
        for (size_t i = 0; i < w0.size(); ++i) w0[i] += 0.5f * float(step % 3);
        for (float& v : w1) v -= 1.0f;
        ema.submit({w0.data(), w1.data()});  // returns before the update; the weights may change right after
        for (size_t i = 0; i < w0.size(); ++i) ref0[i] = float(0.9 * ref0[i] + (1 - 0.9) * w0[i]);
        for (size_t i = 0; i < w1.size(); ++i) ref1[i] = float(0.9 * ref1[i] + (1 - 0.9) * w1[i]);
    }
    EXPECT_EQ(ema.shadow()[0], ref0);
    EXPECT_EQ(ema.shadow()[1], ref1);
    EXPECT_EQ(ema.updates(), 20);
}

TEST(CpuEma, SavesTheShadowAndRejectsBadInput) {
    std::vector<double> w = {1, 2, 3};
    CpuEma<double> ema({3}, 0.5);
    ema.initialize({w.data()});
    std::string path = ::testing::TempDir() + "ema_test.bin";
    ema.save(path);
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    EXPECT_EQ(size_t(in.tellg()), 3 * 8 + 8 + 3 * sizeof(double));
    std::remove(path.c_str());
    EXPECT_THROW(CpuEma<float>({1}, 1.0), ConfigError);
    EXPECT_THROW(ema.submit({w.data(), w.data()}), ConfigError);
}

TEST(MemoryLedger, TracksLiveAndPeakPerCategory) {
    MemoryLedger l;
    l.add("activations", 100);
    l.add("wgrad_inputs", 50);
    l.release("activations", 100);
    l.add("activations", 30);
    EXPECT_EQ(l.peak("activations"), 100);
    EXPECT_EQ(l.live("activations"), 30);
    EXPECT_EQ(l.peak_total(), 150);
    EXPECT_THROW(l.release("activations", 31), Error);
}

}  // namespace
}  // namespace duplex
