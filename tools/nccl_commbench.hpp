// duplex commbench --backend nccl: the nccl-tests measurements on the NCCL communicator (comm/nccl/), device
// buffers, one rank per GPU of this machine as threads bootstrapped through an in-memory store
// (tools/nccl_commbench.cpp, built with NCCL).
#pragma once

#include <string>

#include "comm/bench.hpp"

namespace duplex::tools {

struct NcclCommBenchOptions {
    CommBenchOptions bench;
    int ranks = 0;  // 0: one per GPU
    std::string json;
};

// Runs it; ConfigError when there is no device or more ranks than devices (NCCL puts one rank on a GPU).
// Returns the exit code (non-zero when a row was wrong).
int run_nccl_commbench(const NcclCommBenchOptions& o);

}  // namespace duplex::tools
