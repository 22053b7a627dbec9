#include "runtime/pipeline_trainer.hpp"

#include <cstring>

#include "runtime/device_exchange.hpp"
#include "runtime/device_experts.hpp"
#include "runtime/pipeline_impl.hpp"

namespace duplex {

template <typename T>
void PipelineTrainer<T>::validate(const PipelineOptions& p, const TrainOptions& o, int world_size) {
    o.validate();
    ModelConfig cfg = o.model_config();
    sched::check_arguments(p.schedule, p.pp, o.microbatches);
    int ranks = p.schedule == ScheduleKind::DualPipeV ? p.pp / 2 : p.pp;
    GridConfig g{ranks, p.dp, p.ep};
    RankGrid::validate(g, world_size, cfg.experts);
    DUPLEX_CHECK_ARG(p.dispatch == "hierarchical" || p.dispatch == "flat", "--dispatch",
                     "'{}' is not a dispatch path (hierarchical, flat)", p.dispatch);
    if (!p.emulate) cfg.check_runnable();
    DUPLEX_CHECK_ARG(!p.emulate || o.device == "cpu", "--experts-on", "emulate mode runs no math; drop --experts-on {}",
                     o.device);
    DUPLEX_CHECK_ARG(o.exchange_on == "host" || p.ep > 1, "--exchange-on",
                     "cuda moves the rows of the EP group's exchanges; with --ep 1 there are none");
    if (!p.emulate)
        DUPLEX_CHECK_ARG(cfg.layers >= p.pp, "--pp", "the {} model has {} layers, fewer than {} pipeline stages",
                         cfg.name, cfg.layers, p.pp);
}

template <typename T>
PipelineTrainer<T>::PipelineTrainer(std::shared_ptr<Communicator> world, const PipelineOptions& p, const TrainOptions& o)
    : impl_(std::make_unique<Impl>(world, p, o)) {
    validate(p, o, world->size());
    Impl& I = *impl_;
    kernels::blas_single_threaded();
    int ranks = pipeline_ranks();
    I.grid = RankGrid::make({ranks, p.dp, p.ep}, world->size(), I.cfg.experts, world->rank());
    I.groups = make_groups(*world, I.grid);
    I.pipe = I.groups.pp;
    I.prank = I.pipe->rank();
    I.schedule = sched::generate(p.schedule, p.pp, o.microbatches);
    // Expert exchanges: forwards on the EP group, backwards on a second communicator over the same ranks, so the
    // two halves of an overlapped F&B pair never interleave collectives on one communicator.
    std::shared_ptr<ExpertExchange<T>> exchange, bwd_exchange;
    I.hierarchical = p.ep > 1 && p.dispatch == "hierarchical" && I.groups.ep->topology().num_nodes() > 1;
    if (p.ep > 1 && !p.emulate) {
        I.ep_bwd = I.groups.ep->split(0, I.groups.ep->rank());
        auto make = [&](std::shared_ptr<Communicator> group) -> std::shared_ptr<ExpertExchange<T>> {
            if (I.hierarchical) return std::make_shared<HierarchicalExchange<T>>(group, I.cfg.experts);
            return std::make_shared<DistributedExchange<T>>(group, I.cfg.experts);
        };
        exchange = make(I.groups.ep);
        bwd_exchange = make(I.ep_bwd);
        if (o.exchange_on == "cuda") {
            // Each communicator's exchanges get their own transport: the forward and the backward of an F&B pair
            // run their kernels on two streams.
            int device = o.device_index(world->rank());
            attach_device_transport(static_cast<DistributedExchange<T>&>(*exchange), I.groups.ep, device, o.comm_sms);
            attach_device_transport(static_cast<DistributedExchange<T>&>(*bwd_exchange), I.ep_bwd, device, o.comm_sms);
        }
    }
    // The stages this pipeline rank runs, from the schedule's placement.
    for (int dir = 0; dir < I.schedule.num_directions; ++dir)
        for (int s = 0; s < p.pp; ++s)
            if (I.schedule.rank_of(s, dir) == I.prank && !I.stages.count(s) && !I.emulated_stages.count(s)) {
                if (p.emulate) {
                    I.emulated_stages.insert(s);
                    continue;
                }
                I.stages[s] = std::make_unique<ModelStage<T>>(I.cfg, I.stage_first_layer(s), I.stage_num_layers(s), s == 0,
                                                              s == p.pp - 1, o.seed, exchange, bwd_exchange);
                I.stages[s]->set_recompute(o.recompute);
                attach_device_experts(*I.stages[s], o.device_index(world->rank()));
                I.stages[s]->set_loss_scale(1.0 / (double(o.microbatches) * p.dp));
                // DualPipe holds every stage twice (ranks s and PP-1-s); the down copy (rank s) is the owner.
                I.owner[s] = p.schedule != ScheduleKind::DualPipe || I.schedule.rank_of(s, 0) == I.prank;
            }
    if (p.schedule == ScheduleKind::DualPipe)
        I.pair = world->split(I.grid.dp_index * ranks + std::min(I.prank, ranks - 1 - I.prank), I.prank);
    kernels::AdamWConfig ac;
    ac.lr = o.lr;
    ac.weight_decay = o.weight_decay;
    for (auto& [s, stage] : I.stages) {
        for (bool experts : {false, true}) {
            std::vector<ParamRef<T>> refs;
            std::vector<double> decay;
            for (Param<T>* prm : stage->parameters()) {
                if (prm->is_expert != experts) continue;
                refs.push_back({prm->value.data(), prm->grad.data(), prm->value.size()});
                decay.push_back(prm->shape.size() > 1 ? o.weight_decay : 0.0);
            }
            if (refs.empty()) continue;
            I.optimizers[s].push_back(
                std::make_unique<Zero1AdamW<T>>(experts ? I.groups.edp : I.groups.dp, refs, ac, decay));
        }
    }
    if (p.ema_decay > 0) {
        std::vector<size_t> sizes;
        std::vector<const T*> values;
        for (auto& [s, stage] : I.stages)
            if (I.owner.at(s))
                for (Param<T>* prm : stage->parameters()) {
                    I.ema_params.push_back(prm);
                    sizes.push_back(prm->value.size());
                    values.push_back(prm->value.data());
                }
        I.ema = std::make_unique<CpuEma<T>>(sizes, p.ema_decay);
        I.ema->initialize(values);
    }
}

template <typename T>
PipelineTrainer<T>::~PipelineTrainer() = default;

template <typename T>
int PipelineTrainer<T>::pipeline_ranks() const {
    return impl_->p.schedule == ScheduleKind::DualPipeV ? impl_->p.pp / 2 : impl_->p.pp;
}

template <typename T>
StepMetrics PipelineTrainer<T>::step() {
    if (impl_->p.emulate) return emulate_step();
    Impl& I = *impl_;
    Stopwatch sw;
    ++I.step_;
    StepMetrics m;
    m.step = I.step_;
    for (auto& [s, stage] : I.stages) stage->zero_grad();
    int N = I.o.microbatches, last = I.p.pp - 1;
    std::vector<double> losses(size_t(N) * I.p.dp, 0.0);
    std::vector<std::pair<WorkPtr, std::shared_ptr<std::vector<T>>>> pending;
    std::vector<WorkPtr> unused;

    double compute_us = 0;
    auto compute = [&](const std::string& name, auto&& fn) {
        double t0 = I.tracer.now_us();
        fn();
        double t1 = I.tracer.now_us();
        I.note(I.compute_iv, t0, t1);
        std::lock_guard<std::mutex> lock(I.shared);
        compute_us += t1 - t0;
        I.tracer.add(Lane::Compute, name, t0, t1);
    };
    auto forward = [&](const Chunk& c) {
        ModelStage<T>& st = *I.stages.at(c.stage);
        Batch b = (c.stage == 0 || c.stage == last) ? I.batch_of(c.mb) : Batch{I.o.sequences_per_microbatch,
                                                                                I.cfg.seq_len, {}, {}};
        std::vector<T> in;
        if (c.stage > 0) in = I.receive({c.mb, c.stage - 1, c.dir}, false, unused);
        std::vector<T> out;
        compute(fmt::format("F mb {} stage {}", c.mb, c.stage), [&] { out = st.forward(c.mb, b, in); });
        if (c.stage == last) losses[size_t(I.global_mb(c.mb))] = st.loss(c.mb);
        if (c.stage < last) I.send(c, false, c.stage + 1, std::move(out), pending);
    };
    auto backward = [&](const Chunk& c, bool with_weight) {
        ModelStage<T>& st = *I.stages.at(c.stage);
        std::vector<T> dy;
        if (c.stage < last) dy = I.receive({c.mb, c.stage + 1, c.dir}, true, unused);
        std::vector<T> dx;
        compute(fmt::format("{} mb {} stage {}", with_weight ? "BW" : "B", c.mb, c.stage), [&] {
            dx = st.backward_input(c.mb, dy);
            if (with_weight) st.backward_weight(c.mb);
        });
        if (c.stage > 0) I.send(c, true, c.stage - 1, std::move(dx), pending);
    };
    double schedule_start = I.tracer.now_us();
    for (const Instr& in : I.schedule.ranks[I.prank]) {
        switch (in.op) {
            case Op::F: forward(in.f); break;
            case Op::B: backward(in.b, false); break;
            case Op::BW: backward(in.b, true); break;
            case Op::W:
                compute(fmt::format("W mb {} stage {}", in.b.mb, in.b.stage),
                        [&] { I.stages.at(in.b.stage)->backward_weight(in.b.mb); });
                break;
            case Op::FB:
                if (in.f.stage != in.b.stage) {
                    // Overlap: the two chunks belong to different stages (and microbatches), so the forward runs on
                    // a helper thread while this one runs the backward; whichever waits for its input, a dispatch
                    // or a combine lets the other compute (expert exchanges of the two run on two communicators).
                    std::exception_ptr failed;
                    std::thread helper([&] {
                        try {
                            forward(in.f);
                        } catch (...) {
                            failed = std::current_exception();
                        }
                    });
                    try {
                        backward(in.b, true);
                    } catch (...) {
                        helper.join();
                        throw;
                    }
                    helper.join();
                    if (failed) std::rethrow_exception(failed);
                } else {
                    forward(in.f);
                    backward(in.b, true);
                }
                break;
        }
    }
    {
        auto span = I.tracer.scope(Lane::Comm, "drain sends");
        for (auto& [w, buf] : pending) w->wait();
    }
    double schedule_us = I.tracer.now_us() - schedule_start, slowest_us = 0;
    m.bubble_fraction = I.bubble_share(schedule_us, compute_us, slowest_us);
    I.hidden_shares(m);
    double opt_start = I.tracer.now_us();

    // The two DualPipe copies of a stage: sum their gradients (both ranks hold the same two stages).
    if (I.pair) {
        std::vector<T> flat;
        for (auto& [s, stage] : I.stages)
            for (Param<T>* prm : stage->parameters()) flat.insert(flat.end(), prm->grad.begin(), prm->grad.end());
        I.pair->all_reduce(flat.data(), flat.size(), dtype_of<T>())->wait();
        size_t off = 0;
        for (auto& [s, stage] : I.stages)
            for (Param<T>* prm : stage->parameters()) {
                std::memcpy(prm->grad.data(), flat.data() + off, prm->grad.size() * sizeof(T));
                off += prm->grad.size();
            }
    }
    // ZeRO-1: reduce-scatter over DP, global norm over the owned copies, AdamW, all-gather.
    double sq = 0;
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
        for (Param<T>* prm : I.ema_params) values.push_back(prm->value.data());
        I.ema->submit(values);  // a copy; the update runs in the background during the next step
    }
    I.tracer.add(Lane::Optimizer, "grad sync + ZeRO-1 AdamW", opt_start, I.tracer.now_us());

    // Whole-batch expert counts (every layer, all replicas, one DualPipe copy) drive the bias update.
    int E = I.cfg.experts;
    std::vector<int64_t> counts(size_t(I.cfg.layers) * E, 0);
    for (auto& [s, stage] : I.stages) {
        auto c = stage->take_expert_counts();
        int moe = 0;
        for (int l = stage->first_layer(); l < stage->first_layer() + stage->num_layers(); ++l)
            if (I.cfg.is_moe_layer(l)) {
                for (int e = 0; e < E; ++e) counts[size_t(l) * E + e] += c[moe][e];
                ++moe;
            }
    }
    I.world->all_reduce(counts.data(), counts.size(), DType::I64)->wait();
    // Each DualPipe stage is counted on both copies' ranks for half the microbatches each: the sum is the batch.
    for (auto& [s, stage] : I.stages) {
        std::vector<std::vector<int64_t>> mine;
        for (int l = stage->first_layer(); l < stage->first_layer() + stage->num_layers(); ++l)
            if (I.cfg.is_moe_layer(l)) mine.emplace_back(counts.begin() + long(l) * E, counts.begin() + long(l + 1) * E);
        if (I.o.bias_update) stage->update_router_bias(mine);
    }
    for (int l = 0; l < I.cfg.layers; ++l)
        if (I.cfg.is_moe_layer(l))
            m.max_vio = std::max(m.max_vio, max_violation({counts.begin() + long(l) * E, counts.begin() + long(l + 1) * E}));

    // Losses: each microbatch's loss sits on the rank that ran its last stage; the world sums them.
    I.world->all_reduce(losses.data(), losses.size(), DType::F64)->wait();
    for (double l : losses) m.loss += l / double(losses.size());
    m.step_time_s = sw.seconds();
    m.tokens_per_s = double(losses.size()) * I.o.sequences_per_microbatch * I.cfg.seq_len / std::max(m.step_time_s, 1e-9);
    return m;
}

template <typename T>
std::map<std::string, std::vector<T>> PipelineTrainer<T>::owned_parameters() {
    std::map<std::string, std::vector<T>> out;
    for (auto& [s, stage] : impl_->stages)
        if (impl_->owner.at(s))
            for (Param<T>* prm : stage->parameters()) out[prm->name] = prm->value;
    return out;
}

template <typename T>
std::string PipelineTrainer<T>::dispatch_path() const {
    if (impl_->p.ep == 1) return "local";
    return impl_->hierarchical ? "hierarchical" : "flat";
}

template <typename T>
LinkBytes PipelineTrainer<T>::expert_bytes_sent() const {
    if (impl_->p.emulate) return impl_->emulated_ep_bytes;
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
    for (size_t i = 0; i < impl_->ema_params.size(); ++i) out[impl_->ema_params[i]->name] = shadow[i];
    return out;
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
