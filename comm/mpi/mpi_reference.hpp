// Plain MPI collectives on MPI_COMM_WORLD, timed: the yardstick `duplex commbench --compare-mpi` measures
// Duplex against, on the same buffers in the same process.
#pragma once

#include <string>
#include <vector>

namespace duplex {

struct MpiReferenceCase {
    std::string op;  // p2p, alltoall, alltoallv, allgather, reducescatter, allreduce (float for reductions)
    void* send;
    void* recv;
    size_t send_bytes, recv_bytes;
    std::vector<size_t> send_counts, send_offsets, recv_counts, recv_offsets;  // bytes, alltoallv only
};

// Seconds per iteration on this rank (MPI initialized on first use).
double mpi_reference_time(const MpiReferenceCase& c, int warmup, int iters);

}  // namespace duplex
