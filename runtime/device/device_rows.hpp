// ResidentRows in device memory of their own: what the executor's device exchange (runtime/device/device_exchange.cpp)
// leaves for the device experts (runtime/device/device_experts.cpp) and what they give back, expert-major. For the CUDA
// sources of runtime/ only.
#pragma once

#include <utility>
#include <vector>

#include "kernels/cuda/buffer.hpp"
#include "runtime/model/expert_exchange.hpp"

namespace duplex {

struct DeviceRows : ResidentRows {
    DeviceRows(std::vector<int64_t> first_rows, int row_width, int on_device)
        : storage(size_t(first_rows.empty() ? 0 : first_rows.back()) * size_t(row_width)) {
        first = std::move(first_rows);
        width = row_width;
        device = on_device;
        data = storage.get();
    }
    float* row(int64_t r) const { return storage.get() + size_t(r) * size_t(width); }
    cuda::DeviceArray<float> storage;
};

// The device pointer of rows an exchange left on `device` (ConfigError for rows elsewhere or of another width).
inline float* device_rows_of(const ResidentRows& r, int device, int width, const char* who) {
    DUPLEX_CHECK_ARG(r.device == device && r.width == width, who, "rows on device {} of width {}, expected device {} width {}",
                     r.device, r.width, device, width);
    return static_cast<float*>(r.data);
}

}  // namespace duplex
