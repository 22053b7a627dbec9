#include "runtime/train/report.hpp"

#include <algorithm>
#include <cmath>

#include "parallel/plan.hpp"
#include "parallel/schedule.hpp"

namespace duplex {

EmulatePrediction predict_emulated_step(const PipelineOptions& p, const TrainOptions& o, size_t elem_bytes) {
    const ModelConfig mc = o.model_config();
    RunPlan plan{p.schedule, p.pp, p.dp, p.ep, p.vpp};
    sched::Schedule sch = sched::generate(p.schedule, p.pp, o.microbatches, p.vpp);
    LayerRange mid = plan.layers_of_stage(p.pp / 2, mc.layers);
    int tokens = int(mc.tokens_per_microbatch(o.sequences_per_microbatch));
    EmulatePrediction e;
    e.chunk = p.emulate_costs.f > 0 ? p.emulate_costs
                                    : p.cost_model.for_expert_parallel(p.ep).chunk(mc, mid.first, mid.count, tokens,
                                                                                  {false, o.recompute});
    double act_bytes = double(tokens) * mc.hidden * double(elem_bytes);
    e.transfer_s = p.cost_model.transfer_s(act_bytes, LinkClass::IntraNode);
    sched::Costs sc{e.chunk.f, e.chunk.b, e.chunk.w, e.chunk.fb, e.transfer_s};
    e.step_s = sched::replay(sch, sc).makespan;
    return e;
}

ExpertTrafficReport expert_traffic_report(const LinkBytes& world_bytes, const PipelineOptions& p, const TrainOptions& o,
                                          long steps_run, size_t elem_bytes) {
    const ModelConfig c = o.model_config();
    ExpertTrafficReport r;
    r.bytes = world_bytes;
    double token_layers = double(steps_run) * p.dp * o.microbatches *
                          double(c.tokens_per_microbatch(o.sequences_per_microbatch)) * (c.layers - c.dense_layers) * 4;
    r.inter_node_per_token_direction = double(world_bytes.inter_node) / std::max(token_layers, 1.0);
    r.node_limited_bound = double(c.top_groups) * c.hidden * double(elem_bytes);
    return r;
}

namespace {
TrainOptions reference_options(TrainOptions o, const PipelineOptions& p) {
    o.microbatches *= p.dp;  // the whole global batch on one rank
    return o;
}
}  // namespace

template <typename T>
ReferenceCheck<T>::ReferenceCheck(const TrainOptions& o, const PipelineOptions& p)
    : ref_(reference_options(o, p)), ep_(p.ep) {}

template <typename T>
double ReferenceCheck<T>::step(double loss) {
    double want = ref_.step().loss;
    worst_ = std::max(worst_, std::fabs(want - loss) / std::max(std::fabs(want), 1e-30));
    return want;
}

template <typename T>
typename ReferenceCheck<T>::Result ReferenceCheck<T>::finish(const std::map<std::string, std::vector<T>>& params,
                                                             bool on_gpu) {
    std::map<std::string, std::vector<T>> want;
    for (Param<T>* prm : ref_.model().parameters()) want[prm->name] = prm->value;
    Result r;
    r.worst_loss_diff = worst_;
    r.params = compare_parameters(params, want);
    r.tolerance = reference_tolerance(std::is_same_v<T, double>, ep_, on_gpu);
    r.ok = r.worst_loss_diff <= r.tolerance.loss && r.params.worst <= r.tolerance.param;
    return r;
}

template <typename T>
EmaEvaluation evaluate_ema(const ModelConfig& c, uint64_t seed, const std::map<std::string, std::vector<T>>& params,
                           const std::map<std::string, std::vector<T>>& ema) {
    Batch eval = SyntheticTask(c.vocab, c.seq_len, seed).batch(8, 0xE7A1ull);
    return {evaluate_loss<T>(c, params, eval), evaluate_loss<T>(c, ema, eval)};
}

template class ReferenceCheck<float>;
template class ReferenceCheck<double>;
template EmaEvaluation evaluate_ema<float>(const ModelConfig&, uint64_t, const std::map<std::string, std::vector<float>>&,
                                           const std::map<std::string, std::vector<float>>&);
template EmaEvaluation evaluate_ema<double>(const ModelConfig&, uint64_t,
                                            const std::map<std::string, std::vector<double>>&,
                                            const std::map<std::string, std::vector<double>>&);

}  // namespace duplex
