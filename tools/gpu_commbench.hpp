// duplex commbench --backend cuda: dispatch and combine between virtual ranks on one GPU (tools/gpu_commbench.cpp,
// built with CUDA).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace duplex::tools {

struct GpuCommBenchOptions {
    std::string op = "dispatch";   // dispatch or combine
    int ranks = 8;                 // virtual ranks sharing the device
    int nodes = 1;                 // > 1: the node-limited path, one crossing per token and node through a relay
    int hidden = 7168;             // row width (elements)
    std::string dtype = "bf16";    // rows: f32, bf16 or fp8 (with 1x128 scales; dispatch only)
    int top_k = 8;                 // slots per token, to distinct ranks
    std::vector<int> sms = {4, 8, 16, 20, 32};
    size_t min_bytes = 1 << 20, max_bytes = 64 << 20;  // bytes each rank sends
    double factor = 4;
    int iters = 10, warmup = 3;
    bool check = true;
    uint64_t seed = 1;
    std::string json;
};

// ConfigError for options the benchmark cannot run (no device is needed to check them).
void check_gpu_commbench(const GpuCommBenchOptions& o);
// Runs it; ConfigError when no device is present. Returns the exit code (non-zero when a row was wrong).
int run_gpu_commbench(const GpuCommBenchOptions& o);

}  // namespace duplex::tools
