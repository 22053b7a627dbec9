#include "core/tensor.hpp"

#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

int64_t shape_numel(const Shape& shape) {
    int64_t n = 1;
    for (int64_t d : shape) {
        if (d < 0) throw ConfigError("shape", fmt::format("negative dimension in {}", shape_str(shape)));
        n *= d;
    }
    return n;
}

std::string shape_str(const Shape& shape) {
    std::vector<std::string> dims;
    for (int64_t d : shape) dims.push_back(d == TensorSpec::kAnnounced ? "?" : std::to_string(d));
    return fmt::format("[{}]", fmt::join(dims, ", "));
}

std::string Device::str() const { return kind == CPU ? "cpu" : fmt::format("cuda:{}", index); }

std::string TensorSpec::str() const { return fmt::format("{}{} on {}", dtype_name(dtype), shape_str(shape), device.str()); }

bool TensorSpec::announced() const {
    for (int64_t d : shape)
        if (d == kAnnounced) return true;
    return false;
}

bool TensorSpec::admits(const TensorSpec& got) const {
    if (got.dtype != dtype || got.device != device || got.shape.size() != shape.size()) return false;
    for (size_t i = 0; i < shape.size(); ++i)
        if (shape[i] != kAnnounced && shape[i] != got.shape[i]) return false;
    return true;
}

Tensor Tensor::wrap(void* data, DType dtype, Shape shape, Device device, std::shared_ptr<void> owner, int64_t capacity) {
    int64_t n = shape_numel(shape);
    if (capacity >= 0 && n > capacity)
        throw ConfigError("tensor", fmt::format("shape {} needs {} elements, the memory holds {}", shape_str(shape), n,
                                                capacity));
    if (!data && n > 0) throw ConfigError("tensor", fmt::format("null data for shape {}", shape_str(shape)));
    Tensor t;
    t.dtype_ = dtype;
    t.shape_ = std::move(shape);
    t.device_ = device;
    // Aliasing constructor: shares ownership with `owner`, points at `data`.
    t.storage_ = std::shared_ptr<std::byte>(std::move(owner), static_cast<std::byte*>(data));
    return t;
}

Tensor Tensor::meta(DType dtype, Shape shape, Device device) {
    Tensor t;
    t.dtype_ = dtype;
    t.shape_ = std::move(shape);
    t.device_ = device;
    t.meta_ = true;
    shape_numel(t.shape_);  // rejects negative dimensions
    return t;
}

Tensor Tensor::copy_of(const TensorView& v) {
    if (v.device().kind != Device::CPU)
        throw ConfigError("tensor", fmt::format("copy_of: {} is not host memory", v.device().str()));
    Tensor t = empty(v.dtype(), v.shape());
    if (v.nbytes()) std::memcpy(t.raw(), v.raw(), v.nbytes());
    return t;
}

void TensorView::check_type(size_t elem_size) const {
    if (elem_size != dtype_size(dtype_))
        throw Error(fmt::format("tensor of {} accessed as a {}-byte type", dtype_name(dtype_), elem_size));
}

Tensor Tensor::empty(DType dtype, Shape shape) {
    Tensor t;
    t.dtype_ = dtype;
    t.shape_ = std::move(shape);
    size_t bytes = (t.nbytes() + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes == 0 ? 64 : bytes);
    if (!p) throw Error(fmt::format("out of memory allocating tensor {} of {}", shape_str(t.shape_), dtype_name(dtype)));
    t.storage_ = std::shared_ptr<std::byte>(static_cast<std::byte*>(p), [](std::byte* q) { std::free(q); });
    return t;
}

Tensor Tensor::zeros(DType dtype, Shape shape) {
    Tensor t = empty(dtype, std::move(shape));
    std::memset(t.raw(), 0, t.nbytes());
    return t;
}

Tensor Tensor::from_floats(const std::vector<float>& values, Shape shape) {
    if (shape_numel(shape) != static_cast<int64_t>(values.size()))
        throw ConfigError("shape", fmt::format("{} does not hold {} values", shape_str(shape), values.size()));
    Tensor t = empty(DType::F32, std::move(shape));
    std::memcpy(t.raw(), values.data(), values.size() * sizeof(float));
    return t;
}

namespace {

double load(const void* p, DType t, int64_t i) {
    switch (t) {
        case DType::F32: return static_cast<const float*>(p)[i];
        case DType::F64: return static_cast<const double*>(p)[i];
        case DType::BF16: return bf16_to_fp32(static_cast<const uint16_t*>(p)[i]);
        case DType::E4M3: return e4m3_to_fp32(static_cast<const uint8_t*>(p)[i]);
        default: throw Error(fmt::format("convert: {} is not a float type", dtype_name(t)));
    }
}

void store(void* p, DType t, int64_t i, double v) {
    switch (t) {
        case DType::F32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
        case DType::F64: static_cast<double*>(p)[i] = v; break;
        // NOTE: bf16/e4m3 round from the fp32 value; a double is first rounded to fp32 (as GPUs do).
        case DType::BF16: static_cast<uint16_t*>(p)[i] = fp32_to_bf16(static_cast<float>(v)); break;
        case DType::E4M3: static_cast<uint8_t*>(p)[i] = fp32_to_e4m3(static_cast<float>(v)); break;
        default: throw Error(fmt::format("convert: {} is not a float type", dtype_name(t)));
    }
}

}  // namespace

void convert(const void* src, DType src_type, void* dst, DType dst_type, int64_t n) {
    if (src_type == dst_type) {
        std::memcpy(dst, src, static_cast<size_t>(n) * dtype_size(src_type));
        return;
    }
    for (int64_t i = 0; i < n; ++i) store(dst, dst_type, i, load(src, src_type, i));
}

Tensor Tensor::to(DType target) const {
    Tensor out = empty(target, shape_);
    convert(raw(), dtype_, out.raw(), target, numel());
    return out;
}

std::vector<float> Tensor::to_floats() const {
    std::vector<float> v(static_cast<size_t>(numel()));
    convert(raw(), dtype_, v.data(), DType::F32, numel());
    return v;
}

Tensor Tensor::reshape(Shape shape) const {
    if (shape_numel(shape) != numel())
        throw ConfigError("reshape", fmt::format("{} to {} changes the element count", shape_str(shape_), shape_str(shape)));
    Tensor t = *this;
    t.shape_ = std::move(shape);
    return t;
}

}  // namespace duplex
