// The launchers people use, as process_env() reads them: Slurm, MPICH's PMI, Open MPI, torchrun, Duplex's own.
#include <cstdlib>
#include <map>
#include <string>

#include <gtest/gtest.h>

#include "comm/launch.hpp"
#include "core/error.hpp"

namespace duplex {
namespace {

// Sets exactly the given launcher variables for one test (every other one unset), restoring none: tests run
// in a process of their own under ctest.
struct Env {
    explicit Env(const std::map<std::string, std::string>& vars) {
        for (const char* v : {"DUPLEX_RANK", "DUPLEX_WORLD_SIZE", "DUPLEX_STORE_ADDR", "RANK", "WORLD_SIZE",
                              "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE",
                              "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_RANK",
                              "PMI_SIZE", "MPI_LOCALNRANKS", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID",
                              "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_STEP_TASKS_PER_NODE",
                              "SLURM_TASKS_PER_NODE"})
            ::unsetenv(v);
        for (const auto& [k, v] : vars) ::setenv(k.c_str(), v.c_str(), 1);
    }
};

TEST(LaunchEnv, SlurmGivesRankWorldLocalSizeAndTheStoreOnTheFirstNode) {
    Env e({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_JOB_ID", "4242"},
           {"SLURM_STEP_NODELIST", "gpu[003-004]"}, {"SLURM_STEP_TASKS_PER_NODE", "4(x2)"}});
    ProcessEnv p = process_env();
    EXPECT_EQ(p.rank, 5);
    EXPECT_EQ(p.world_size, 8);
    EXPECT_EQ(p.local_size, 4);
    EXPECT_EQ(p.store_addr, "gpu003:29742");
    EXPECT_NE(p.source.find("Slurm"), std::string::npos);
}

TEST(LaunchEnv, SlurmWithMasterPortKeepsTheFirstNode) {
    Env e({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_JOB_NODELIST", "a1,b2"}, {"MASTER_PORT", "31000"}});
    EXPECT_EQ(process_env().store_addr, "a1:31000");
}

TEST(LaunchEnv, MpichPmi) {
    Env e({{"PMI_RANK", "2"}, {"PMI_SIZE", "3"}, {"MPI_LOCALNRANKS", "3"}});
    ProcessEnv p = process_env();
    EXPECT_EQ(p.rank, 2);
    EXPECT_EQ(p.world_size, 3);
    EXPECT_EQ(p.local_size, 3);
}

TEST(LaunchEnv, TorchrunStoreTakesTheNextPort) {
    Env e({{"RANK", "1"}, {"WORLD_SIZE", "4"}, {"LOCAL_WORLD_SIZE", "4"}, {"MASTER_ADDR", "10.0.0.7"},
           {"MASTER_PORT", "29400"}, {"TORCHELASTIC_RUN_ID", "x"}});
    ProcessEnv p = process_env();
    EXPECT_EQ(p.store_addr, "10.0.0.7:29401");
    EXPECT_EQ(p.local_size, 4);
}

TEST(LaunchEnv, TheExplicitOnesWin) {
    Env e({{"DUPLEX_RANK", "0"}, {"DUPLEX_WORLD_SIZE", "2"}, {"DUPLEX_STORE_ADDR", "h:1"}, {"SLURM_PROCID", "1"},
           {"SLURM_NTASKS", "2"}, {"SLURM_JOB_NODELIST", "n1"}});
    ProcessEnv p = process_env();
    EXPECT_EQ(p.rank, 0);
    EXPECT_EQ(p.store_addr, "h:1");
}

TEST(LaunchEnv, ARankOutsideTheWorldIsRefused) {
    Env e({{"SLURM_PROCID", "4"}, {"SLURM_NTASKS", "4"}});
    EXPECT_THROW(process_env(), ConfigError);
}

TEST(LaunchEnv, SlurmNodeLists) {
    EXPECT_EQ(slurm_first_host("node7"), "node7");
    EXPECT_EQ(slurm_first_host("gpu-a[003-005,009],gpu-b7"), "gpu-a003");
    EXPECT_EQ(slurm_first_host("x[12,14]"), "x12");
    EXPECT_EQ(slurm_first_host("a,b[1-2]"), "a");
    EXPECT_EQ(slurm_first_host("rack[1-2]-n[01-04]"), "rack1-n01");
    EXPECT_THROW(slurm_first_host("bad[1-2"), ConfigError);
}

}  // namespace
}  // namespace duplex
