#include "comm/mpi/mpi_reference.hpp"

#include <mpi.h>

#include "comm/mpi/mpi_transport.hpp"
#include "core/clock.hpp"
#include "core/error.hpp"

namespace duplex {

double mpi_reference_time(const MpiReferenceCase& c, int warmup, int iters) {
    mpi_ensure_initialized();
    int n = 0, me = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    std::vector<int> sc, so, rc, ro;
    for (size_t v : c.send_counts) sc.push_back(static_cast<int>(v));
    for (size_t v : c.send_offsets) so.push_back(static_cast<int>(v));
    for (size_t v : c.recv_counts) rc.push_back(static_cast<int>(v));
    for (size_t v : c.recv_offsets) ro.push_back(static_cast<int>(v));
    auto once = [&] {
        if (c.op == "p2p") {
            MPI_Sendrecv(c.send, int(c.send_bytes), MPI_BYTE, (me + 1) % n, 7, c.recv, int(c.recv_bytes), MPI_BYTE,
                         (me - 1 + n) % n, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else if (c.op == "alltoall") {
            MPI_Alltoall(c.send, int(c.send_bytes / n), MPI_BYTE, c.recv, int(c.recv_bytes / n), MPI_BYTE, MPI_COMM_WORLD);
        } else if (c.op == "alltoallv") {
            MPI_Alltoallv(c.send, sc.data(), so.data(), MPI_BYTE, c.recv, rc.data(), ro.data(), MPI_BYTE, MPI_COMM_WORLD);
        } else if (c.op == "allgather") {
            MPI_Allgather(c.send, int(c.send_bytes), MPI_BYTE, c.recv, int(c.send_bytes), MPI_BYTE, MPI_COMM_WORLD);
        } else if (c.op == "reducescatter") {
            MPI_Reduce_scatter_block(c.send, c.recv, int(c.recv_bytes / 4), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        } else if (c.op == "allreduce") {
            MPI_Allreduce(MPI_IN_PLACE, c.send, int(c.send_bytes / 4), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        } else {
            throw ConfigError("--op", "no MPI reference for " + c.op);
        }
    };
    for (int i = 0; i < warmup; ++i) once();
    MPI_Barrier(MPI_COMM_WORLD);
    Stopwatch sw;
    for (int i = 0; i < iters; ++i) once();
    return sw.seconds() / iters;
}

}  // namespace duplex
