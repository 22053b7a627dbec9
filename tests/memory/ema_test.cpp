#include "memory/ema.hpp"

#include <cstdio>
#include <filesystem>
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

TEST(CpuEma, SaveThenLoadRestoresTheShadowAndRejectsBadInput) {
    std::vector<double> w = {1, 2, 3}, v = {7, 5};
    CpuEma<double> ema({3, 2}, 0.5);
    ema.initialize({w.data(), v.data()});
    std::vector<double> w2 = {3, 3, 3}, v2 = {1, 1};
    ema.submit({w2.data(), v2.data()});
    std::vector<std::vector<double>> saved = ema.shadow();
    EXPECT_EQ(saved[0], (std::vector<double>{2, 2.5, 3}));
    std::string path = ::testing::TempDir() + "ema_test.bin";
    ema.save(path);
    // Into a fresh EMA of the same layout: the same shadow, and updates go on from it.
    CpuEma<double> back({3, 2}, 0.5);
    back.initialize({w2.data(), v2.data()});
    back.load(path);
    EXPECT_EQ(back.shadow(), saved);
    back.submit({w2.data(), v2.data()});
    EXPECT_EQ(back.shadow()[0], (std::vector<double>{2.5, 2.75, 3}));
    // Another layout, another dtype, a truncated file: refused, the shadow untouched.
    CpuEma<double> other({3}, 0.5);
    EXPECT_THROW(other.load(path), ConfigError);
    CpuEma<float> narrow({3, 2}, 0.5);
    EXPECT_THROW(narrow.load(path), ConfigError);
    std::filesystem::resize_file(path, std::filesystem::file_size(path) - 8);
    CpuEma<double> cut({3, 2}, 0.5);
    cut.initialize({w.data(), v.data()});
    EXPECT_THROW(cut.load(path), ConfigError);
    EXPECT_EQ(cut.shadow()[0], w);
    std::remove(path.c_str());
    EXPECT_THROW(CpuEma<float>({1}, 1.0), ConfigError);
    EXPECT_THROW(ema.submit({w.data()}), ConfigError);  // one tensor for an EMA of two
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
