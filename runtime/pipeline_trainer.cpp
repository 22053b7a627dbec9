#include "runtime/pipeline_trainer.hpp"

#include <cmath>
#include <cstring>
#include <set>
#include <mutex>
#include <thread>

#include <fmt/format.h>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "memory/ema.hpp"
#include "runtime/model/router.hpp"

namespace duplex {

using sched::Chunk;
using sched::Instr;
using sched::Op;
using sched::ScheduleKind;

namespace {
template <typename T>
DType dtype_of() {
    return sizeof(T) == 4 ? DType::F32 : DType::F64;
}
}  // namespace

template <typename T>
struct PipelineTrainer<T>::Impl {
    PipelineOptions p;
    TrainOptions o;
    ModelConfig cfg;
    std::shared_ptr<Communicator> world, pipe, pair;
    GroupComms groups;
    RankGrid grid;
    sched::Schedule schedule;
    int prank = 0;  // rank inside the pipeline
    SyntheticTask task;
    std::map<int, std::unique_ptr<ModelStage<T>>> stages;          // by model stage id
    // By model stage id: ZeRO-1 for the dense parameters over DP and for the routed experts over expert-DP.
    std::map<int, std::vector<std::unique_ptr<Zero1AdamW<T>>>> optimizers;
    std::map<int, bool> owner;                                     // stage id -> this copy counts for norms
    std::set<int> emulated_stages;                                 // emulate mode: the stages placed here
    std::mutex shared;  // the two halves of an overlapped F&B pair share the handoff maps and the send list
    std::map<std::pair<int, int>, std::vector<T>> local_act, local_grad;  // same-rank handoffs (DualPipeV)
    int step_ = 0;
    Tracer tracer;
    std::unique_ptr<CpuEma<T>> ema;
    std::vector<Param<T>*> ema_params;  // owned parameters, in EMA order

    Impl(std::shared_ptr<Communicator> w, const PipelineOptions& po, const TrainOptions& to)
        : p(po), o(to), cfg(ModelConfig::preset(to.model)), world(std::move(w)), task(cfg.vocab, cfg.seq_len, to.seed),
          tracer(world->rank(), po.trace) {}

    int stage_first_layer(int s) const { return s * cfg.layers / p.pp; }
    int stage_num_layers(int s) const { return stage_first_layer(s + 1) - stage_first_layer(s); }
    int global_mb(int mb) const { return grid.dp_index * o.microbatches + mb; }

    Batch batch_of(int mb) const {
        uint64_t batch_seed = (o.seed * 1000003ull + uint64_t(step_)) * 1009ull + uint64_t(global_mb(mb));
        return task.batch(o.sequences_per_microbatch, batch_seed, o.token_skew);
    }
    size_t act_size() const { return size_t(o.sequences_per_microbatch) * cfg.seq_len * cfg.hidden; }

    // The schedule's idle share: 1 - compute / (the slowest rank's schedule time), averaged over the world.
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

    std::vector<T> receive(const Chunk& producer, bool gradient, std::vector<WorkPtr>&) {
        int from = schedule.rank_of(producer.stage, producer.dir);
        auto key = std::make_pair(producer.mb, producer.stage);
        if (from == prank) {
            std::lock_guard<std::mutex> lock(shared);
            auto& store = gradient ? local_grad : local_act;
            auto it = store.find(key);
            if (it == store.end())
                throw Error(fmt::format("rank {}: local {} of mb {} stage {} missing", prank,
                                        gradient ? "gradient" : "activation", producer.mb, producer.stage));
            std::vector<T> v = std::move(it->second);
            store.erase(it);
            return v;
        }
        std::vector<T> buf(act_size());
        auto span = tracer.scope(Lane::Comm, fmt::format("recv {} mb {} from stage {}", gradient ? "grad" : "act",
                                                         producer.mb, producer.stage));
        pipe->irecv(buf.data(), buf.size() * sizeof(T), from, sched::p2p_tag(schedule, producer, gradient))->wait();
        return buf;
    }

    void send(const Chunk& producer, bool gradient, int to_stage, std::vector<T>&& data,
              std::vector<std::pair<WorkPtr, std::shared_ptr<std::vector<T>>>>& pending) {
        int to = schedule.rank_of(to_stage, producer.dir);
        std::lock_guard<std::mutex> lock(shared);
        if (to == prank) {
            (gradient ? local_grad : local_act)[{producer.mb, producer.stage}] = std::move(data);
            return;
        }
        auto buf = std::make_shared<std::vector<T>>(std::move(data));
        auto w = pipe->isend(buf->data(), buf->size() * sizeof(T), to, sched::p2p_tag(schedule, producer, gradient));
        pending.push_back({w, buf});
    }
};

template <typename T>
void PipelineTrainer<T>::validate(const PipelineOptions& p, const TrainOptions& o, int world_size) {
    o.validate();
    ModelConfig cfg = ModelConfig::preset(o.model);
    sched::check_arguments(p.schedule, p.pp, o.microbatches);
    int ranks = p.schedule == ScheduleKind::DualPipeV ? p.pp / 2 : p.pp;
    GridConfig g{ranks, p.dp, p.ep};
    RankGrid::validate(g, world_size, cfg.experts);
    DUPLEX_CHECK_ARG(p.dispatch == "hierarchical" || p.dispatch == "flat", "--dispatch",
                     "'{}' is not a dispatch path (hierarchical, flat)", p.dispatch);
    if (!p.emulate)
        DUPLEX_CHECK_ARG(cfg.layers >= p.pp, "--pp", "the {} model has {} layers, fewer than {} pipeline stages",
                         cfg.name, cfg.layers, p.pp);
    DUPLEX_CHECK_ARG(!p.emulate || p.ep == 1, "--ep", "emulate mode does not model expert traffic yet (got EP {})", p.ep);
}

template <typename T>
PipelineTrainer<T>::PipelineTrainer(std::shared_ptr<Communicator> world, const PipelineOptions& p, const TrainOptions& o)
    : impl_(std::make_unique<Impl>(world, p, o)) {
    validate(p, o, world->size());
    Impl& I = *impl_;
    kernels::blas_single_threaded();
    if (o.bias_update_speed >= 0) I.cfg.bias_update_speed = o.bias_update_speed;
    I.cfg.balance_alpha = o.balance_alpha;
    int ranks = pipeline_ranks();
    I.grid = RankGrid::make({ranks, p.dp, p.ep}, world->size(), I.cfg.experts, world->rank());
    I.groups = make_groups(*world, I.grid);
    I.pipe = I.groups.pp;
    I.prank = I.pipe->rank();
    I.schedule = sched::generate(p.schedule, p.pp, o.microbatches);
    std::shared_ptr<ExpertExchange<T>> exchange;
    if (p.ep > 1) {
        if (p.dispatch == "hierarchical" && I.groups.ep->topology().num_nodes() > 1)
            exchange = std::make_shared<HierarchicalExchange<T>>(I.groups.ep, I.cfg.experts);
        else
            exchange = std::make_shared<DistributedExchange<T>>(I.groups.ep, I.cfg.experts);
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
                                                              s == p.pp - 1, o.seed, exchange);
                I.stages[s]->set_recompute(o.recompute);
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
                if (I.p.ep == 1 && in.f.stage != in.b.stage) {
                    // Overlap: the two chunks belong to different stages (and microbatches), so the forward runs on
                    // a helper thread while this one runs the backward; whichever waits for its input lets the
                    // other compute. NOTE: with EP > 1 both would use the EP communicator at once, so they
                    // run one after the other there.
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

// Emulate mode: the schedule with timed waits for compute and link-delayed transfers of real sizes. The first
// 8 bytes of every message carry its send time (the steady clock is shared by threads and by processes on
// one host); the receiver holds the message until send time + latency + bytes / bandwidth.
template <typename T>
StepMetrics PipelineTrainer<T>::emulate_step() {
    Impl& I = *impl_;
    Stopwatch sw;
    ++I.step_;
    StepMetrics m;
    m.step = I.step_;
    int last = I.p.pp - 1;
    const size_t bytes = std::max<size_t>(I.act_size() * sizeof(T), sizeof(double));
    std::map<int, ChunkCosts> costs;
    for (int s : I.emulated_stages)
        costs[s] = I.p.emulate_costs.f > 0 ? I.p.emulate_costs
                                           : I.p.cost_model.chunk(I.cfg, I.stage_num_layers(s),
                                                                  I.o.sequences_per_microbatch * I.cfg.seq_len);
    double compute_us = 0;
    auto wait_for = [&](double seconds, const std::string& name) {
        double t0 = I.tracer.now_us();
        Clock::time_point until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                     std::chrono::duration<double>(seconds));
        std::this_thread::sleep_until(until);
        double t1 = I.tracer.now_us();
        compute_us += t1 - t0;
        I.tracer.add(Lane::Compute, name, t0, t1);
    };
    std::vector<std::pair<WorkPtr, std::shared_ptr<std::vector<char>>>> pending;
    auto recv = [&](const Chunk& producer, bool gradient) {
        int from = I.schedule.rank_of(producer.stage, producer.dir);
        if (from == I.prank) return;
        std::vector<char> buf(bytes);
        double t0 = I.tracer.now_us();
        I.pipe->irecv(buf.data(), bytes, from, sched::p2p_tag(I.schedule, producer, gradient))->wait();
        double sent;
        std::memcpy(&sent, buf.data(), sizeof(double));
        LinkClass link = I.pipe->topology().link(from, I.prank);
        double ready = sent + I.p.cost_model.transfer_s(double(bytes), link);
        std::this_thread::sleep_until(Clock::time_point(std::chrono::duration_cast<Clock::duration>(
            std::chrono::duration<double>(ready))));
        I.tracer.add(Lane::Comm, fmt::format("recv {} mb {}", gradient ? "grad" : "act", producer.mb), t0,
                     I.tracer.now_us());
    };
    auto send = [&](const Chunk& producer, bool gradient, int to_stage) {
        int to = I.schedule.rank_of(to_stage, producer.dir);
        if (to == I.prank) return;
        auto buf = std::make_shared<std::vector<char>>(bytes, 0);
        double now = std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
        std::memcpy(buf->data(), &now, sizeof(double));
        pending.push_back({I.pipe->isend(buf->data(), bytes, to, sched::p2p_tag(I.schedule, producer, gradient)), buf});
    };
    double start = I.tracer.now_us();
    for (const Instr& in : I.schedule.ranks[I.prank]) {
        switch (in.op) {
            case Op::F:
                if (in.f.stage > 0) recv({in.f.mb, in.f.stage - 1, in.f.dir}, false);
                wait_for(costs.at(in.f.stage).f, fmt::format("F mb {} stage {}", in.f.mb, in.f.stage));
                if (in.f.stage < last) send(in.f, false, in.f.stage + 1);
                break;
            case Op::B:
            case Op::BW: {
                if (in.b.stage < last) recv({in.b.mb, in.b.stage + 1, in.b.dir}, true);
                const ChunkCosts& c = costs.at(in.b.stage);
                wait_for(in.op == Op::BW ? c.b : c.b - c.w,
                         fmt::format("{} mb {} stage {}", in.op == Op::BW ? "BW" : "B", in.b.mb, in.b.stage));
                if (in.b.stage > 0) send(in.b, true, in.b.stage - 1);
                break;
            }
            case Op::W:
                wait_for(costs.at(in.b.stage).w, fmt::format("W mb {} stage {}", in.b.mb, in.b.stage));
                break;
            case Op::FB:
                if (in.f.stage > 0) recv({in.f.mb, in.f.stage - 1, in.f.dir}, false);
                if (in.b.stage < last) recv({in.b.mb, in.b.stage + 1, in.b.dir}, true);
                wait_for(costs.at(in.f.stage).fb, fmt::format("FB mb {}/{}", in.f.mb, in.b.mb));
                if (in.f.stage < last) send(in.f, false, in.f.stage + 1);
                if (in.b.stage > 0) send(in.b, true, in.b.stage - 1);
                break;
        }
    }
    for (auto& [w, buf] : pending) w->wait();
    double schedule_us = I.tracer.now_us() - start;
    // The step ends when the slowest rank ends: its time and the mean idle share, over the world.
    double slowest = 0;
    m.bubble_fraction = I.bubble_share(schedule_us, compute_us, slowest);
    m.step_time_s = slowest * 1e-6;
    m.tokens_per_s = double(I.o.microbatches) * I.p.dp * I.o.sequences_per_microbatch * I.cfg.seq_len /
                     std::max(m.step_time_s, 1e-9);
    (void)sw;
    return m;
}

template <typename T>
LinkBytes PipelineTrainer<T>::expert_bytes_sent() const {
    return impl_->groups.ep ? impl_->groups.ep->bytes_sent() : LinkBytes{};
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
