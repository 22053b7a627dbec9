// DLPack hand-over, the ecosystem's standard for sharing tensors between frameworks without copies
// (PyTorch's torch.utils.dlpack, NumPy's __dlpack__, nanobind's ndarray). A DLPack tensor becomes a Tensor
// that views the same memory and releases it through the producer's deleter when the last reference goes;
// a Tensor becomes a DLManagedTensor that keeps the Tensor's storage alive until the consumer deletes it.
//
//   DLManagedTensor* in = ...;                 // from torch.utils.dlpack.to_dlpack(t)
//   Tensor t = from_dlpack(in);                // zero-copy; t owns `in` now
//   DLManagedTensor* out = to_dlpack(t);       // hand back; the consumer calls out->deleter(out)
//
// Only compact row-major tensors cross (strides null or row-major); anything else is a ConfigError naming
// the shape and the strides, before any memory changes hands.
#pragma once

#include "core/tensor.hpp"

struct DLManagedTensor;

namespace duplex {

Tensor from_dlpack(DLManagedTensor* managed);
DLManagedTensor* to_dlpack(const Tensor& t);

// The element types DLPack and Duplex share (float32/64, bfloat16, int32/64, uint8; one lane). ConfigError for
// any other, naming its code and bits.
DType dtype_from_dlpack(uint8_t code, uint8_t bits, uint16_t lanes);
void dlpack_type_of(DType t, uint8_t& code, uint8_t& bits);

}  // namespace duplex
