#include "core/dtype.hpp"

#include <cmath>
#include <limits>

#include <gtest/gtest.h>

#include "core/clock.hpp"
#include "core/error.hpp"

namespace duplex {
namespace {

const float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

TEST(Bf16, RoundsToNearestEven) {
    EXPECT_EQ(fp32_to_bf16(1.0f), 0x3F80);
    EXPECT_EQ(fp32_to_bf16(f32_from_bits(0x3F808000u)), 0x3F80);  // tie, even stays
    EXPECT_EQ(fp32_to_bf16(f32_from_bits(0x3F818000u)), 0x3F82);  // tie, odd rounds up
    EXPECT_EQ(fp32_to_bf16(f32_from_bits(0x3F808001u)), 0x3F81);  // above the tie
    EXPECT_EQ(fp32_to_bf16(-2.0f), 0xC000);
}

TEST(Bf16, SpecialValues) {
    EXPECT_EQ(fp32_to_bf16(kInf), 0x7F80);
    EXPECT_EQ(fp32_to_bf16(-kInf), 0xFF80);
    EXPECT_TRUE(std::isnan(bf16_to_fp32(fp32_to_bf16(kNaN))));
    EXPECT_TRUE(std::isnan(bf16_to_fp32(fp32_to_bf16(f32_from_bits(0x7F800001u)))));  // signalling NaN stays NaN
    EXPECT_EQ(fp32_to_bf16(std::numeric_limits<float>::max()), 0x7F80);               // overflows to inf
    EXPECT_EQ(fp32_to_bf16(f32_from_bits(0x00010000u)), 0x0001);                      // subnormal kept
    EXPECT_EQ(fp32_to_bf16(-0.0f), 0x8000);
}

TEST(Bf16, RoundTripsEveryValue) {
    for (uint32_t h = 0; h < 0x10000; ++h) {
        float f = bf16_to_fp32(static_cast<uint16_t>(h));
        if (std::isnan(f)) continue;
        ASSERT_EQ(fp32_to_bf16(f), h);
    }
}

// Nearest e4m3 code by brute force, ties to the even code.
uint8_t nearest_e4m3(float x) {
    int best = -1;
    double best_err = 1e30;
    for (int c = 0; c < 256; ++c) {
        float v = e4m3_to_fp32(static_cast<uint8_t>(c));
        if (std::isnan(v) || std::signbit(v) != std::signbit(x)) continue;
        double err = std::fabs(double(v) - double(x));
        if (err < best_err || (err == best_err && (c & 1) == 0)) {
            best = c;
            best_err = err;
        }
    }
    return static_cast<uint8_t>(best);
}

TEST(E4M3, KnownValues) {
    EXPECT_EQ(fp32_to_e4m3(0.0f), 0x00);
    EXPECT_EQ(fp32_to_e4m3(-0.0f), 0x80);
    EXPECT_EQ(fp32_to_e4m3(1.0f), 0x38);
    EXPECT_EQ(fp32_to_e4m3(1.0625f), 0x38);   // tie between 1 and 1.125: even
    EXPECT_EQ(fp32_to_e4m3(1.1875f), 0x3A);   // tie between 1.125 and 1.25: even
    EXPECT_EQ(fp32_to_e4m3(448.0f), 0x7E);
    EXPECT_EQ(fp32_to_e4m3(-448.0f), 0xFE);
    EXPECT_EQ(e4m3_to_fp32(0x7E), 448.0f);
    EXPECT_EQ(fp32_to_e4m3(0.015625f), 0x08);  // 2^-6, smallest normal
}

TEST(E4M3, Saturates) {
    EXPECT_EQ(fp32_to_e4m3(449.0f), 0x7E);
    EXPECT_EQ(fp32_to_e4m3(464.0f), 0x7E);
    EXPECT_EQ(fp32_to_e4m3(1e30f), 0x7E);
    EXPECT_EQ(fp32_to_e4m3(kInf), 0x7E);
    EXPECT_EQ(fp32_to_e4m3(-kInf), 0xFE);
    EXPECT_EQ(fp32_to_e4m3(-1e9f), 0xFE);
}

TEST(E4M3, NaN) {
    EXPECT_EQ(fp32_to_e4m3(kNaN) & 0x7F, 0x7F);
    EXPECT_TRUE(std::isnan(e4m3_to_fp32(0x7F)));
    EXPECT_TRUE(std::isnan(e4m3_to_fp32(0xFF)));
}

TEST(E4M3, Subnormals) {
    EXPECT_EQ(fp32_to_e4m3(0.001953125f), 0x01);       // 2^-9, smallest subnormal
    EXPECT_EQ(e4m3_to_fp32(0x01), 0.001953125f);
    EXPECT_EQ(fp32_to_e4m3(0.0009765625f), 0x00);      // 2^-10: tie between 0 and 2^-9, even
    EXPECT_EQ(fp32_to_e4m3(0.00098f), 0x01);           // just above the tie
    EXPECT_EQ(fp32_to_e4m3(3 * 0.0009765625f), 0x02);  // tie between 1 and 2 subnormal steps: even
    EXPECT_EQ(fp32_to_e4m3(7.5f * 0.001953125f), 0x08);  // tie between the largest subnormal and 2^-6
    EXPECT_EQ(fp32_to_e4m3(-0.001953125f), 0x81);
    EXPECT_EQ(fp32_to_e4m3(1e-30f), 0x00);
}

TEST(E4M3, RoundTripsEveryCode) {
    for (int c = 0; c < 256; ++c) {
        float v = e4m3_to_fp32(static_cast<uint8_t>(c));
        if (std::isnan(v)) continue;
        ASSERT_EQ(fp32_to_e4m3(v), c) << "code " << c << " value " << v;
    }
}

TEST(E4M3, MatchesBruteForceNearest) {
    Rng rng(42);
    for (int i = 0; i < 20000; ++i) {
        // Log-uniform magnitudes from 2^-12 to 2^9 plus exact midpoints between neighbouring codes.
        float x;
        if (i % 4 == 0) {
            int c = int(rng.below(0x7E));
            x = 0.5f * (e4m3_to_fp32(uint8_t(c)) + e4m3_to_fp32(uint8_t(c + 1)));
        } else {
            x = std::ldexp(float(1.0 + rng.uniform()), int(rng.below(21)) - 12);
        }
        if (x > kE4M3Max) x = kE4M3Max;
        if (rng.below(2)) x = -x;
        ASSERT_EQ(fp32_to_e4m3(x), nearest_e4m3(x)) << "x = " << x;
    }
}

TEST(DType, NamesAndSizes) {
    EXPECT_EQ(dtype_size(DType::BF16), 2u);
    EXPECT_EQ(dtype_size(DType::E4M3), 1u);
    EXPECT_EQ(dtype_from_name("bf16"), DType::BF16);
    EXPECT_EQ(dtype_from_name("float"), DType::F32);
    EXPECT_THROW(dtype_from_name("int4"), ConfigError);
}

}  // namespace
}  // namespace duplex
