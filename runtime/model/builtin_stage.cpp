#include "runtime/model/builtin_stage.hpp"

#include <fmt/format.h>

#include "core/error.hpp"
#include "runtime/model/router.hpp"

namespace duplex {

std::string expert_counts_name(int layer) { return fmt::format("layer{}.expert_counts", layer); }

template <typename T>
BuiltinStage<T>::BuiltinStage(const BuiltinStageOptions& o, const StageInfo& info)
    : o_(o), cfg_(o.model.model_config()) {
    name_ = info.num_layers > 0 ? fmt::format("stage {} (layers {}..{})", info.stage, info.first_layer,
                                              info.first_layer + info.num_layers - 1)
                                : fmt::format("stage {} (no layers)", info.stage);
    DUPLEX_CHECK_ARG(info.dtype == dtype_of<T>(), "stage dtype", "the trainer runs {}, this stage computes {}",
                     dtype_name(info.dtype), dtype_name(dtype_of<T>()));
    devices_ = o.devices ? o.devices(info.rank) : ExpertDevices{};
    // The experts' shard comes from the stage's place in its EP group; the exchanges over the group, in prepare().
    model_ = std::make_unique<ModelStage<T>>(cfg_, info.first_layer, info.num_layers, info.stage == 0,
                                             info.stage == info.num_stages - 1, o.model.seed, nullptr, nullptr,
                                             ExpertShard{info.ep_rank, info.ep_size});
    model_->set_recompute(o.model.recompute);
    model_->set_loss_scale(info.loss_scale);
    if constexpr (!std::is_same_v<T, float>) {
        if (devices_.experts) throw ConfigError("--experts-on", "the CUDA path runs fp32; drop --fp64 or use --experts-on cpu");
    } else {
        if (devices_.experts) model_->set_expert_compute(devices_.experts);
    }
}

template <typename T>
void BuiltinStage<T>::prepare(StageContext& ctx) {
    ExpertService* ep = ctx.experts();
    if (!ep || ep->group()->size() == 1) return;
    std::shared_ptr<Communicator> fwd_group = ep->group(ExpertService::Forward);
    std::shared_ptr<Communicator> bwd_group = ep->group(ExpertService::Backward);
    hierarchical_ = choose_path(o_.dispatch == "hierarchical", fwd_group->topology()) == ExpertPath::NodeLimited;
    auto make = [&](std::shared_ptr<Communicator> group) -> std::shared_ptr<ExpertExchange<T>> {
        if (hierarchical_) return std::make_shared<HierarchicalExchange<T>>(group, cfg_.experts);
        return std::make_shared<DistributedExchange<T>>(group, cfg_.experts);
    };
    std::shared_ptr<ExpertExchange<T>> fwd = make(fwd_group), bwd = make(bwd_group);
    if constexpr (!std::is_same_v<T, float>) {
        if (devices_.transport) throw ConfigError("--exchange-on", "cuda: the device path runs fp32 models, not fp64");
    } else {
        if (devices_.transport) {
            // Each communicator's exchanges get their own transport (collective over the group): the forward and
            // the backward of an F&B pair run their kernels on two streams.
            static_cast<DistributedExchange<T>&>(*fwd).set_transport(devices_.transport(fwd_group));
            static_cast<DistributedExchange<T>&>(*bwd).set_transport(devices_.transport(bwd_group));
        }
    }
    model_->set_exchanges(fwd, bwd);
}

template <typename T>
TensorSpec BuiltinStage<T>::input_spec(const Microbatch&) const {
    return {dtype_of<T>(), {cfg_.tokens_per_microbatch(o_.sequences_per_microbatch), cfg_.hidden}, Device::cpu()};
}

namespace {
template <typename T>
std::vector<T> values_of(const TensorView& v) {
    if (v.empty()) return {};
    const T* p = v.data<T>();
    return std::vector<T>(p, p + v.numel());
}
}  // namespace

template <typename T>
Tensor BuiltinStage<T>::forward(const Microbatch& mb, const TensorView& input) {
    Batch b = batch_from(mb.data, o_.sequences_per_microbatch, cfg_.seq_len);
    std::vector<T> out = model_->forward(mb.id, b, values_of<T>(input), mb.ctx);
    {
        std::lock_guard<std::mutex> lock(aux_mutex_);
        aux_loss_ += model_->aux_loss(mb.id);
    }
    if (mb.forward_only && !model_->has_head()) model_->discard(mb.id);  // the last stage: after its loss
    if (out.empty()) return {};
    int64_t rows = int64_t(out.size()) / cfg_.hidden;
    return Tensor::from_vector(std::move(out), {rows, cfg_.hidden});
}

template <typename T>
double BuiltinStage<T>::loss(const Microbatch& mb) {
    double l = model_->loss(mb.id);
    if (mb.forward_only) model_->discard(mb.id);
    return l;
}

template <typename T>
Tensor BuiltinStage<T>::backward_input(const Microbatch& mb, const TensorView& grad_output) {
    std::vector<T> dx = model_->backward_input(mb.id, values_of<T>(grad_output), mb.ctx);
    if (dx.empty()) return {};
    int64_t rows = int64_t(dx.size()) / cfg_.hidden;
    return Tensor::from_vector(std::move(dx), {rows, cfg_.hidden});
}

template <typename T>
std::vector<StateBuffer> BuiltinStage<T>::state() {
    std::vector<StateBuffer> out;
    for (Param<T>* p : model_->parameters()) {
        StateBuffer b;
        b.name = p->name;
        b.kind = StateKind::Parameter;
        b.value = TensorView::of(p->value, p->shape);
        b.grad = TensorView::of(p->grad, p->shape);
        b.expert = p->is_expert;
        b.decay = p->shape.size() > 1;  // no decay on norm gains
        out.push_back(std::move(b));
    }
    int moe = 0;
    for (int l = model_->first_layer(); l < model_->first_layer() + model_->num_layers(); ++l)
        if (cfg_.is_moe_layer(l)) {
            auto& bias = model_->router_bias()[size_t(moe++)];
            out.push_back({fmt::format("layer{}.router_bias", l), StateKind::Buffer, TensorView::of(bias), {}, false, false});
        }
    return out;
}

template <typename T>
std::map<std::string, std::vector<double>> BuiltinStage<T>::take_statistics() {
    std::map<std::string, std::vector<double>> out;
    {
        std::lock_guard<std::mutex> lock(aux_mutex_);
        out[kAuxLossStatistic] = {aux_loss_};
        aux_loss_ = 0;
    }
    auto counts = model_->take_expert_counts();
    int moe = 0;
    for (int l = model_->first_layer(); l < model_->first_layer() + model_->num_layers(); ++l)
        if (cfg_.is_moe_layer(l)) {
            const auto& c = counts[size_t(moe++)];
            out[expert_counts_name(l)] = std::vector<double>(c.begin(), c.end());
        }
    return out;
}

template <typename T>
void BuiltinStage<T>::end_step(const std::map<std::string, std::vector<double>>& summed) {
    if (!o_.model.bias_update) return;
    std::vector<std::vector<int64_t>> counts;
    for (int l = model_->first_layer(); l < model_->first_layer() + model_->num_layers(); ++l)
        if (cfg_.is_moe_layer(l)) {
            const auto& c = summed.at(expert_counts_name(l));
            counts.emplace_back(c.begin(), c.end());
        }
    model_->update_router_bias(counts);
}

template <typename T>
StageFactory builtin_stage_factory(const BuiltinStageOptions& o) {
    return [o](const StageInfo& info) -> std::unique_ptr<Stage> { return std::make_unique<BuiltinStage<T>>(o, info); };
}

template class BuiltinStage<float>;
template class BuiltinStage<double>;
template StageFactory builtin_stage_factory<float>(const BuiltinStageOptions&);
template StageFactory builtin_stage_factory<double>(const BuiltinStageOptions&);

}  // namespace duplex
