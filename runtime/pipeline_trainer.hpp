// Distributed training in math mode: every rank runs its instruction list of a pipeline schedule (1F1B,
// ZB1P, DualPipe, DualPipeV) with real stage compute and real point-to-point transfers of activations and
// gradients, data parallelism over DP replicas, ZeRO-1 AdamW per stage, and the router-bias update from the
// whole batch's expert counts. DualPipe ranks hold two stages (r and PP-1-r); the gradients of the two copies
// of a stage are summed before the optimizer, so both copies stay identical.
//
// The global batch is DP x N microbatches; replica d runs microbatches d*N .. d*N+N-1 of the same sequence
// the single-rank ReferenceTrainer uses, so both compute the same step.
//
//   launch({.ranks = 8}, [&](auto world) {
//       PipelineTrainer<float> t(world, {.schedule = ScheduleKind::DualPipe, .pp = 4, .dp = 2}, train_options);
//       StepMetrics m = t.step();
//   });
//
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "parallel/grid.hpp"
#include "parallel/schedule.hpp"
#include "parallel/zero1.hpp"
#include "runtime/cost_model.hpp"
#include "runtime/trace.hpp"
#include "runtime/trainer.hpp"

namespace duplex {

struct PipelineOptions {
    sched::ScheduleKind schedule = sched::ScheduleKind::OneFOneB;
    int pp = 2;  // pipeline stages of the model (DualPipeV runs them on pp/2 ranks)
    int dp = 1;
    int ep = 1;
    // EP groups spanning several (virtual) nodes: "hierarchical" (node-limited, two hops; the default) or
    // "flat" (one copy per expert straight to its rank — the baseline the hierarchical path is measured against).
    std::string dispatch = "hierarchical";
    bool trace = false;      // record compute/communication spans (trace_blob)
    double ema_decay = 0;    // > 0: keep an EMA of the weights in host memory, updated in the background
    // Emulate mode: the same schedule, ranks and transfers (real byte counts, zero payloads), but each chunk's
    // compute is a timed wait and each transfer is delivered after latency + bytes / bandwidth of its link.
    bool emulate = false;
    ChunkCosts emulate_costs{};            // seconds per chunk; f == 0: from the cost model per stage
    CostModel cost_model = CostModel::preset("h800");
};

// Every rank's named tensors (owned parameters, their EMA, ...) collected on rank 0; a collective. Other ranks
// get an empty map.
template <typename T>
std::map<std::string, std::vector<T>> gather_named_tensors(Communicator& world,
                                                           const std::map<std::string, std::vector<T>>& mine);

template <typename T>
class PipelineTrainer {
public:
    // o.microbatches is N per DP replica. Throws ConfigError for an impossible layout.
    PipelineTrainer(std::shared_ptr<Communicator> world, const PipelineOptions& p, const TrainOptions& o);
    ~PipelineTrainer();
    StepMetrics step();
    // The parameters of the model stages whose "down" copy lives here, by name (each name on exactly one rank
    // per DP replica).
    std::map<std::string, std::vector<T>> owned_parameters();
    int pipeline_ranks() const;
    // This rank's recorded spans since construction (see runtime/trace.hpp), for write_chrome_trace.
    std::string trace_blob() const;
    // How tokens reach their experts here: "local" (EP = 1), "flat" or "hierarchical" (an EP group spanning nodes).
    std::string dispatch_path() const;
    // Bytes this rank sent to expert-parallel peers so far (dispatch + combine, forward and backward), by link.
    LinkBytes expert_bytes_sent() const;
    // The EMA of the owned parameters (empty without ema_decay); waits for the pending update.
    std::map<std::string, std::vector<T>> ema_parameters();
    static void validate(const PipelineOptions& p, const TrainOptions& o, int world_size);

    struct Impl;

private:
    StepMetrics emulate_step();
    std::unique_ptr<Impl> impl_;
};

}  // namespace duplex
