// Element types and their conversions. bf16 and fp8-e4m3 (OCP "FN": no infinities, max ±448) are stored as
// raw bits; conversions from fp32 round to nearest, ties to even. fp32→e4m3 saturates: values beyond ±448
// (infinities included) become ±448, NaN stays NaN.
//
//   uint16_t h = duplex::fp32_to_bf16(1.0f);     // 0x3F80
//   uint8_t  q = duplex::fp32_to_e4m3(500.0f);   // 0x7E == 448
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>

#include "core/host_device.hpp"

namespace duplex {

enum class DType : uint8_t { F32, F64, BF16, E4M3, I32, I64, U8 };

size_t dtype_size(DType t);

// The DType of a C++ element type (float, double, int32_t, int64_t, uint8_t).
template <typename T>
constexpr DType dtype_of() {
    if constexpr (std::is_same_v<T, float>) return DType::F32;
    else if constexpr (std::is_same_v<T, double>) return DType::F64;
    else if constexpr (std::is_same_v<T, int32_t>) return DType::I32;
    else if constexpr (std::is_same_v<T, int64_t>) return DType::I64;
    else {
        static_assert(std::is_same_v<T, uint8_t>, "no DType for this element type");
        return DType::U8;
    }
}
std::string_view dtype_name(DType t);
DType dtype_from_name(std::string_view name);  // throws ConfigError naming the bad value

DUPLEX_HOST_DEVICE uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
DUPLEX_HOST_DEVICE float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

DUPLEX_HOST_DEVICE uint16_t fp32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
    uint32_t lsb = (u >> 16) & 1u;
    return static_cast<uint16_t>((u + 0x7FFFu + lsb) >> 16);
}
DUPLEX_HOST_DEVICE float bf16_to_fp32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

constexpr float kE4M3Max = 448.0f;

DUPLEX_HOST_DEVICE uint8_t fp32_to_e4m3(float f) {
    uint32_t u = f32_bits(f);
    uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return sign | 0x7F;               // NaN
    if (a >= f32_bits(kE4M3Max)) return sign | 0x7E;       // saturate (inf included)
    if (a < f32_bits(0.015625f)) {                         // below 2^-6: subnormal range, step 2^-9
        // Adding 2^23 makes the float unit round the scaled value to an integer, ties to even.
        float t = f32_from_bits(a) * 512.0f + 8388608.0f;
        return sign | static_cast<uint8_t>(f32_bits(t) - 0x4B000000u);
    }
    uint32_t r = a - ((127u - 7u) << 23);                  // rebias the exponent from 127 to 7
    r = (r + 0x7FFFFu + ((r >> 20) & 1u)) >> 20;           // keep 3 mantissa bits, ties to even
    if (r > 0x7Eu) r = 0x7Eu;
    return sign | static_cast<uint8_t>(r);
}

DUPLEX_HOST_DEVICE float e4m3_to_fp32(uint8_t q) {
    uint32_t sign = static_cast<uint32_t>(q & 0x80u) << 24;
    uint32_t e = (q >> 3) & 0xFu;
    uint32_t m = q & 0x7u;
    if (e == 0xF && m == 0x7) return f32_from_bits(sign | 0x7FC00000u);
    if (e == 0) {
        float v = static_cast<float>(m) * 0.001953125f;  // m * 2^-9
        return f32_from_bits(f32_bits(v) | sign);
    }
    return f32_from_bits(sign | ((e + 120u) << 23) | (m << 20));
}

}  // namespace duplex
