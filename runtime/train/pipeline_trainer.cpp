#include "runtime/train/pipeline_trainer.hpp"

#include <sstream>

#include "runtime/sim/grad_sync.hpp"
#include "runtime/train/pipeline_impl.hpp"

namespace duplex {

template <typename T>
void PipelineTrainer<T>::validate(const PipelineOptions& p, const TrainOptions& o, int world_size, bool custom_stages) {
    o.validate();
    RunPlan plan{p.schedule, p.pp, p.dp, p.ep, p.vpp};
    DUPLEX_CHECK_ARG(p.sum_pairs || p.optimizer == "none", "sum_pairs",
                     "DualPipe's copies keep their own gradients only without an optimizer (optimizer 'none')");
    DUPLEX_CHECK_ARG(p.loss_scale >= 0, "loss_scale", "must not be negative, got {}", p.loss_scale);
    if (custom_stages) {
        plan.validate(o.microbatches, p.ep);  // EP groups are the caller's to use: any EP dividing DP
        RankGrid::validate({plan.pipeline_ranks(), p.dp, p.ep}, world_size, p.ep);
        DUPLEX_CHECK_ARG(p.layers == 0 || p.layers >= p.pp, "layers", "{} layers cannot fill {} pipeline stages",
                         p.layers, p.pp);
        DUPLEX_CHECK_ARG(p.optimizer == "zero1-adamw" || p.optimizer == "none", "optimizer",
                         "'{}' is not an optimizer (zero1-adamw, none)", p.optimizer);
        DUPLEX_CHECK_ARG(!p.emulate, "--mode", "emulate runs the built-in model's cost model, not custom stages");
        return;
    }
    ModelConfig cfg = o.model_config();
    plan.validate(o.microbatches, cfg.experts);
    RankGrid::validate({plan.pipeline_ranks(), p.dp, p.ep}, world_size, cfg.experts);
    DUPLEX_CHECK_ARG(p.optimizer == "zero1-adamw" || p.optimizer == "none", "optimizer",
                     "'{}' is not an optimizer (zero1-adamw, none)", p.optimizer);
    DUPLEX_CHECK_ARG(p.dispatch == "hierarchical" || p.dispatch == "flat", "--dispatch",
                     "'{}' is not a dispatch path (hierarchical, flat)", p.dispatch);
    if (!p.emulate) cfg.check_runnable();
    DUPLEX_CHECK_ARG(!p.emulate || o.device == "cpu", "--experts-on", "emulate mode runs no math; drop --experts-on {}",
                     o.device);
    DUPLEX_CHECK_ARG(o.exchange_on == "host" || p.ep > 1, "--exchange-on",
                     "cuda moves the rows of the EP group's exchanges; with --ep 1 there are none");
    // Emulate mode may run more stages than the model has layers (a stage's cost is then given or empty).
    if (!p.emulate)
        DUPLEX_CHECK_ARG(cfg.layers >= p.pp, "--pp", "the {} model has {} layers, fewer than {} pipeline stages "
                         "(--layers sets more)", cfg.name, cfg.layers, p.pp);
}

namespace {

// The built-in model's stages, or emulate mode's with the cost model's times.
template <typename T>
StageFactory default_factory(const PipelineOptions& p, const TrainOptions& o, std::shared_ptr<EmulatedBytes> bytes) {
    if (!p.emulate) return builtin_stage_factory<T>(builtin_stage_options(o, p.dispatch));
    EmulateOptions eo;
    eo.model = o.model_config();
    eo.sequences = o.sequences_per_microbatch;
    eo.elem_bytes = sizeof(T);
    eo.recompute = o.recompute;
    eo.costs = p.emulate_costs;
    eo.cost_model = p.cost_model.for_expert_parallel(p.ep);
    eo.hierarchical = p.dispatch == "hierarchical";
    eo.seed = o.seed;
    return [eo, bytes](const StageInfo& info) { return std::make_unique<EmulatedStage>(eo, info, bytes); };
}

// The stages this pipeline rank runs, from the schedule's placement.
template <typename Impl>
void make_stages(Impl& I, const StageFactory& factory, int layers, int pp) {
    for (int dir = 0; dir < I.schedule.num_directions; ++dir)
        for (int s = 0; s < pp; ++s)
            if (I.schedule.rank_of(s, dir) == I.prank && !I.stages.count(s)) {
                StageInfo info;
                info.stage = s;
                info.num_stages = pp;
                if (layers > 0) {
                    LayerRange lr = I.plan.layers_of_stage(s, layers);
                    info.first_layer = lr.first, info.num_layers = lr.count;
                }
                info.loss_scale = I.p.loss_scale > 0 ? I.p.loss_scale : 1.0 / (double(I.o.microbatches) * I.p.dp);
                info.rank = I.world->rank();
                info.dtype = dtype_of<typename Impl::Value>();
                info.ep_rank = I.grid.ep_index, info.ep_size = I.p.ep;
                I.stages[s] = factory(info);
                if (!I.stages[s]) throw StageError(fmt::format("the stage factory returned nothing for stage {}", s));
                // DualPipe holds every stage twice (ranks s and PP-1-s); the down copy (rank s) is the owner.
                I.owner[s] = I.p.schedule != ScheduleKind::DualPipe || I.schedule.rank_of(s, 0) == I.prank;
            }
}

// Emulate mode's gradient synchronization: per stage this rank holds, what the cost model charges its pair sum
// (DualPipe), reduce-scatter and all-gather over this run's groups (runtime/sim/grad_sync.hpp).
template <typename Impl>
std::unique_ptr<TimedGradSync> make_timed_sync(Impl& I, int layers) {
    const ModelConfig cfg = I.o.model_config();
    const CostModel cm = I.p.cost_model.for_expert_parallel(I.p.ep);
    auto link = [](Communicator& c) { return c.topology().num_nodes() > 1 ? LinkClass::InterNode : LinkClass::IntraNode; };
    const bool pair_sum = I.p.schedule == ScheduleKind::DualPipe;
    std::map<int, double> seconds;
    for (auto& [s, stage] : I.stages) {
        LayerRange lr = I.plan.layers_of_stage(s, layers);
        StageParams sp = stage_params(cfg, lr.first, lr.count, s == 0, s == I.p.pp - 1, I.p.ep);
        seconds[s] = stage_sync_s(cm, sp, I.p.dp, I.p.dp / I.p.ep, link(*I.groups.dp), pair_sum,
                                  pair_sum ? link(*I.pair) : LinkClass::Self);
    }
    return std::make_unique<TimedGradSync>(seconds, I.p.overlap_grad_sync);
}

// ZeRO-1's reduce-scatter of one stage's gradients (its dense and expert optimizers); the squared norm it counts.
template <typename Impl>
void reduce_stage(Impl& I, int stage) {
    double sq = 0;
    auto opts = I.optimizers.find(stage);
    if (opts != I.optimizers.end())
        for (auto& opt : opts->second) {
            double part = opt->reduce();
            if (I.owner.at(stage)) sq += part;
        }
    std::lock_guard<std::mutex> lock(I.reduced_mu);
    I.reduced_sq[stage] = sq;
}

// ZeRO-1 AdamW per stage: one over the dense parameters (DP group), one over the routed experts' (expert-DP).
template <typename Impl>
void make_optimizers(Impl& I) {
    using T = typename Impl::Value;
    if (I.p.optimizer == "none") return;
    kernels::AdamWConfig ac;
    ac.lr = I.o.lr;
    ac.weight_decay = I.o.weight_decay;
    for (auto& [s, stage] : I.stages) {
        std::vector<StateBuffer> params = I.parameters_of(*stage);
        for (bool experts : {false, true}) {
            std::vector<ParamRef<T>> refs;
            std::vector<double> decay;
            std::vector<std::pair<std::string, size_t>> names;
            for (StateBuffer& b : params) {
                if (b.expert != experts) continue;
                refs.push_back({b.value.template data<T>(), b.grad.template data<T>(), size_t(b.value.numel())});
                decay.push_back(b.decay ? I.o.weight_decay : 0.0);
                names.push_back({b.name, size_t(b.value.numel())});
            }
            if (refs.empty()) continue;
            I.optimizer_params[s].push_back(std::move(names));
            I.optimizers[s].push_back(
                std::make_unique<Zero1AdamW<T>>(experts ? I.groups.edp : I.groups.dp, refs, ac, decay));
        }
    }
}

// The EMA of the owned parameters, in CPU memory, started from their values now.
template <typename Impl>
void make_ema(Impl& I) {
    using T = typename Impl::Value;
    std::vector<size_t> sizes;
    std::vector<const T*> values;
    for (auto& [s, stage] : I.stages)
        if (I.owner.at(s))
            for (StateBuffer& b : I.parameters_of(*stage)) {
                sizes.push_back(size_t(b.value.numel()));
                values.push_back(b.value.template data<T>());
                I.ema_params.push_back({b.name, b.value});
                I.ema_expert.push_back(b.expert);
            }
    I.ema = std::make_unique<CpuEma<T>>(sizes, I.p.ema_decay);
    I.ema->initialize(values);
}

// The shares of communication, and of the F&B pairs' expert communication, that compute hid (world means).
void measure_overlap(Communicator& world, const ExecutorStep& r, StepMetrics& m) {
    auto [h, t] = hidden_time(r.comm, r.compute);
    auto [fh, ft] = hidden_time(r.fb_expert_comm, r.compute);
    double v[4] = {h, t, fh, ft};
    world.all_reduce(v, 4, DType::F64)->wait();
    m.comm_hidden_fraction = v[1] > 0 ? v[0] / v[1] : std::nan("");
    m.fb_ep_comm_hidden_fraction = v[3] > 0 ? v[2] / v[3] : std::nan("");
}

// The step end: DualPipe's pair sum of the two copies' gradients, then ZeRO-1 (reduce-scatter over DP, the
// global norm over the owned copies, clipping, AdamW, all-gather) or, without an optimizer, the gradients summed
// over the replicas for the caller; the EMA gets the new weights. Returns the gradient norm. A norm that is not
// finite, or `apply` false (the loss is not), leaves the parameters, the moments and the EMA as they were.
template <typename Impl>
double update_weights(Impl& I, bool apply) {
    using T = typename Impl::Value;
    std::map<int, std::vector<StateBuffer>> params;
    for (auto& [s, stage] : I.stages) params[s] = I.parameters_of(*stage);
    auto all = [](const StateBuffer&) { return true; };
    // The two DualPipe copies of a stage: sum their gradients (both ranks hold the same two stages).
    if (I.pair && I.p.sum_pairs) {
        std::vector<StateBuffer*> every;
        for (auto& [s, bufs] : params)
            for (StateBuffer& b : bufs) every.push_back(&b);
        I.sum_gradients(*I.pair, every, all);
    }
    double sq = 0;
    if (I.p.optimizer == "none") {
        // Gradients summed over the data-parallel replicas (experts: over expert-DP) and left for the caller.
        for (auto& [s, bufs] : params) {
            std::vector<StateBuffer*> mine;
            for (StateBuffer& b : bufs) mine.push_back(&b);
            for (bool experts : {false, true}) {
                Communicator& group = experts ? *I.groups.edp : *I.groups.dp;
                double part = I.sum_gradients(group, mine, [experts](const StateBuffer& b) { return b.expert == experts; });
                // Every replica of the group holds the sum: count it once over the world.
                if (I.owner.at(s)) sq += part / group.size();
            }
        }
    }
    // ZeRO-1: reduce-scatter over DP (each stage's, unless it already ran as its weight gradients were done),
    // global norm over the owned copies, AdamW, all-gather.
    if (I.reducer) I.reducer->wait();
    for (auto& [s, opts] : I.optimizers) {
        auto done = I.reduced_sq.find(s);
        if (done == I.reduced_sq.end()) reduce_stage(I, s);
        sq += I.reduced_sq.at(s);
    }
    I.reduced_sq.clear();
    I.world->all_reduce(&sq, 1, DType::F64)->wait();
    double norm = std::sqrt(sq);
    if (!apply || !std::isfinite(norm)) return norm;
    double clip_scale = (I.o.clip > 0 && norm > I.o.clip) ? I.o.clip / norm : 1.0;
    for (auto& [s, opts] : I.optimizers)
        for (auto& opt : opts) opt->apply(I.step_, clip_scale);
    if (I.ema) {
        std::vector<const T*> values;
        for (auto& [name, v] : I.ema_params) values.push_back(v.template data<T>());
        I.ema->submit(values);  // a copy; the update runs in the background during the next step
    }
    return norm;
}

// Where a step that is not finite started, from every rank's view (a collective; the same text on every rank): the
// first microbatch whose loss is not finite, and the first parameter in backward order (the highest stage, its
// last parameters first) whose gradient is not.
template <typename Impl>
std::string divergence_report(Impl& I, const ExecutorStep& r, const StepMetrics& m, int offset) {
    using T = typename Impl::Value;
    std::string mine;
    for (auto& [mb, l] : r.losses)
        if (!std::isfinite(l)) {
            mine += fmt::format("L {} {} {}\n", offset + mb, I.world->rank(), l);
            break;
        }
    // In the order the backward computes them: the last stage first, its last parameters first.
    for (auto it = I.stages.rbegin(); it != I.stages.rend(); ++it) {
        auto& [s, stage] = *it;
        bool found = false;
        std::vector<StateBuffer> params = I.parameters_of(*stage);
        for (auto pb = params.rbegin(); pb != params.rend(); ++pb) {
            StateBuffer& b = *pb;
            const T* g = b.grad.template data<T>();
            for (int64_t i = 0; i < b.grad.numel() && !found; ++i)
                if (!std::isfinite(double(g[i]))) {
                    mine += fmt::format("G {} {} {} {}\n", I.world->rank(), s, b.name, double(g[i]));
                    found = true;
                }
            if (found) break;
        }
        if (found) break;
    }
    std::string loss_at = "every loss is finite", grad_at = "every gradient is finite here (the sum overflowed)";
    int best_mb = -1, best_rank = -1, best_stage = -1;
    if (I.world->rank() == 0) {
        std::vector<std::string> all = gather_strings(*I.world, mine);
        for (const std::string& text : all) {
            std::istringstream in(text);
            for (std::string kind; in >> kind;) {
                if (kind == "L") {
                    int mb = 0, rank = 0;
                    std::string v;
                    in >> mb >> rank >> v;
                    if (best_mb < 0 || mb < best_mb)
                        best_mb = mb, loss_at = fmt::format("microbatch {} (loss {}, last stage on rank {})", mb, v, rank);
                } else {
                    int rank = 0, stage = 0;
                    std::string name, v;
                    in >> rank >> stage >> name >> v;
                    if (stage > best_stage || (stage == best_stage && rank < best_rank))
                        best_stage = stage, best_rank = rank,
                        grad_at = fmt::format("stage {} on rank {}, parameter '{}' ({})", stage, rank, name, v);
                }
            }
        }
    } else {
        gather_strings(*I.world, mine);
    }
    return I.from_rank0(fmt::format("step {} not applied: loss {}, gradient norm {}; first non-finite loss: {}; first "
                                    "non-finite gradient (backward order): {}",
                                    m.step, m.loss, m.grad_norm, loss_at, grad_at));
}

// Statistics summed over the world (all replicas; each DualPipe copy reports its own microbatches), back to
// every stage; kept for step_statistics(). Fills the step's MaxVio (from the expert counts) and auxiliary loss.
template <typename Impl>
void sum_statistics(Impl& I, StepMetrics& m) {
    double max_vio = 0;
    std::map<std::string, std::vector<double>> mine;
    for (auto& [s, stage] : I.stages)
        for (auto& [name, v] : stage->take_statistics()) {
            auto& acc = mine[name];
            acc.resize(std::max(acc.size(), v.size()), 0.0);
            for (size_t i = 0; i < v.size(); ++i) acc[i] += v[i];
        }
    std::vector<double> flat;
    for (const auto& [name, n] : I.stat_layout) {
        auto it = mine.find(name);
        for (size_t i = 0; i < n; ++i) flat.push_back(it != mine.end() && i < it->second.size() ? it->second[i] : 0.0);
    }
    I.world->all_reduce(flat.data(), flat.size(), DType::F64)->wait();
    std::map<std::string, std::vector<double>> summed;
    size_t off = 0;
    for (const auto& [name, n] : I.stat_layout) {
        summed[name].assign(flat.begin() + long(off), flat.begin() + long(off + n));
        off += n;
        if (name.size() > 14 && name.compare(name.size() - 14, 14, ".expert_counts") == 0) {
            std::vector<int64_t> c(summed[name].begin(), summed[name].end());
            max_vio = std::max(max_vio, max_violation(c));
        }
    }
    if (m.applied)  // a step not applied leaves the router bias as it was too
        for (auto& [s, stage] : I.stages) stage->end_step(summed);
    m.max_vio = max_vio;
    if (auto it = summed.find(kAuxLossStatistic); it != summed.end() && !it->second.empty())
        m.aux_loss = it->second[0] / (double(I.o.microbatches) * I.p.dp);
    I.summed_statistics = std::move(summed);
}

// A step's microbatches as the stages read them: the first and last stage read the same one, so each is made
// once, on first use (node-stable in the map: the executor keeps the views).
template <typename Impl>
struct StepBatches {
    StepBatches(Impl& impl, long s, int o) : I(impl), step(s), offset(o) {}
    Impl& I;
    long step;
    int offset;
    std::mutex mutex;
    std::map<int, std::pair<Batch, MicrobatchData>> cache;
    const MicrobatchData* operator()(int mb) {
        if (!I.batches) return nullptr;
        std::lock_guard<std::mutex> lock(mutex);
        auto it = cache.find(mb);
        if (it == cache.end()) {
            it = cache.emplace(mb, std::make_pair(I.batches->batch(step, offset + mb), MicrobatchData{})).first;
            it->second.second = microbatch_data(it->second.first);
        }
        return &it->second.second;
    }
};

// Each microbatch's loss of the global batch on every rank: it sits on the rank that ran its last stage; the
// world sums them.
template <typename Impl>
std::vector<double> world_losses(Impl& I, const ExecutorStep& r, int offset) {
    std::vector<double> losses(size_t(I.o.microbatches) * I.p.dp, 0.0);
    for (auto& [mb, l] : r.losses) losses[size_t(offset + mb)] = l;
    I.world->all_reduce(losses.data(), losses.size(), DType::F64)->wait();
    return losses;
}

}  // namespace

template <typename T>
PipelineTrainer<T>::PipelineTrainer(std::shared_ptr<Communicator> world, const PipelineOptions& p, const TrainOptions& o,
                                    StageFactory factory, std::shared_ptr<const BatchSource> batches)
    : impl_(std::make_unique<Impl>(world, p, o)) {
    Impl& I = *impl_;
    I.custom = bool(factory);
    validate(p, o, world->size(), I.custom);
    kernels::blas_single_threaded();
    int ranks = I.plan.pipeline_ranks();
    int experts = I.custom ? p.ep : o.model_config().experts;
    I.grid = RankGrid::make({ranks, p.dp, p.ep}, world->size(), experts, world->rank());
    I.groups = make_groups(*world, I.grid);
    I.pipe = I.groups.pp;
    I.prank = I.pipe->rank();
    I.schedule = sched::generate(p.schedule, p.pp, o.microbatches, p.vpp);
    // Backward expert exchanges use a second communicator over the EP group's ranks, so the two halves of an
    // overlapped F&B pair never interleave collectives on one communicator.
    if (p.ep > 1 && !p.emulate) I.ep_bwd = I.groups.ep->split(0, I.groups.ep->rank());
    if (p.ep > 1) I.expert_service = std::make_shared<ExpertService>(I.groups.ep, I.ep_bwd);
    I.hierarchical = p.ep > 1 && choose_path(p.dispatch == "hierarchical", I.groups.ep->topology()) == ExpertPath::NodeLimited;

    int layers = I.custom ? p.layers : o.model_config().layers;
    if (!I.custom) I.tokens_per_microbatch = o.model_config().tokens_per_microbatch(o.sequences_per_microbatch);
    if (!factory) factory = default_factory<T>(p, o, I.emulated_bytes);
    if (!batches && !p.emulate && !I.custom) {
        ModelConfig cfg = o.model_config();
        batches = make_batch_source(o.data, cfg.vocab, cfg.seq_len, o.sequences_per_microbatch, o.seed, o.token_skew);
    }
    I.batches = batches;

    make_stages(I, factory, layers, p.pp);
    if (p.schedule == ScheduleKind::DualPipe)
        I.pair = world->split(I.grid.dp_index * ranks + std::min(I.prank, ranks - 1 - I.prank), I.prank);
    if (p.emulate)
        I.transport = std::make_unique<TimedPipeTransport>(I.pipe, I.p.cost_model);
    else
        I.transport = std::make_unique<CommPipeTransport>(I.pipe);
    ExecutorOptions eo;
    eo.exclusive_compute = p.emulate, eo.experts = I.expert_service, eo.overlap_pairs = p.overlap_pairs;
    make_optimizers(I);
    if (p.emulate) {
        I.timed_sync = make_timed_sync(I, layers);
        eo.on_weights_done = [&I](int stage) { I.timed_sync->weights_done(stage, I.tracer.now_us()); };
    } else if (p.overlap_grad_sync && !I.optimizers.empty() && p.schedule != ScheduleKind::DualPipe) {
        // DP replicas run the same list, so they post their stages' reduce-scatters in the same order.
        I.reducer = std::make_unique<SerialWorker>();
        eo.on_weights_done = [&I](int stage) { I.reducer->post([&I, stage] { reduce_stage(I, stage); }); };
    }
    I.executor = std::make_unique<Executor>(I.schedule, I.prank, *I.transport, I.tracer, eo);
    I.executor->prepare(stages());

    if (p.ema_decay > 0) make_ema(I);
    std::map<std::string, std::vector<double>> stats;
    for (auto& [s, stage] : I.stages)
        for (auto& [name, v] : stage->take_statistics()) stats[name] = std::move(v);
    I.agree_on_statistics(stats);
}

template <typename T>
PipelineTrainer<T>::~PipelineTrainer() = default;

template <typename T>
bool PipelineTrainer<T>::last_step_applied() const {
    return impl_->bad_in_a_row == 0;
}

template <typename T>
const std::map<std::string, std::vector<double>>& PipelineTrainer<T>::step_statistics() const {
    return impl_->summed_statistics;
}

template <typename T>
int PipelineTrainer<T>::pipeline_ranks() const {
    return impl_->plan.pipeline_ranks();
}

template <typename T>
std::map<int, Stage*> PipelineTrainer<T>::stages() {
    std::map<int, Stage*> out;
    for (auto& [s, st] : impl_->stages) out[s] = st.get();
    return out;
}

template <typename T>
StepMetrics PipelineTrainer<T>::step() {
    Impl& I = *impl_;
    Stopwatch sw;
    ++I.step_;
    StepMetrics m;
    m.step = I.step_;
    const int offset = I.grid.dp_index * I.o.microbatches;
    for (auto& [s, stage] : I.stages) stage->zero_grad();

    StepBatches<Impl> data{I, I.step_, offset};
    std::map<int, Stage*> stages = this->stages();
    if (I.timed_sync) I.timed_sync->start(I.tracer.now_us());
    ExecutorStep r = I.executor->run(stages, [&](int mb) { return data(mb); }, I.step_, offset);
    // Emulate mode: the synchronization the pipeline did not cover, waited for now.
    double sync_us = I.timed_sync ? I.timed_sync->finish(I.tracer.now_us()) : 0;

    double slowest_us = 0;
    m.bubble_fraction = I.bubble_share(r.schedule_us, r.compute_us, slowest_us);
    measure_overlap(*I.world, r, m);
    std::vector<double> losses = world_losses(I, r, offset);
    for (double l : losses) m.loss += l / double(losses.size());
    m.losses = losses;

    double opt_start = I.tracer.now_us();
    m.grad_norm = update_weights(I, std::isfinite(m.loss));
    I.tracer.add(Lane::Optimizer, "grad sync + ZeRO-1 AdamW", opt_start, I.tracer.now_us());
    m.applied = std::isfinite(m.loss) && std::isfinite(m.grad_norm);
    I.bad_in_a_row = m.applied ? 0 : I.bad_in_a_row + 1;
    m.bad_steps_in_a_row = I.bad_in_a_row;
    if (!m.applied) m.not_applied = divergence_report(I, r, m, offset);

    if (!I.stat_layout.empty()) sum_statistics(I, m);
    if (I.p.emulate) {
        // The step ends when the slowest rank's pipeline and gradient synchronization end.
        double mine = r.schedule_us + sync_us;
        std::vector<double> all(size_t(I.world->size()));
        I.world->all_gather(&mine, all.data(), sizeof(double))->wait();
        m.step_time_s = *std::max_element(all.begin(), all.end()) * 1e-6;
    } else {
        m.step_time_s = sw.seconds();
    }
    m.tokens_per_s = double(losses.size()) * double(I.tokens_per_microbatch) / std::max(m.step_time_s, 1e-9);
    return m;
}

template <typename T>
StepMetrics PipelineTrainer<T>::evaluate(long data_step) {
    Impl& I = *impl_;
    Stopwatch sw;
    StepMetrics m;
    m.step = int(data_step);
    const int offset = I.grid.dp_index * I.o.microbatches;
    StepBatches<Impl> data{I, data_step, offset};
    ExecutorStep r = I.executor->run_forward(stages(), [&](int mb) { return data(mb); }, int(data_step), offset);
    m.losses = world_losses(I, r, offset);
    for (double l : m.losses) m.loss += l / double(m.losses.size());
    // What the forwards counted (expert loads, balance losses) belongs to no training step: dropped.
    for (auto& [s, stage] : I.stages) stage->take_statistics();
    m.step_time_s = sw.seconds();
    m.tokens_per_s = double(m.losses.size()) * double(I.tokens_per_microbatch) / std::max(m.step_time_s, 1e-9);
    return m;
}

template <typename T>
std::map<std::string, std::vector<T>> PipelineTrainer<T>::owned_parameters() {
    std::map<std::string, std::vector<T>> out;
    for (auto& [s, stage] : impl_->stages)
        if (impl_->owner.at(s))
            for (StateBuffer& b : impl_->parameters_of(*stage))
                out[b.name] = std::vector<T>(b.value.template data<T>(), b.value.template data<T>() + b.value.numel());
    return out;
}

template <typename T>
std::string PipelineTrainer<T>::dispatch_path() const {
    if (impl_->p.ep == 1) return "local";
    return impl_->hierarchical ? "hierarchical" : "flat";
}

template <typename T>
LinkBytes PipelineTrainer<T>::expert_bytes_sent() const {
    if (impl_->p.emulate) {
        LinkBytes b;
        b.intra_node = impl_->emulated_bytes->intra.load();
        b.inter_node = impl_->emulated_bytes->inter.load();
        return b;
    }
    LinkBytes b = impl_->groups.ep ? impl_->groups.ep->bytes_sent() : LinkBytes{};
    if (impl_->ep_bwd) {
        b.intra_node += impl_->ep_bwd->bytes_sent().intra_node;
        b.inter_node += impl_->ep_bwd->bytes_sent().inter_node;
    }
    return b;
}

template <typename T>
std::string PipelineTrainer<T>::trace_blob() const {
    return impl_->tracer.serialize();
}

template <typename T>
std::map<std::string, std::vector<T>> PipelineTrainer<T>::ema_parameters() {
    std::map<std::string, std::vector<T>> out;
    if (!impl_->ema) return out;
    const auto& shadow = impl_->ema->shadow();
    for (size_t i = 0; i < impl_->ema_params.size(); ++i) out[impl_->ema_params[i].first] = shadow[i];
    return out;
}

// ---- checkpoints ----

template <typename T>
long PipelineTrainer<T>::steps_done() const {
    return impl_->step_;
}

template <typename T>
std::map<std::string, std::vector<T>> gather_named_tensors(Communicator& world,
                                                           const std::map<std::string, std::vector<T>>& mine) {
    std::string blob;
    for (const auto& [name, v] : mine) {
        uint64_t n = name.size(), m = v.size();
        blob.append(reinterpret_cast<const char*>(&n), 8).append(name);
        blob.append(reinterpret_cast<const char*>(&m), 8).append(reinterpret_cast<const char*>(v.data()), m * sizeof(T));
    }
    std::map<std::string, std::vector<T>> all;
    for (const std::string& b : gather_strings(world, blob)) {
        size_t pos = 0;
        while (pos < b.size()) {
            uint64_t n, m;
            std::memcpy(&n, b.data() + pos, 8);
            std::string name = b.substr(pos + 8, n);
            pos += 8 + n;
            std::memcpy(&m, b.data() + pos, 8);
            std::vector<T> v(m);
            std::memcpy(v.data(), b.data() + pos + 8, m * sizeof(T));
            pos += 8 + m * sizeof(T);
            all[name] = std::move(v);
        }
    }
    return all;
}

template std::map<std::string, std::vector<float>> gather_named_tensors<float>(
    Communicator&, const std::map<std::string, std::vector<float>>&);
template std::map<std::string, std::vector<double>> gather_named_tensors<double>(
    Communicator&, const std::map<std::string, std::vector<double>>&);

template class PipelineTrainer<float>;
template class PipelineTrainer<double>;

}  // namespace duplex
