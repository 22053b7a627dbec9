// Starting a world of ranks on any backend, the way people already launch jobs.
//
//   inproc  ranks are threads of this process:        launch({.backend = "inproc", .ranks = 8}, fn);
//   mpi     one rank per process under mpirun:        mpirun -np 8 duplex commbench --backend mpi
//   ucx     one rank per process, bootstrapped through the TCP store; rank, world size and store address
//           come from DUPLEX_RANK / DUPLEX_WORLD_SIZE / DUPLEX_STORE_ADDR, or torchrun's RANK / WORLD_SIZE /
//           MASTER_ADDR / MASTER_PORT (Duplex's store takes MASTER_PORT + 1 under torchrun, whose agent holds
//           MASTER_PORT), or Open MPI's OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE, or MPICH's PMI_RANK /
//           PMI_SIZE, or Slurm's SLURM_PROCID / SLURM_NTASKS with the store on the step's first node
//           (SLURM_STEP_NODELIST or SLURM_JOB_NODELIST) at port 29500 + SLURM_JOB_ID % 1000 (MASTER_PORT if set).
//   Under mpi the world is MPI's own (MPI_Comm_size), whichever MPI launched it.
//   nccl    payloads through NCCL between GPUs, one GPU per rank (comm/nccl/nccl_channels.hpp), tags matched over
//           control messages (comm/rendezvous_transport.hpp): ranks are threads of this process on GPUs 0..ranks-1,
//           or, under any launcher above, processes whose control goes over UCX, each on the GPU of its node-local
//           rank (LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID or SLURM_LOCALID; else rank % GPUs).
//           Point-to-point buffers may be device memory; the collectives take host buffers (staged to the GPU).
//
// `fn` runs once per rank with that rank's world communicator. If one rank throws, every other rank's
// pending and later operations fail with a CommError naming it (inproc), or the job is aborted (mpi, ucx),
// and launch() rethrows the first failure.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.hpp"

namespace duplex {

struct LaunchOptions {
    std::string backend = "inproc";
    int ranks = 1;            // inproc only; process backends take the world size from the environment
    int virtual_nodes = 0;    // > 0: a virtual topology of that many nodes; 0: placement from host names
    double timeout_s = -1;    // < 0: DUPLEX_COMM_TIMEOUT
    bool bind_cores = false;  // bind each rank to a core (hwloc)
};

struct ProcessEnv {
    int rank = 0;
    int world_size = 1;
    int local_size = 1;      // ranks on this node (for memory estimates), when the launcher says
    int local_rank = -1;     // this rank's index on its node (LOCAL_RANK, ...), -1 when the launcher does not say
    std::string store_addr;  // host:port of the rendezvous store
    std::string source;      // which variables supplied them
};

// Reads rank, world size and store address from the environment (see above); a single process otherwise.
ProcessEnv process_env();
// The first host of a Slurm node list ("gpu[003-005,009],login" -> "gpu003"): where Slurm runs task 0.
std::string slurm_first_host(const std::string& nodelist);

// Names of the backends compiled into this build, and whether `name` is one of them.
std::vector<std::string> built_backends();
bool backend_built(const std::string& name);
// Whether the ranks of this backend are processes: mpi and ucx always, nccl when a launcher started this one.
bool backend_is_multiprocess(const std::string& name);

using RankFn = std::function<void(const std::shared_ptr<Communicator>& world)>;
void launch(const LaunchOptions& options, const RankFn& fn);
// A world of one rank in the calling thread (in process): a single-rank run of code written for communicators,
// such as the single-rank reference trainer.
std::shared_ptr<Communicator> single_rank_world(double timeout_s = -1);

}  // namespace duplex
