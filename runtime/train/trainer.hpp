// The trainer's options and step metrics, and the single-rank reference trainer: the pipeline trainer
// (runtime/train/pipeline_trainer.hpp) at PP = DP = 1 — the oracle every distributed run is compared with.
//
//   TrainOptions o; o.model = "tiny"; o.steps = 300;
//   ReferenceTrainer<float> t(o);
//   t.run([](const StepMetrics& m) { ... });
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cpu/ops.hpp"
#include "runtime/train/data.hpp"
#include "runtime/model/builtin_stage.hpp"
#include "runtime/model/options.hpp"
#include "runtime/model/stage.hpp"

namespace duplex {

// The trainer's options: the built-in model's (runtime/model/options.hpp) and the step loop's.
struct TrainOptions : ModelOptions {
    int steps = 300;
    int microbatches = 4;
    int sequences_per_microbatch = 4;
    double lr = 3e-3;
    double weight_decay = 0.1;
    double clip = 1.0;
    double token_skew = 0.0;  // Zipf exponent of the input tokens (skewed expert load); 0: uniform
    // Training data: "synthetic" (the task of runtime/train/data.hpp) or a token-id file "PATH[:u16|:u32]".
    std::string data = "synthetic";
    // Where the routed experts compute: "cpu", or "cuda" (rank r on GPU r % GPUs) / "cuda:N" — the executor's
    // device path (runtime/device/device_experts.hpp), fp32 only.
    std::string device = "cpu";
    // How the EP group's dispatch and combine rows move: "host" (the communicator) or "cuda" (the exchange kernel on
    // the experts' GPU, its own stream and `comm_sms` SMs; runtime/device/device_exchange.hpp). cuda needs --experts-on.
    std::string exchange_on = "host";
    int comm_sms = 20;
    void validate() const;
    // The GPU index of `rank` under --experts-on (-1 for cpu); ConfigError when there is no such device.
    int device_index(int rank) const;
    // A lower bound of the host memory `replicas` data-parallel replicas of the built-in model take in one
    // process (parameters with their gradient and AdamW moments; one microbatch's activations through every layer
    // and its logits), with how it was counted. Emulate mode computes nothing: its stages hold no weights.
    std::pair<double, std::string> memory_lower_bound(int replicas, size_t elem_bytes, bool emulate) const;
};

// The built-in stage's options for a run of `o`: its model options, and its experts' device on each rank from
// --experts-on / --exchange-on (the device room's experts and exchange transport).
BuiltinStageOptions builtin_stage_options(const TrainOptions& o, const std::string& dispatch);

struct StepMetrics {
    int step = 0;
    double loss = 0;      // task cross-entropy, mean over the step's microbatches
    // Pipeline runs: each microbatch's loss, the global batch's order (DP replica-major: replica d's microbatch i
    // at d x N + i), the same on every rank.
    std::vector<double> losses;
    double aux_loss = 0;  // sequence-wise balance loss (when enabled)
    double max_vio = 0;  // over the MoE layers, of the whole step's expert counts
    double grad_norm = 0;
    double bubble_fraction = 0;  // pipeline runs: mean over ranks of the schedule's idle share
    // Pipeline runs: the share of communication wait time (P2P receives, expert exchanges) during which the
    // same rank computed something else, over all ranks; and the same for expert exchanges inside F&B pairs.
    double comm_hidden_fraction = 0;
    double fb_ep_comm_hidden_fraction = 0;
    double step_time_s = 0;
    double tokens_per_s = 0;
    // Pipeline runs: false when the step's loss or gradient norm was not finite — its update was not applied
    // (parameters, optimizer moments, EMA and router bias untouched); `not_applied` then says where it started
    // (rank, stage, microbatch, the first parameter whose gradient is not finite), the same on every rank.
    bool applied = true;
    int bad_steps_in_a_row = 0;  // this one included
    std::string not_applied;
};

// Loss of the whole model with the given parameters (by name; missing names keep their initial values) on
// one batch: evaluates saved or EMA weights.
template <typename T>
double evaluate_loss(const ModelConfig& cfg, const std::map<std::string, std::vector<T>>& params, const Batch& batch);

class Communicator;
template <typename T>
class PipelineTrainer;

// The single-rank reference: the pipeline trainer itself at PP = DP = EP = 1, on a world of one rank in the
// calling thread (one stage holds the whole model; 1F1B runs the microbatches one after another, each forward
// then its backward). What every distributed run is compared with; the fp64 PyTorch model of
// tests/python/test_model_reference.py checks it independently.
template <typename T>
class ReferenceTrainer {
public:
    explicit ReferenceTrainer(const TrainOptions& o);  // ConfigError for options that cannot run
    ~ReferenceTrainer();
    StepMetrics step();
    // o.steps steps through the training loop (runtime/train/fit.hpp), which stops a run that diverges.
    std::vector<StepMetrics> run(const std::function<void(const StepMetrics&)>& on_step = {}, int max_bad_steps = 3);
    ModelStage<T>& model();
    const BatchSource& batches() const { return *batches_; }
    int tokens_per_step() const;
    // Tokens per expert of each MoE layer in the last step (what its router-bias update used).
    std::vector<std::vector<int64_t>> last_expert_counts() const;

private:
    TrainOptions o_;
    std::shared_ptr<BatchSource> batches_;
    std::shared_ptr<Communicator> world_;
    std::unique_ptr<PipelineTrainer<T>> t_;
};

}  // namespace duplex
