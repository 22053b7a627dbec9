// What CUDA sees on this machine. Works without a GPU or driver: it reports none.
//
//   for (const auto& d : duplex::cuda_devices()) fmt::print("{} with {} SMs\n", d.name, d.num_sms);
#pragma once

#include <string>
#include <vector>

namespace duplex {

struct CudaDeviceInfo {
    int index = 0;
    std::string name;
    int num_sms = 0;
    int major = 0, minor = 0;
    size_t memory_bytes = 0;
};

std::vector<CudaDeviceInfo> cuda_devices();

// Converts n floats to e4m3 on the device (the same RNE/saturating rule as core/dtype.hpp); the first GPU
// kernel, compared bit for bit with the host conversion by tests/cuda_test.cpp.
void cuda_fp32_to_e4m3(const float* host_in, unsigned char* host_out, size_t n);

}  // namespace duplex
