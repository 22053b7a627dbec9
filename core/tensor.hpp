// A small dense tensor: dtype, shape (row-major, contiguous) and reference-counted 64-byte-aligned storage.
// TensorView is the non-owning counterpart used at API boundaries.
//
//   Tensor t = Tensor::zeros(DType::F32, {4, 128});
//   t.data<float>()[0] = 1.0f;
//   Tensor q = t.to(DType::E4M3);      // element-wise conversion (RNE, saturating for fp8)
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
std::string shape_str(const Shape& shape);

class TensorView {
public:
    TensorView() = default;
    TensorView(void* data, DType dtype, Shape shape) : data_(data), dtype_(dtype), shape_(std::move(shape)) {}

    void* raw() const { return data_; }
    DType dtype() const { return dtype_; }
    const Shape& shape() const { return shape_; }
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
};

class Tensor {
public:
    Tensor() = default;
    static Tensor empty(DType dtype, Shape shape);
    static Tensor zeros(DType dtype, Shape shape);
    static Tensor from_floats(const std::vector<float>& values, Shape shape);

    DType dtype() const { return dtype_; }
    const Shape& shape() const { return shape_; }
    int64_t numel() const { return shape_numel(shape_); }
    size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
    bool defined() const { return storage_ != nullptr; }
    void* raw() const { return storage_.get(); }
    template <typename T>
    T* data() const {
        return view().data<T>();
    }
    TensorView view() const { return TensorView(storage_.get(), dtype_, shape_); }

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
};

// Converts n elements between float dtypes (F32, F64, BF16, E4M3).
void convert(const void* src, DType src_type, void* dst, DType dst_type, int64_t n);

}  // namespace duplex
