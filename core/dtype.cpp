#include "core/dtype.hpp"

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

size_t dtype_size(DType t) {
    switch (t) {
        case DType::F32: return 4;
        case DType::F64: return 8;
        case DType::BF16: return 2;
        case DType::E4M3: return 1;
        case DType::I32: return 4;
        case DType::I64: return 8;
        case DType::U8: return 1;
    }
    return 0;
}

std::string_view dtype_name(DType t) {
    switch (t) {
        case DType::F32: return "float";
        case DType::F64: return "double";
        case DType::BF16: return "bfloat16";
        case DType::E4M3: return "fp8e4m3";
        case DType::I32: return "int32";
        case DType::I64: return "int64";
        case DType::U8: return "uint8";
    }
    return "?";
}

DType dtype_from_name(std::string_view name) {
    for (DType t : {DType::F32, DType::F64, DType::BF16, DType::E4M3, DType::I32, DType::I64, DType::U8})
        if (dtype_name(t) == name) return t;
    if (name == "fp32") return DType::F32;
    if (name == "fp64") return DType::F64;
    if (name == "bf16") return DType::BF16;
    if (name == "e4m3" || name == "fp8") return DType::E4M3;
    throw ConfigError("dtype", fmt::format("unknown type '{}' (float, double, bf16, fp8e4m3, int32, int64, uint8)", name));
}

}  // namespace duplex
