// DUPLEX_HOST_DEVICE marks functions compiled for both host and device: under nvcc it expands to
// `__host__ __device__ inline`, elsewhere to plain `inline`, so host tests cover the same code the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define DUPLEX_HOST_DEVICE __host__ __device__ inline
#else
#define DUPLEX_HOST_DEVICE inline
#endif
