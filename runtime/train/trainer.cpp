#include "runtime/train/trainer.hpp"

#include "core/host_memory.hpp"

#include <cmath>

#include <fmt/format.h>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "comm/launch.hpp"
#include "runtime/device/device_exchange.hpp"
#include "runtime/device/device_experts.hpp"
#include "runtime/model/router.hpp"
#include "runtime/train/fit.hpp"
#include "runtime/train/pipeline_trainer.hpp"

namespace duplex {

void TrainOptions::validate() const {
    DUPLEX_CHECK_ARG(steps >= 1, "--steps", "must be at least 1, got {}", steps);
    DUPLEX_CHECK_ARG(microbatches >= 1, "--microbatches", "must be at least 1, got {}", microbatches);
    DUPLEX_CHECK_ARG(sequences_per_microbatch >= 1, "--mb-sequences", "must be at least 1, got {}",
                     sequences_per_microbatch);
    DUPLEX_CHECK_ARG(lr > 0, "--lr", "must be positive, got {}", lr);
    DUPLEX_CHECK_ARG(clip >= 0, "--clip", "must not be negative, got {}", clip);
    DUPLEX_CHECK_ARG(device == "cpu" || device == "cuda" || device.rfind("cuda:", 0) == 0, "--experts-on",
                     "cpu, cuda or cuda:N, got '{}'", device);
    DUPLEX_CHECK_ARG(exchange_on == "host" || exchange_on == "cuda", "--exchange-on", "host or cuda, got '{}'",
                     exchange_on);
    DUPLEX_CHECK_ARG(exchange_on == "host" || device != "cpu", "--exchange-on",
                     "cuda runs the exchange kernel on the experts' GPU; add --experts-on cuda (or cuda:N)");
    DUPLEX_CHECK_ARG(comm_sms >= 1, "--comm-sms", "must be at least 1, got {}", comm_sms);
}

int TrainOptions::device_index(int rank) const {
    if (device == "cpu") return -1;
    if (!device_experts_available())
        throw ConfigError("--experts-on", fmt::format("{}: no CUDA device here (or CUDA not built in)", device));
    int count = cuda_device_count();
    if (device == "cuda") return rank % count;
    int n = -1;
    try {
        size_t used = 0;
        n = std::stoi(device.substr(5), &used);
        if (used != device.size() - 5) n = -1;
    } catch (const std::exception&) {
        n = -1;
    }
    DUPLEX_CHECK_ARG(n >= 0 && n < count, "--experts-on", "'{}': this machine has GPUs 0..{}", device, count - 1);
    return n;
}

BuiltinStageOptions builtin_stage_options(const TrainOptions& o, const std::string& dispatch) {
    BuiltinStageOptions b;
    b.model = o;
    b.sequences_per_microbatch = o.sequences_per_microbatch;
    b.dispatch = dispatch;
    if (o.device != "cpu")
        b.devices = [o](int rank) {
            int device = o.device_index(rank);
            ExpertDevices d;
            d.experts = make_device_experts(device);
            if (o.exchange_on == "cuda")
                d.transport = [device, sms = o.comm_sms](std::shared_ptr<Communicator> group) {
                    return make_device_transport(std::move(group), device, sms);
                };
            return d;
        };
    return b;
}

std::pair<double, std::string> TrainOptions::memory_lower_bound(int replicas, size_t elem_bytes, bool emulate) const {
    if (emulate) return {0.0, "emulate mode"};
    ModelConfig c = model_config();
    double elem = double(elem_bytes), tokens = double(c.tokens_per_microbatch(sequences_per_microbatch));
    double params = double(c.num_parameters()) * elem * 4;  // value, gradient, two moments
    // Saved per token and layer at the least: the layer's input, attention's q/k/v/output, the norms, a row of
    // attention probabilities, and the routed experts' hidden activations.
    double per_token_layer = elem * (8.0 * c.hidden + double(c.heads) * c.seq_len + 2.0 * c.top_k * c.expert_ffn);
    double acts = tokens * (per_token_layer * c.layers + 2.0 * c.vocab * elem);
    return {replicas * (params + acts),
            fmt::format("{} replica{} x ({} of parameters, gradients and moments + {} of activations for one "
                        "microbatch of {:.0f} tokens)",
                        replicas, replicas == 1 ? "" : "s", human_bytes(params), human_bytes(acts), tokens)};
}

template <typename T>
ReferenceTrainer<T>::ReferenceTrainer(const TrainOptions& o) : o_(o) {
    o_.validate();
    ModelConfig cfg = o_.model_config();
    batches_ = make_batch_source(o_.data, cfg.vocab, cfg.seq_len, o_.sequences_per_microbatch, o_.seed, o_.token_skew);
    PipelineOptions p{sched::ScheduleKind::OneFOneB, /*pp=*/1, /*dp=*/1, /*ep=*/1};
    world_ = single_rank_world();
    t_ = std::make_unique<PipelineTrainer<T>>(world_, p, o_, StageFactory{}, batches_);
}

template <typename T>
ReferenceTrainer<T>::~ReferenceTrainer() = default;

template <typename T>
ModelStage<T>& ReferenceTrainer<T>::model() {
    return dynamic_cast<BuiltinStage<T>&>(*t_->stages().at(0)).model();
}

template <typename T>
int ReferenceTrainer<T>::tokens_per_step() const {
    return o_.microbatches * int(o_.model_config().tokens_per_microbatch(o_.sequences_per_microbatch));
}

template <typename T>
StepMetrics ReferenceTrainer<T>::step() {
    return t_->step();
}

// The MoE layers' expert counts in layer order (what the router-bias update used).
template <typename T>
std::vector<std::vector<int64_t>> ReferenceTrainer<T>::last_expert_counts() const {
    std::vector<std::vector<int64_t>> counts;
    ModelConfig cfg = o_.model_config();
    const auto& stats = t_->step_statistics();
    for (int l = 0; l < cfg.layers; ++l)
        if (auto it = stats.find(expert_counts_name(l)); it != stats.end())
            counts.emplace_back(it->second.begin(), it->second.end());
    return counts;
}

template <typename T>
std::vector<StepMetrics> ReferenceTrainer<T>::run(const std::function<void(const StepMetrics&)>& on_step,
                                                  int max_bad_steps) {
    std::vector<StepMetrics> all;
    FitOptions f;
    f.steps = o_.steps;
    f.max_bad_steps = max_bad_steps;
    FitCallbacks cb;
    cb.on_step = [&](const StepMetrics& m) {
        all.push_back(m);
        if (on_step) on_step(m);
    };
    fit(*t_, f, cb);
    return all;
}

template <typename T>
double evaluate_loss(const ModelConfig& cfg, const std::map<std::string, std::vector<T>>& params, const Batch& batch) {
    ModelStage<T> stage(cfg, 0, cfg.layers, true, true, 0);
    for (Param<T>* p : stage.parameters()) {
        auto it = params.find(p->name);
        if (it == params.end()) continue;
        if (it->second.size() != p->value.size())
            throw ConfigError("parameters", fmt::format("'{}' has {} values, the model needs {}", p->name,
                                                        it->second.size(), p->value.size()));
        p->value = it->second;
    }
    stage.forward(0, batch, {});
    return stage.loss(0);
}

template double evaluate_loss<float>(const ModelConfig&, const std::map<std::string, std::vector<float>>&, const Batch&);
template double evaluate_loss<double>(const ModelConfig&, const std::map<std::string, std::vector<double>>&,
                                      const Batch&);

template class ReferenceTrainer<float>;
template class ReferenceTrainer<double>;

}  // namespace duplex
