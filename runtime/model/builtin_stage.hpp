// The built-in reference model as a Stage: one ModelStage (a range of layers, the embedding on stage 0, the
// head and loss on the last) behind the Stage contract, with its routed experts exchanged over the EP group
// the executor hands it (flat, or node-limited when the group spans nodes), optionally computed on a GPU.
//
// Where its experts compute and how its rows move when not on the host is handed in (ExpertDevices): the device
// room (runtime/device/) implements both, the trainer chooses.
//
//   StageFactory f = builtin_stage_factory<float>({.model = model_options, .sequences_per_microbatch = 4});
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include <functional>

#include "runtime/exec/stage.hpp"
#include "runtime/model/options.hpp"
#include "runtime/model/stage.hpp"

namespace duplex {

// A rank's experts on a GPU (fp32 stages only): what computes them and, when the EP rows move on the device too,
// the transport to make over each of the stage's EP communicators (collective over the group).
struct ExpertDevices {
    std::shared_ptr<ExpertCompute<float>> experts;
    std::function<std::shared_ptr<RowTransport<float>>(std::shared_ptr<Communicator> group)> transport;
};

struct BuiltinStageOptions {
    ModelOptions model;
    int sequences_per_microbatch = 4;
    std::string dispatch = "hierarchical";  // EP groups spanning nodes: hierarchical or flat
    // The experts' device of the stage on world rank `rank`; empty (or empty members): the host.
    std::function<ExpertDevices(int rank)> devices;
};

template <typename T>
class BuiltinStage : public Stage {
public:
    BuiltinStage(const BuiltinStageOptions& o, const StageInfo& info);
    std::string name() const override { return name_; }
    TensorSpec input_spec(const Microbatch& mb) const override;
    TensorSpec output_spec(const Microbatch& mb) const override { return input_spec(mb); }
    Tensor forward(const Microbatch& mb, const TensorView& input) override;
    double loss(const Microbatch& mb) override;
    Tensor backward_input(const Microbatch& mb, const TensorView& grad_output) override;
    void backward_weight(const Microbatch& mb) override { model_->backward_weight(mb.id); }
    std::vector<StateBuffer> state() override;
    void zero_grad() override { model_->zero_grad(); }
    // Builds the expert exchanges over the call's EP group (a collective: the device transport's set-up).
    void prepare(StageContext& ctx) override;
    std::map<std::string, std::vector<double>> take_statistics() override;
    void end_step(const std::map<std::string, std::vector<double>>& summed) override;

    ModelStage<T>& model() { return *model_; }
    // Whether this stage's EP exchanges take the node-limited path.
    bool hierarchical() const { return hierarchical_; }

private:
    BuiltinStageOptions o_;
    ModelConfig cfg_;
    std::string name_;
    ExpertDevices devices_;
    bool hierarchical_ = false;
    std::unique_ptr<ModelStage<T>> model_;
    std::mutex aux_mutex_;
    double aux_loss_ = 0;  // this step's microbatches' balance losses, summed (kAuxLossStatistic)
};

template <typename T>
StageFactory builtin_stage_factory(const BuiltinStageOptions& o);

// "layer{l}.expert_counts": the statistic each MoE layer reports (tokens per expert this step).
std::string expert_counts_name(int layer);

}  // namespace duplex
