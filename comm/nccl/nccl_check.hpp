// The NCCL checking macro (STYLE.md: one per C API), for the sources that include nccl.h.
#pragma once

#include <nccl.h>

#include "core/error.hpp"

#define DUPLEX_NCCL_CHECK(call)                                                                            \
    do {                                                                                                   \
        ncclResult_t duplex_nccl_rc_ = (call);                                                             \
        if (duplex_nccl_rc_ != ncclSuccess)                                                                \
            ::duplex::throw_api_error("NCCL", #call, duplex_nccl_rc_, ncclGetErrorString(duplex_nccl_rc_), \
                                      __FILE__, __LINE__);                                                 \
    } while (0)
