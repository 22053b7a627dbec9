#include "core/tensor.hpp"

#include <gtest/gtest.h>

#include "core/error.hpp"

namespace duplex {
namespace {

TEST(Tensor, ZerosShapeAndBytes) {
    Tensor t = Tensor::zeros(DType::BF16, {3, 5});
    EXPECT_EQ(t.numel(), 15);
    EXPECT_EQ(t.nbytes(), 30u);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw()) % 64, 0u);
    for (int i = 0; i < 15; ++i) EXPECT_EQ(t.data<uint16_t>()[i], 0);
}

TEST(Tensor, ConvertsBetweenFloatTypes) {
    Tensor f = Tensor::from_floats({1.0f, -2.5f, 500.0f, 0.1f}, {4});
    Tensor q = f.to(DType::E4M3);
    std::vector<float> back = q.to_floats();
    EXPECT_EQ(back[0], 1.0f);
    EXPECT_EQ(back[1], -2.5f);
    EXPECT_EQ(back[2], 448.0f);  // saturated
    EXPECT_NEAR(back[3], 0.1f, 0.1f / 16);
    Tensor b = f.to(DType::BF16);
    EXPECT_EQ(b.to_floats()[1], -2.5f);
}

TEST(Tensor, TypeAndShapeErrors) {
    Tensor t = Tensor::zeros(DType::F32, {2, 2});
    EXPECT_THROW(t.data<double>(), Error);
    EXPECT_THROW(t.reshape({3}), ConfigError);
    EXPECT_EQ(t.reshape({4}).numel(), 4);
    EXPECT_THROW(Tensor::from_floats({1, 2, 3}, {2, 2}), ConfigError);
}

}  // namespace
}  // namespace duplex
