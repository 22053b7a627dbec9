// The MPI backend (Open MPI, MPI_THREAD_MULTIPLE): one rank per process under mpirun. MPI is initialized on
// first use and finalized at process exit; a progress thread tests outstanding requests so that transfers
// advance while the caller computes.
#pragma once

#include <memory>

#include "comm/transport.hpp"

namespace duplex {

std::shared_ptr<Transport> make_mpi_transport();
// MPI_Init_thread(MPI_THREAD_MULTIPLE) once per process; MPI_Finalize runs at exit.
void mpi_ensure_initialized();

}  // namespace duplex
