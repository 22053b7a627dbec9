// One checking macro per C API (STYLE.md): the call text, the code and file:line in a duplex::Error. For CUDA
// sources and the host code that calls the CUDA runtime (include only where cuda_runtime.h is available).
#pragma once

#include <cuda_runtime.h>

#include "core/error.hpp"

#define DUPLEX_CUDA_CHECK(call)                                                                        \
    do {                                                                                               \
        cudaError_t duplex_cuda_rc_ = (call);                                                          \
        if (duplex_cuda_rc_ != cudaSuccess)                                                            \
            ::duplex::throw_api_error("CUDA", #call, duplex_cuda_rc_, cudaGetErrorString(duplex_cuda_rc_), \
                                      __FILE__, __LINE__);                                             \
    } while (0)
