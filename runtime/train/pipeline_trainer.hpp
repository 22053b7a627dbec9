// The trainer of every distributed run: builds this rank's stages through a StageFactory (the built-in
// model's by default, emulate mode's timed stages with `emulate`, or the caller's own), runs the schedule with
// the one Executor (runtime/exec/executor.hpp), then the step end: DualPipe ranks hold two copies of each stage
// (r and PP-1-r) whose gradients are summed; ZeRO-1 AdamW per stage over the DP group (routed experts over the
// expert-DP group) with a global-norm clip; the CPU EMA of the owned weights, updated in the background; and
// the stages' statistics summed over every rank and handed back (the built-in router-bias update).
//
// The global batch is DP x N microbatches; replica d runs microbatches d*N .. d*N+N-1 of the batch source
// the single-rank ReferenceTrainer uses, so both compute the same step.
//
//   launch({.ranks = 8}, [&](auto world) {
//       PipelineTrainer<float> t(world, {.schedule = ScheduleKind::DualPipe, .pp = 4, .dp = 2}, train_options);
//       StepMetrics m = t.step();
//   });
//   // a model of one's own: PipelineTrainer<double> t(world, p, o, [](const StageInfo& i) { ... });
//
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "parallel/grid.hpp"
#include "parallel/plan.hpp"
#include "parallel/schedule.hpp"
#include "parallel/zero1.hpp"
#include "runtime/sim/cost_model.hpp"
#include "runtime/train/data.hpp"
#include "runtime/exec/stage.hpp"
#include "runtime/exec/trace.hpp"
#include "runtime/train/trainer.hpp"

namespace duplex {

struct PipelineOptions {
    sched::ScheduleKind schedule = sched::ScheduleKind::OneFOneB;
    int pp = 2;  // pipeline stages of the model (DualPipeV runs them on pp/2 ranks, Interleaved on pp/vpp)
    int dp = 1;
    int ep = 1;
    int vpp = 1;  // Interleaved: model stages per rank (Megatron's virtual pipeline size)
    // "zero1-adamw": ZeRO-1 AdamW over the DP group updates the parameters at step end. "none": the gradients are
    // summed over DualPipe's copies and all-reduced over DP (routed experts over expert-DP) and left in the
    // stages' gradient buffers for the caller's optimizer (a framework's own, e.g. torch.optim).
    std::string optimizer = "zero1-adamw";
    // DualPipe's two copies of a stage sum their gradients at step end (false: each copy keeps its own, as
    // deepseek-ai/DualPipe leaves them; only with optimizer "none").
    bool sum_pairs = true;
    // d(step loss) / d(microbatch loss) handed to the stages (StageInfo::loss_scale); 0: 1 / (microbatches x DP),
    // the mean. 1: each microbatch's loss backpropagated as it is (DualPipe's convention).
    double loss_scale = 0;
    // Custom stages: the model's layer count, split over the stages into StageInfo::first_layer/num_layers
    // (layers_of_stage). The built-in model takes its own.
    int layers = 0;
    // EP groups spanning several (virtual) nodes: "hierarchical" (node-limited, two hops; the default) or
    // "flat" (one copy per expert straight to its rank — the baseline the hierarchical path is measured against).
    std::string dispatch = "hierarchical";
    bool trace = false;      // record compute/communication spans (trace_blob)
    // DualPipe's F&B pairs: the two halves on two threads (ExecutorOptions::overlap_pairs); false runs them in order.
    bool overlap_pairs = true;
    double ema_decay = 0;    // > 0: keep an EMA of the weights in host memory, updated in the background
    // Emulate mode: the same schedule, ranks and transfers (real byte counts, zero payloads), but each chunk's
    // compute is a timed wait and each transfer is delivered after latency + bytes / bandwidth of its link.
    bool emulate = false;
    ChunkCosts emulate_costs{};            // seconds per chunk; f == 0: from the cost model per stage
    CostModel cost_model = CostModel::preset("h800");
    // The step-end gradient synchronization: each stage's ZeRO-1 reduce-scatter (emulate mode: the timed pair sum,
    // reduce-scatter and all-gather the simulator charges) starts when the executor finishes the stage's last
    // weight gradient; false: all of it after the pipeline. (DualPipe's real pair sum stays at the step end.)
    bool overlap_grad_sync = true;
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
    // `factory` empty: the built-in model (or emulate's stages). `batches` null: the synthetic task of o.
    PipelineTrainer(std::shared_ptr<Communicator> world, const PipelineOptions& p, const TrainOptions& o,
                    StageFactory factory = {}, std::shared_ptr<const BatchSource> batches = nullptr);
    ~PipelineTrainer();
    StepMetrics step();
    // Forward and loss only, over the microbatches of the batch source's step `data_step` (a Python stage reads
    // the inputs staged for it): each microbatch's loss and their mean, nothing trained, no statistic kept. A
    // collective, between steps.
    StepMetrics evaluate(long data_step);
    // The stages built on this rank, by model stage id.
    std::map<int, Stage*> stages();
    // The parameters of the model stages whose "down" copy lives here, by name (each name on exactly one rank
    // per DP replica).
    std::map<std::string, std::vector<T>> owned_parameters();
    int pipeline_ranks() const;
    // This rank's recorded spans since construction (see runtime/exec/trace.hpp), for write_chrome_trace.
    std::string trace_blob() const;
    // How tokens reach their experts here: "local" (EP = 1), "flat" or "hierarchical" (an EP group spanning nodes).
    std::string dispatch_path() const;
    // Bytes this rank sent to expert-parallel peers so far (dispatch + combine, forward and backward), by link.
    LinkBytes expert_bytes_sent() const;
    // The EMA of the owned parameters (empty without ema_decay); waits for the pending update.
    std::map<std::string, std::vector<T>> ema_parameters();
    // Checkpoints (runtime/train/checkpoint.hpp); collectives over the world. save_checkpoint, after a step: this rank's
    // shard (its owned stages' values and buffers, its ZeRO-1 moments, its part of the EMA) into root/step-<N>,
    // then rank 0's manifest, then all but the newest `keep` removed (0: keep all). Returns the directory.
    std::string save_checkpoint(const std::string& root, int keep = 0);
    // load_checkpoint, before the first step: `path` a checkpoint directory or a root (its newest complete one).
    // Every rank reads and verifies everything it needs before any state changes; a refusal anywhere
    // (CheckpointError naming the file and the problem) is an error on every rank. The layout must match the
    // checkpoint's except the DP size (ZeRO-1 state is re-sharded; the global batch DP x N must stay). Returns
    // the step the checkpoint was written after; step() continues from there.
    long load_checkpoint(const std::string& path);
    long steps_done() const;
    // Whether the last step was applied (true before the first); see StepMetrics::applied.
    bool last_step_applied() const;
    // The last step's statistics summed over the world, by name (what end_step got; runtime/exec/stage.hpp).
    const std::map<std::string, std::vector<double>>& step_statistics() const;
    // What a checkpoint records of this run (JSON object), and must agree on at resume.
    std::string layout_json() const;
    // ConfigError for a layout that cannot run. custom_stages: the model is the caller's (no built-in checks).
    static void validate(const PipelineOptions& p, const TrainOptions& o, int world_size, bool custom_stages = false);

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

}  // namespace duplex
