// A small dense tensor: dtype, shape (row-major, contiguous), device (CPU or CUDA device N) and
// reference-counted storage. TensorView is the non-owning counterpart used at API boundaries. This is the
// tensor that crosses the Stage contract (runtime/exec/stage.hpp): a framework's memory is wrapped without a copy
// (Tensor::wrap, or core/dlpack.hpp for a DLPack capsule), and a tensor can be handed out the same way.
//
//   Tensor t = Tensor::zeros(DType::F32, {4, 128});
//   t.data<float>()[0] = 1.0f;
//   Tensor q = t.to(DType::E4M3);      // element-wise conversion (RNE, saturating for fp8)
//   Tensor v = Tensor::from_vector(std::vector<double>(n), {n});   // takes the vector's buffer, no copy
//   Tensor m = Tensor::meta(DType::F32, {4096, 7168});             // sizes only: what emulate mode moves
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/dtype.hpp"

namespace duplex {

using Shape = std::vector<int64_t>;

int64_t shape_numel(const Shape& shape);
std::string shape_str(const Shape& shape);  // "[4, 16]" ("?" for a TensorSpec::kAnnounced dimension)

struct Device {
    enum Kind : uint8_t { CPU, CUDA };
    Kind kind = CPU;
    int index = 0;  // CUDA device ordinal
    static Device cpu() { return {}; }
    static Device cuda(int index) { return {CUDA, index}; }
    bool operator==(const Device&) const = default;
    std::string str() const;  // "cpu", "cuda:1"
};

// What a tensor is without its data: dtype, shape and device. "f32[4, 16] on cpu". A dimension of kAnnounced
// (-1) is not known ahead: the tensor's sender announces it with the tensor (a stage whose shapes change from
// microbatch to microbatch, runtime/exec/stage.hpp); such a spec has no numel() until then.
struct TensorSpec {
    static constexpr int64_t kAnnounced = -1;
    DType dtype = DType::F32;
    Shape shape;
    Device device;
    bool operator==(const TensorSpec&) const = default;
    int64_t numel() const { return shape_numel(shape); }
    size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
    std::string str() const;
    // Some dimension is kAnnounced.
    bool announced() const;
    // `got` is a tensor this spec allows: the same dtype, device and rank, every dimension equal where this spec
    // fixes it.
    bool admits(const TensorSpec& got) const;
};

class TensorView {
public:
    TensorView() = default;
    TensorView(void* data, DType dtype, Shape shape, Device device = {})
        : data_(data), dtype_(dtype), shape_(std::move(shape)), device_(device) {}
    template <typename T>
    static TensorView of(std::vector<T>& v, Shape shape = {}) {
        return TensorView(v.data(), dtype_of<T>(), shape.empty() ? Shape{static_cast<int64_t>(v.size())} : shape);
    }

    void* raw() const { return data_; }
    DType dtype() const { return dtype_; }
    const Shape& shape() const { return shape_; }
    Device device() const { return device_; }
    TensorSpec spec() const { return {dtype_, shape_, device_}; }
    bool empty() const { return shape_.empty() || numel() == 0; }
    int64_t numel() const { return shape_numel(shape_); }
    size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
    template <typename T>
    T* data() const {
        check_type(sizeof(T));
        return static_cast<T*>(data_);
    }

private:
    void check_type(size_t elem_size) const;
    void* data_ = nullptr;
    DType dtype_ = DType::F32;
    Shape shape_;
    Device device_;
};

class Tensor {
public:
    Tensor() = default;
    static Tensor empty(DType dtype, Shape shape);
    static Tensor zeros(DType dtype, Shape shape);
    static Tensor from_floats(const std::vector<float>& values, Shape shape);
    // Takes over the vector's buffer (no copy); empty shape: 1-D of the vector's length.
    template <typename T>
    static Tensor from_vector(std::vector<T>&& values, Shape shape = {}) {
        auto owner = std::make_shared<std::vector<T>>(std::move(values));
        if (shape.empty()) shape = {static_cast<int64_t>(owner->size())};
        return wrap(owner->data(), dtype_of<T>(), std::move(shape), Device::cpu(), owner, owner->size());
    }
    // Someone else's memory, kept alive by `owner` (a framework tensor, a DLPack capsule, a vector...).
    // `capacity` (elements; < 0: unknown) is checked against the shape.
    static Tensor wrap(void* data, DType dtype, Shape shape, Device device, std::shared_ptr<void> owner,
                       int64_t capacity = -1);
    // Dtype, shape and device without storage: the size of a transfer whose payload is elided (emulate mode).
    static Tensor meta(DType dtype, Shape shape, Device device = {});

    DType dtype() const { return dtype_; }
    const Shape& shape() const { return shape_; }
    Device device() const { return device_; }
    TensorSpec spec() const { return {dtype_, shape_, device_}; }
    int64_t numel() const { return shape_numel(shape_); }
    size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
    bool defined() const { return storage_ != nullptr; }
    bool is_meta() const { return meta_; }
    void* raw() const { return storage_.get(); }
    template <typename T>
    T* data() const {
        return view().data<T>();
    }
    TensorView view() const { return TensorView(storage_.get(), dtype_, shape_, device_); }
    // A copy of the values (CPU tensors).
    template <typename T>
    std::vector<T> to_vector() const {
        T* p = data<T>();
        return std::vector<T>(p, p + numel());
    }
    // A copy of a CPU view into fresh storage.
    static Tensor copy_of(const TensorView& v);

    // Element-wise conversion to another dtype (float types only); a new tensor.
    Tensor to(DType target) const;
    // Values as fp32 (any float dtype).
    std::vector<float> to_floats() const;
    // Same storage, new shape with the same number of elements.
    Tensor reshape(Shape shape) const;

private:
    std::shared_ptr<std::byte> storage_;
    DType dtype_ = DType::F32;
    Shape shape_;
    Device device_;
    bool meta_ = false;
};

// Converts n elements between float dtypes (F32, F64, BF16, E4M3).
void convert(const void* src, DType src_type, void* dst, DType dst_type, int64_t n);

}  // namespace duplex
