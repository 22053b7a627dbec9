// The one executor: runs a pipeline rank's instruction list (parallel/schedule.hpp) for any Stage
// (runtime/exec/stage.hpp). It is the only place an instruction list is interpreted for execution; math mode,
// emulate mode and device stages differ in their Stage and their PipeTransport, not in this loop.
//
// Per instruction it receives what the chunk needs (sched::p2p_of names peers and tags; a producer on the
// same rank — DualPipeV's turn-around — hands over in memory), calls the stage, checks what comes back
// against the stage's specs, and sends the result on. An FB instruction runs its forward chunk on a helper
// thread beside the backward chunk, so a wait in one half (an input, a dispatch, a combine) overlaps compute
// in the other. With `exclusive_compute` the rank has one compute stream (a GPU's, or emulate's timed waits):
// the halves take turns computing and a wait releases it.
//
//   Executor ex(schedule, pipe_rank, transport, tracer, {.exclusive_compute = false});
//   ex.prepare(stages);                                              // once
//   ExecutorStep r = ex.run(stages, data_of, step, global_offset);   // r.losses, r.compute_us, ...
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "parallel/schedule.hpp"
#include "runtime/exec/pipe_transport.hpp"
#include "runtime/exec/stage.hpp"
#include "runtime/exec/trace.hpp"

namespace duplex {

struct Interval {
    double start, end;  // microseconds
};

// Time of `comm` intervals covered by the union of `compute` intervals, and their total time.
std::pair<double, double> hidden_time(const std::vector<Interval>& comm, std::vector<Interval> compute);

struct ExecutorOptions {
    bool exclusive_compute = false;  // one compute stream per rank (see above)
    // The stages' expert-parallel group and exchange lanes, handed to every call (StageContext::experts()); null
    // without expert parallelism.
    std::shared_ptr<ExpertService> experts;
    // The two halves of an F&B pair on two threads, so one computes while the other waits (an expert exchange).
    // false: one after the other on one thread — for stages that cannot compute concurrently anyway (Python
    // stages under one interpreter lock) and have nothing to wait for inside a call (no EP).
    bool overlap_pairs = true;
    // Called on the executor's thread right after the instruction that computes a stage's last weight gradient of
    // the step on this rank (its W, BW or F&B pair): the stage's step-end synchronization may start.
    std::function<void(int stage)> on_weights_done;
};

struct ExecutorStep {
    std::map<int, double> losses;  // by microbatch id, the microbatches whose last stage ran here
    double compute_us = 0;         // time stages computed (waits inside calls excluded)
    double schedule_us = 0;        // from the first instruction to the last send drained
    std::vector<Interval> compute, comm, fb_expert_comm;  // for the comm-hidden shares
};

class Executor {
public:
    Executor(const sched::Schedule& schedule, int pipe_rank, PipeTransport& transport, Tracer& tracer,
             ExecutorOptions options = {});
    // Stage::prepare of each stage, in stage order, before the first step (a collective where stages set up
    // their expert exchanges: every rank of the group calls it at the same point).
    void prepare(const std::map<int, Stage*>& stages);
    // Runs this rank's list once. `stages` by model stage id (the stages the schedule places here);
    // data_of(mb) gives the first and last stage their microbatch's data (may be empty or return null).
    ExecutorStep run(const std::map<int, Stage*>& stages, const std::function<const MicrobatchData*(int mb)>& data_of,
                     int step, int global_offset);
    // The forward chunks of this rank's list alone, in its order (Microbatch::forward_only): an evaluation pass
    // over the same microbatches, with their losses. Deadlock-free whenever the schedule is: it keeps the order of
    // the forwards and drops only waits.
    ExecutorStep run_forward(const std::map<int, Stage*>& stages,
                             const std::function<const MicrobatchData*(int mb)>& data_of, int step, int global_offset);

    struct Run;  // one step's state (executor.cpp)

private:
    const sched::Schedule& schedule_;
    int prank_;
    PipeTransport& transport_;
    Tracer& tracer_;
    ExecutorOptions options_;
    std::map<int, size_t> last_weight_;  // stage -> the instruction computing its last weight gradient here
};

}  // namespace duplex
