#include "core/dlpack.hpp"

#include <dlpack/dlpack.h>
#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

DType dtype_from_dlpack(uint8_t code, uint8_t bits, uint16_t lanes) {
    if (lanes == 1) {
        if (code == kDLFloat && bits == 32) return DType::F32;
        if (code == kDLFloat && bits == 64) return DType::F64;
        if (code == kDLBfloat && bits == 16) return DType::BF16;
        if (code == kDLInt && bits == 32) return DType::I32;
        if (code == kDLInt && bits == 64) return DType::I64;
        if (code == kDLUInt && bits == 8) return DType::U8;
    }
    throw ConfigError("dlpack", fmt::format("unsupported dtype (code {}, {} bits, {} lanes)", int(code), int(bits),
                                            int(lanes)));
}

void dlpack_type_of(DType t, uint8_t& code, uint8_t& bits) {
    switch (t) {
        case DType::F32: code = kDLFloat, bits = 32; return;
        case DType::F64: code = kDLFloat, bits = 64; return;
        case DType::BF16: code = kDLBfloat, bits = 16; return;
        case DType::I32: code = kDLInt, bits = 32; return;
        case DType::I64: code = kDLInt, bits = 64; return;
        case DType::U8: code = kDLUInt, bits = 8; return;
        case DType::E4M3: break;  // DLPack 0.6 has no fp8 code
    }
    throw ConfigError("dlpack", fmt::format("{} has no DLPack type", dtype_name(t)));
}

namespace {

// What a DLManagedTensor produced here owns: the tensor (its storage) and the shape array DLPack points at.
struct Export {
    DLManagedTensor managed{};
    Tensor tensor;
    Shape shape;
};

}  // namespace

Tensor from_dlpack(DLManagedTensor* managed) {
    DUPLEX_CHECK_ARG(managed != nullptr, "dlpack", "null tensor");
    // Until the Tensor holds it, a failed check must still release the producer's memory.
    std::shared_ptr<DLManagedTensor> owner(managed, [](DLManagedTensor* m) {
        if (m->deleter) m->deleter(m);
    });
    const DLTensor& t = managed->dl_tensor;
    Shape shape(t.shape, t.shape + t.ndim);
    if (t.strides) {
        int64_t expect = 1;
        for (int i = t.ndim - 1; i >= 0; --i) {
            if (shape[i] != 1 && t.strides[i] != expect)
                throw ConfigError("dlpack", fmt::format("tensor {} with strides [{}] is not compact row-major; pass "
                                                        ".contiguous()",
                                                        shape_str(shape), fmt::join(t.strides, t.strides + t.ndim, ", ")));
            expect *= shape[i];
        }
    }
    Device device;
    if (t.device.device_type == kDLCPU || t.device.device_type == kDLCUDAHost)
        device = Device::cpu();
    else if (t.device.device_type == kDLCUDA)
        device = Device::cuda(t.device.device_id);
    else
        throw ConfigError("dlpack", fmt::format("device type {} is neither CPU nor CUDA", int(t.device.device_type)));
    void* data = static_cast<char*>(t.data) + t.byte_offset;
    return Tensor::wrap(data, dtype_from_dlpack(t.dtype.code, t.dtype.bits, t.dtype.lanes), std::move(shape), device,
                        owner);
}

DLManagedTensor* to_dlpack(const Tensor& t) {
    DUPLEX_CHECK_ARG(!t.is_meta(), "dlpack", "a meta tensor {} has no memory to share", t.spec().str());
    auto* e = new Export;
    e->tensor = t;
    e->shape = t.shape();
    DLTensor& d = e->managed.dl_tensor;
    d.data = t.raw();
    d.device = t.device().kind == Device::CUDA ? DLDevice{kDLCUDA, t.device().index} : DLDevice{kDLCPU, 0};
    d.ndim = static_cast<int>(e->shape.size());
    d.dtype.lanes = 1;
    try {
        dlpack_type_of(t.dtype(), d.dtype.code, d.dtype.bits);
    } catch (...) {
        delete e;
        throw;
    }
    d.shape = e->shape.data();
    d.strides = nullptr;  // compact row-major
    d.byte_offset = 0;
    e->managed.manager_ctx = e;
    e->managed.deleter = [](DLManagedTensor* m) { delete static_cast<Export*>(m->manager_ctx); };
    return &e->managed;
}

}  // namespace duplex
