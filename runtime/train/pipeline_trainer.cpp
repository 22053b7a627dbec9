#include "runtime/train/pipeline_trainer.hpp"

#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <mutex>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/clock.hpp"
#include "core/knobs.hpp"
#include "memory/ema.hpp"
#include "parallel/plan.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/sim/emulate.hpp"
#include "runtime/sim/timed_transport.hpp"
#include "runtime/exec/executor.hpp"
#include "runtime/model/builtin_stage.hpp"
#include "runtime/model/router.hpp"

namespace duplex {

using sched::ScheduleKind;

namespace {

const Knob<long> kCrashBeforeManifest("DUPLEX_TEST_CRASH_BEFORE_MANIFEST", 0,
                                      "tests only: rank 0 kills its process (SIGKILL) while saving the checkpoint of "
                                      "this step, after every shard is written and before the manifest (0: never)");

bool crash_before_manifest(long step) { return kCrashBeforeManifest.get() == step; }

}  // namespace

template <typename T>
struct PipelineTrainer<T>::Impl {
    PipelineOptions p;
    TrainOptions o;
    RunPlan plan;
    bool custom = false;
    std::shared_ptr<Communicator> world, pipe, pair, ep_bwd;
    GroupComms groups;
    // EP > 1: the stages' EP group and exchange lanes, handed to every stage call (before the stages: outlives them)
    std::shared_ptr<ExpertService> expert_service;
    RankGrid grid;
    sched::Schedule schedule;
    int prank = 0;
    std::shared_ptr<const BatchSource> batches;
    std::map<int, std::unique_ptr<Stage>> stages;  // by model stage id
    std::map<int, bool> owner;                     // stage id -> this copy counts for norms and the EMA
    std::map<int, std::vector<std::unique_ptr<Zero1AdamW<T>>>> optimizers;
    // The parameters of each optimizer, in its flat order: (name, elements).
    std::map<int, std::vector<std::vector<std::pair<std::string, size_t>>>> optimizer_params;
    std::unique_ptr<PipeTransport> transport;
    std::unique_ptr<Executor> executor;
    Tracer tracer;
    std::unique_ptr<CpuEma<T>> ema;
    std::vector<std::pair<std::string, TensorView>> ema_params;  // owned parameters, in EMA order
    std::vector<bool> ema_expert;                                // ... and whether each is a routed expert's
    std::shared_ptr<EmulatedBytes> emulated_bytes = std::make_shared<EmulatedBytes>();
    std::vector<std::pair<std::string, size_t>> stat_layout;  // the world's statistics, by name
    int64_t tokens_per_microbatch = 0;                        // built-in model: for tokens/s (custom stages: 0)
    bool hierarchical = false;
    int step_ = 0;

    Impl(std::shared_ptr<Communicator> w, const PipelineOptions& po, const TrainOptions& to)
        : p(po), o(to), plan{po.schedule, po.pp, po.dp, po.ep}, world(std::move(w)), tracer(world->rank(), po.trace) {}

    // The idle share of the schedule: 1 - compute / (the slowest rank's schedule time), averaged over the world.
    double bubble_share(double schedule_us, double compute_us, double& slowest_us) {
        double vals[2] = {schedule_us, compute_us};
        std::vector<double> all(2 * size_t(world->size()));
        world->all_gather(vals, all.data(), sizeof(vals))->wait();
        slowest_us = 0;
        for (int r = 0; r < world->size(); ++r) slowest_us = std::max(slowest_us, all[2 * r]);
        double idle = 0;
        for (int r = 0; r < world->size(); ++r)
            idle += slowest_us > 0 ? std::max(0.0, 1.0 - all[2 * r + 1] / slowest_us) : 0.0;
        return idle / world->size();
    }

    // Sums the gradients of `bufs` (those `keep` selects) over `group`, in place; returns their squared norm after
    // the sum (0 when none is selected).
    template <typename Keep>
    double sum_gradients(Communicator& group, std::vector<StateBuffer*> const& bufs, Keep keep) {
        std::vector<T> flat;
        for (StateBuffer* b : bufs)
            if (keep(*b)) flat.insert(flat.end(), b->grad.template data<T>(), b->grad.template data<T>() + b->grad.numel());
        if (flat.empty()) return 0;
        group.all_reduce(flat.data(), flat.size(), dtype_of<T>())->wait();
        size_t off = 0;
        double sq = 0;
        for (StateBuffer* b : bufs)
            if (keep(*b)) {
                std::memcpy(b->grad.raw(), flat.data() + off, b->grad.nbytes());
                off += size_t(b->grad.numel());
            }
        for (T g : flat) sq += double(g) * double(g);
        return sq;
    }

    // The checkpoint pieces of optimizer k of stage s: for each parameter overlapping this rank's ZeRO-1 shard,
    // fn(name, elements, first element of the piece in the parameter, its length, its offset in the shard).
    template <typename Fn>
    void for_each_shard_piece(int s, size_t k, Fn fn) {
        const Zero1AdamW<T>& opt = *optimizers.at(s)[k];
        size_t begin = opt.shard_begin(), end = begin + opt.shard_size(), off = 0;
        for (const auto& [name, n] : optimizer_params.at(s)[k]) {
            size_t lo = std::max(off, begin), hi = std::min(off + n, end);
            if (lo < hi) fn(name, int64_t(n), int64_t(lo - off), int64_t(hi - lo), lo - begin);
            off += n;
        }
    }

    std::vector<StateBuffer> parameters_of(Stage& s) {
        std::vector<StateBuffer> out;
        for (StateBuffer& b : s.state())
            if (b.kind == StateKind::Parameter) {
                if (b.value.dtype() != dtype_of<T>() || b.grad.dtype() != dtype_of<T>() ||
                    b.grad.numel() != b.value.numel() || b.value.device().kind != Device::CPU)
                    throw StageError(fmt::format("{}: parameter '{}' is {} with gradient {}; this trainer runs {} "
                                                 "parameters on the CPU",
                                                 s.name(), b.name, b.value.spec().str(), b.grad.spec().str(),
                                                 dtype_name(dtype_of<T>())));
                out.push_back(std::move(b));
            }
        return out;
    }

    // Every rank's statistic names and sizes, merged on rank 0 and sent back: the flat layout summed each step.
    void agree_on_statistics(const std::map<std::string, std::vector<double>>& mine) {
        std::string blob;
        for (const auto& [name, v] : mine) blob += fmt::format("{} {}\n", name, v.size());
        std::string merged;
        if (world->rank() == 0) {
            std::map<std::string, size_t> all;
            for (const std::string& b : gather_strings(*world, blob)) {
                size_t pos = 0;
                while (pos < b.size()) {
                    size_t nl = b.find('\n', pos), sp = b.rfind(' ', nl);
                    std::string name = b.substr(pos, sp - pos);
                    size_t n = std::stoul(b.substr(sp + 1, nl - sp - 1));
                    auto [it, fresh] = all.emplace(name, n);
                    if (!fresh && it->second != n)
                        throw StageError(fmt::format("statistic '{}' has {} values on one rank and {} on another", name,
                                                     it->second, n));
                    pos = nl + 1;
                }
            }
            for (const auto& [name, n] : all) merged += fmt::format("{} {}\n", name, n);
        } else {
            gather_strings(*world, blob);
        }
        // Broadcast: rank 0's bytes, zeros elsewhere, summed.
        int64_t len = int64_t(merged.size());
        world->all_reduce(&len, 1, DType::I64)->wait();
        if (len == 0) return;  // no stage reports statistics (emulate mode, most custom stages)
        std::vector<int64_t> words(size_t(len + 7) / 8, 0);
        if (world->rank() == 0) std::memcpy(words.data(), merged.data(), merged.size());
        world->all_reduce(words.data(), words.size(), DType::I64)->wait();
        merged.assign(reinterpret_cast<const char*>(words.data()), size_t(len));
        size_t pos = 0;
        while (pos < merged.size()) {
            size_t nl = merged.find('\n', pos), sp = merged.rfind(' ', nl);
            stat_layout.push_back({merged.substr(pos, sp - pos), std::stoul(merged.substr(sp + 1, nl - sp - 1))});
            pos = nl + 1;
        }
    }
};

template <typename T>
void PipelineTrainer<T>::validate(const PipelineOptions& p, const TrainOptions& o, int world_size, bool custom_stages) {
    o.validate();
    RunPlan plan{p.schedule, p.pp, p.dp, p.ep};
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
    I.schedule = sched::generate(p.schedule, p.pp, o.microbatches);
    // Backward expert exchanges use a second communicator over the EP group's ranks, so the two halves of an
    // overlapped F&B pair never interleave collectives on one communicator.
    if (p.ep > 1 && !p.emulate) I.ep_bwd = I.groups.ep->split(0, I.groups.ep->rank());
    if (p.ep > 1) I.expert_service = std::make_shared<ExpertService>(I.groups.ep, I.ep_bwd);
    I.hierarchical = p.ep > 1 && p.dispatch == "hierarchical" && I.groups.ep->topology().num_nodes() > 1;

    int layers = I.custom ? p.layers : o.model_config().layers;
    if (!I.custom) I.tokens_per_microbatch = o.model_config().tokens_per_microbatch(o.sequences_per_microbatch);
    if (!factory) {
        if (p.emulate) {
            EmulateOptions eo;
            eo.model = o.model_config();
            eo.sequences = o.sequences_per_microbatch;
            eo.elem_bytes = sizeof(T);
            eo.recompute = o.recompute;
            eo.costs = p.emulate_costs;
            eo.cost_model = p.cost_model;
            eo.hierarchical = p.dispatch == "hierarchical";
            eo.seed = o.seed;
            auto bytes = I.emulated_bytes;
            factory = [eo, bytes](const StageInfo& info) { return std::make_unique<EmulatedStage>(eo, info, bytes); };
        } else {
            factory = builtin_stage_factory<T>(builtin_stage_options(o, p.dispatch));
        }
    }
    if (!batches && !p.emulate && !I.custom) {
        ModelConfig cfg = o.model_config();
        batches = make_batch_source(o.data, cfg.vocab, cfg.seq_len, o.sequences_per_microbatch, o.seed, o.token_skew);
    }
    I.batches = batches;

    // The stages this pipeline rank runs, from the schedule's placement.
    for (int dir = 0; dir < I.schedule.num_directions; ++dir)
        for (int s = 0; s < p.pp; ++s)
            if (I.schedule.rank_of(s, dir) == I.prank && !I.stages.count(s)) {
                StageInfo info;
                info.stage = s;
                info.num_stages = p.pp;
                if (layers > 0) {
                    LayerRange lr = I.plan.layers_of_stage(s, layers);
                    info.first_layer = lr.first, info.num_layers = lr.count;
                }
                info.loss_scale = 1.0 / (double(o.microbatches) * p.dp);
                info.rank = world->rank();
                info.dtype = dtype_of<T>();
                info.ep_rank = I.grid.ep_index, info.ep_size = p.ep;
                I.stages[s] = factory(info);
                if (!I.stages[s]) throw StageError(fmt::format("the stage factory returned nothing for stage {}", s));
                // DualPipe holds every stage twice (ranks s and PP-1-s); the down copy (rank s) is the owner.
                I.owner[s] = p.schedule != ScheduleKind::DualPipe || I.schedule.rank_of(s, 0) == I.prank;
            }
    if (p.schedule == ScheduleKind::DualPipe)
        I.pair = world->split(I.grid.dp_index * ranks + std::min(I.prank, ranks - 1 - I.prank), I.prank);
    if (p.emulate)
        I.transport = std::make_unique<TimedPipeTransport>(I.pipe, I.p.cost_model);
    else
        I.transport = std::make_unique<CommPipeTransport>(I.pipe);
    I.executor = std::make_unique<Executor>(I.schedule, I.prank, *I.transport, I.tracer,
                                            ExecutorOptions{.exclusive_compute = p.emulate, .experts = I.expert_service});
    I.executor->prepare(stages());

    kernels::AdamWConfig ac;
    ac.lr = o.lr;
    ac.weight_decay = o.weight_decay;
    for (auto& [s, stage] : I.stages) {
        if (p.optimizer == "none") break;
        std::vector<StateBuffer> params = I.parameters_of(*stage);
        for (bool experts : {false, true}) {
            std::vector<ParamRef<T>> refs;
            std::vector<double> decay;
            std::vector<std::pair<std::string, size_t>> names;
            for (StateBuffer& b : params) {
                if (b.expert != experts) continue;
                refs.push_back({b.value.template data<T>(), b.grad.template data<T>(), size_t(b.value.numel())});
                decay.push_back(b.decay ? o.weight_decay : 0.0);
                names.push_back({b.name, size_t(b.value.numel())});
            }
            if (refs.empty()) continue;
            I.optimizer_params[s].push_back(std::move(names));
            I.optimizers[s].push_back(
                std::make_unique<Zero1AdamW<T>>(experts ? I.groups.edp : I.groups.dp, refs, ac, decay));
        }
    }
    if (p.ema_decay > 0) {
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
        I.ema = std::make_unique<CpuEma<T>>(sizes, p.ema_decay);
        I.ema->initialize(values);
    }
    std::map<std::string, std::vector<double>> stats;
    for (auto& [s, stage] : I.stages)
        for (auto& [name, v] : stage->take_statistics()) stats[name] = std::move(v);
    I.agree_on_statistics(stats);
}

template <typename T>
PipelineTrainer<T>::~PipelineTrainer() = default;

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
    const int N = I.o.microbatches, offset = I.grid.dp_index * N;
    for (auto& [s, stage] : I.stages) stage->zero_grad();

    // The first and last stage read the same microbatch: one batch per microbatch per step.
    std::mutex batch_mutex;
    std::map<int, std::pair<Batch, MicrobatchData>> batch_cache;  // a batch and its views (node-stable in the map)
    auto data_of = [&](int mb) -> const MicrobatchData* {
        if (!I.batches) return nullptr;
        std::lock_guard<std::mutex> lock(batch_mutex);
        auto it = batch_cache.find(mb);
        if (it == batch_cache.end()) {
            it = batch_cache.emplace(mb, std::make_pair(I.batches->batch(I.step_, offset + mb), MicrobatchData{})).first;
            it->second.second = microbatch_data(it->second.first);
        }
        return &it->second.second;
    };
    std::map<int, Stage*> stages = this->stages();
    ExecutorStep r = I.executor->run(stages, data_of, I.step_, offset);

    double slowest_us = 0;
    m.bubble_fraction = I.bubble_share(r.schedule_us, r.compute_us, slowest_us);
    {
        auto [h, t] = hidden_time(r.comm, r.compute);
        auto [fh, ft] = hidden_time(r.fb_expert_comm, r.compute);
        double v[4] = {h, t, fh, ft};
        I.world->all_reduce(v, 4, DType::F64)->wait();
        m.comm_hidden_fraction = v[1] > 0 ? v[0] / v[1] : std::nan("");
        m.fb_ep_comm_hidden_fraction = v[3] > 0 ? v[2] / v[3] : std::nan("");
    }
    double opt_start = I.tracer.now_us();

    std::map<int, std::vector<StateBuffer>> params;
    for (auto& [s, stage] : I.stages) params[s] = I.parameters_of(*stage);
    auto all = [](const StateBuffer&) { return true; };
    // The two DualPipe copies of a stage: sum their gradients (both ranks hold the same two stages).
    if (I.pair) {
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
    // ZeRO-1: reduce-scatter over DP, global norm over the owned copies, AdamW, all-gather.
    for (auto& [s, opts] : I.optimizers)
        for (auto& opt : opts) {
            double part = opt->reduce();
            if (I.owner.at(s)) sq += part;
        }
    I.world->all_reduce(&sq, 1, DType::F64)->wait();
    m.grad_norm = std::sqrt(sq);
    double clip_scale = (I.o.clip > 0 && m.grad_norm > I.o.clip) ? I.o.clip / m.grad_norm : 1.0;
    for (auto& [s, opts] : I.optimizers)
        for (auto& opt : opts) opt->apply(I.step_, clip_scale);
    if (I.ema) {
        std::vector<const T*> values;
        for (auto& [name, v] : I.ema_params) values.push_back(v.template data<T>());
        I.ema->submit(values);  // a copy; the update runs in the background during the next step
    }
    I.tracer.add(Lane::Optimizer, "grad sync + ZeRO-1 AdamW", opt_start, I.tracer.now_us());

    // Statistics summed over the world (all replicas; each DualPipe copy reports its own microbatches), back to
    // every stage. Expert counts also give the step's MaxVio.
    if (!I.stat_layout.empty()) {
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
                m.max_vio = std::max(m.max_vio, max_violation(c));
            }
        }
        for (auto& [s, stage] : I.stages) stage->end_step(summed);
    }

    // Losses: each microbatch's loss sits on the rank that ran its last stage; the world sums them.
    std::vector<double> losses(size_t(N) * I.p.dp, 0.0);
    for (auto& [mb, l] : r.losses) losses[size_t(offset + mb)] = l;
    I.world->all_reduce(losses.data(), losses.size(), DType::F64)->wait();
    for (double l : losses) m.loss += l / double(losses.size());
    if (I.p.emulate) {
        // The step ends when the slowest rank ends.
        m.step_time_s = slowest_us * 1e-6;
    } else {
        m.step_time_s = sw.seconds();
    }
    m.tokens_per_s = double(losses.size()) * double(I.tokens_per_microbatch) / std::max(m.step_time_s, 1e-9);
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
std::string PipelineTrainer<T>::layout_json() const {
    const Impl& I = *impl_;
    nlohmann::json j = {{"trainer", "pipeline"},
                        {"schedule", std::string(sched::kind_name(I.p.schedule))},
                        {"pp", I.p.pp},
                        {"dp", I.p.dp},
                        {"ep", I.p.ep},
                        {"dtype", std::string(dtype_name(dtype_of<T>()))},
                        {"optimizer", I.p.optimizer},
                        {"global_microbatches", I.o.microbatches * I.p.dp},
                        {"ema", I.p.ema_decay > 0}};
    if (I.custom) {
        j["model"] = "custom";
        j["layers"] = I.p.layers;
    } else {
        ModelConfig c = I.o.model_config();
        j["model"] = c.name;
        j["model_shape"] = fmt::format("layers {} dense {} hidden {} vocab {} experts {} top-{} seq {}", c.layers,
                                       c.dense_layers, c.hidden, c.vocab, c.experts, c.top_k, c.seq_len);
        j["sequences_per_microbatch"] = I.o.sequences_per_microbatch;
        j["seed"] = std::to_string(I.o.seed);
        j["data"] = I.o.data;
        // The data cursor: batches are a function of (step, global microbatch), so the step is the cursor.
        j["data_cursor"] = "step";
    }
    return j.dump();
}

template <typename T>
std::string PipelineTrainer<T>::save_checkpoint(const std::string& root, int keep) {
    Impl& I = *impl_;
    DUPLEX_CHECK_ARG(!I.p.emulate, "--save", "emulate mode trains no weights: nothing to checkpoint");
    std::string dir = ckpt::step_directory(root, I.step_);
    if (I.world->rank() == 0) {
        std::error_code ec;
        std::filesystem::remove_all(dir, ec);  // an interrupted save of the same step
        std::filesystem::create_directories(dir, ec);
        if (ec) throw CheckpointError(fmt::format("{}: cannot create: {}", dir, ec.message()));
    }
    I.world->barrier()->wait();
    ckpt::ShardWriter w;
    const DType dt = dtype_of<T>();
    // Each value is written once: by the owner copy (DualPipe holds two) in the first DP replica, or for a routed
    // expert's in the first EP group (the others hold the same experts' copies).
    auto writer = [&](bool expert) { return expert ? I.grid.ep_group == 0 : I.grid.dp_index == 0; };
    for (auto& [s, stage] : I.stages) {
        if (!I.owner.at(s)) continue;
        for (StateBuffer& b : stage->state())
            if (writer(b.expert))
                w.add("value/" + b.name, b.value.dtype(), b.value.numel(), 0, b.value.numel(), b.value.raw());
        for (size_t k = 0; k < I.optimizers[s].size(); ++k) {
            Zero1AdamW<T>& opt = *I.optimizers[s][k];
            I.for_each_shard_piece(s, k, [&](const std::string& name, int64_t n, int64_t first, int64_t count, size_t at) {
                w.add("adam_m/" + name, dt, n, first, count, opt.first_moment().data() + at);
                w.add("adam_v/" + name, dt, n, first, count, opt.second_moment().data() + at);
            });
        }
    }
    if (I.ema) {
        const auto& shadow = I.ema->shadow();  // waits for the pending update
        for (size_t i = 0; i < I.ema_params.size(); ++i)
            if (writer(I.ema_expert[i]))
                w.add("ema/" + I.ema_params[i].first, dt, int64_t(shadow[i].size()), 0, int64_t(shadow[i].size()),
                      shadow[i].data());
    }
    ckpt::FileEntry mine = w.write(dir, fmt::format("rank-{:05d}.bin", I.world->rank()));
    std::vector<std::string> entries = gather_strings(*I.world, ckpt::ShardWriter::encode(mine));
    if (I.world->rank() == 0) {
        std::vector<ckpt::FileEntry> files;
        for (const std::string& e : entries) files.push_back(ckpt::ShardWriter::decode(e));
        if (crash_before_manifest(I.step_)) std::raise(SIGKILL);
        ckpt::write_manifest(dir, I.step_, layout_json(), files);
        ckpt::prune_checkpoints(root, keep);
    }
    I.world->barrier()->wait();  // nobody goes on (or exits) before the checkpoint is complete
    return dir;
}

template <typename T>
long PipelineTrainer<T>::load_checkpoint(const std::string& path) {
    Impl& I = *impl_;
    DUPLEX_CHECK_ARG(!I.p.emulate, "--resume", "emulate mode trains no weights: nothing to resume");
    // Phase 1: read and verify everything into staging buffers; nothing of the run changes yet.
    struct Copy {
        void* dst;
        std::vector<char> bytes;
    };
    std::vector<Copy> copies;
    std::map<Zero1AdamW<T>*, std::pair<std::vector<T>, std::vector<T>>> moments;
    std::vector<std::vector<T>> ema_values;
    long step = 0;
    std::string error;
    try {
        std::optional<std::string> dir = ckpt::latest_checkpoint(path);
        if (!dir)
            throw CheckpointError(fmt::format("{}: no complete checkpoint (no manifest.json there or in a step-* "
                                              "directory under it)", path));
        ckpt::CheckpointReader r(*dir);
        nlohmann::json have = nlohmann::json::parse(r.layout_json()), want = nlohmann::json::parse(layout_json());
        // The most telling difference first.
        std::vector<std::string> keys = {"trainer", "model", "model_shape", "dtype", "pp", "schedule", "ep",
                                         "global_microbatches"};
        for (auto& [key, value] : want.items())
            if (std::find(keys.begin(), keys.end(), key) == keys.end()) keys.push_back(key);
        for (const std::string& key : keys) {
            // DP may change (ZeRO-1 re-shards); an EMA may start now.
            if (key == "dp" || key == "ema" || !want.contains(key)) continue;
            const nlohmann::json& value = want[key];
            if (!have.contains(key) || have[key] != value)
                throw CheckpointError(fmt::format("{}/manifest.json: written by a run with {} = {}, this run has {} "
                                                  "(only the DP size may change on resume)",
                                                  *dir, key, have.contains(key) ? have[key].dump() : "nothing",
                                                  value.dump()));
        }
        const DType dt = dtype_of<T>();
        for (auto& [s, stage] : I.stages) {
            for (StateBuffer& b : stage->state()) {
                Copy c{b.value.raw(), std::vector<char>(b.value.nbytes())};
                r.read("value/" + b.name, b.value.dtype(), b.value.numel(), 0, b.value.numel(), c.bytes.data());
                copies.push_back(std::move(c));
            }
            for (size_t k = 0; k < I.optimizers[s].size(); ++k) {
                Zero1AdamW<T>& opt = *I.optimizers[s][k];
                auto& [m, v] = moments[&opt];
                m.assign(opt.shard_size(), T(0));
                v.assign(opt.shard_size(), T(0));
                I.for_each_shard_piece(s, k, [&](const std::string& name, int64_t n, int64_t first, int64_t count,
                                                 size_t at) {
                    r.read("adam_m/" + name, dt, n, first, count, m.data() + at);
                    r.read("adam_v/" + name, dt, n, first, count, v.data() + at);
                });
            }
        }
        if (I.ema) {
            for (auto& [name, view] : I.ema_params) {
                if (!r.has("ema/" + name)) {  // saved without an EMA: it starts from the loaded weights
                    ema_values.clear();
                    break;
                }
                ema_values.emplace_back(size_t(view.numel()));
                r.read("ema/" + name, dt, view.numel(), 0, view.numel(), ema_values.back().data());
            }
        }
        step = r.step();
    } catch (const Error& e) {
        error = e.what();
    }
    // Phase 2: every rank agrees before anything changes; a refusal is raised on every rank with the first
    // refusing rank's reason (each rank verifies only the files it reads).
    constexpr size_t kReason = 1024;
    std::vector<char> reasons(kReason * size_t(I.world->size()), 0), mine(kReason, 0);
    std::memcpy(mine.data(), error.data(), std::min(error.size(), kReason - 1));
    I.world->all_gather(mine.data(), reasons.data(), kReason)->wait();
    if (!error.empty()) throw CheckpointError(error);
    for (int rr = 0; rr < I.world->size(); ++rr)
        if (reasons[size_t(rr) * kReason])
            throw CheckpointError(fmt::format("rank {}: {} (nothing was loaded)", rr, reasons.data() + size_t(rr) * kReason));
    // Phase 3: apply.
    for (Copy& c : copies) std::memcpy(c.dst, c.bytes.data(), c.bytes.size());
    for (auto& [opt, mv] : moments) {
        opt->first_moment() = std::move(mv.first);
        opt->second_moment() = std::move(mv.second);
    }
    if (I.ema) {
        std::vector<const T*> values;
        if (ema_values.empty())
            for (auto& [name, view] : I.ema_params) values.push_back(view.template data<T>());
        else
            for (auto& v : ema_values) values.push_back(v.data());
        I.ema->initialize(values);
    }
    I.step_ = int(step);
    return step;
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
