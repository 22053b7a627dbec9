#include "runtime/sim/simulator.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <mutex>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "parallel/expert_plan.hpp"
#include "parallel/plan.hpp"
#include "runtime/sim/expert_traffic.hpp"
#include "runtime/sim/sim_run.hpp"

namespace duplex {

using sim_detail::Run;
using sched::Instr;
using sched::Op;
using sched::ScheduleKind;

ClusterConfig ClusterConfig::preset(const std::string& name) {
    ClusterConfig c;
    c.name = name;
    if (name.size() > 5 && name.substr(name.size() - 5) == ".json") {
        std::ifstream in(name);
        if (!in) throw ConfigError("--cluster", fmt::format("cannot read '{}'", name));
        nlohmann::json j;
        try {
            j = nlohmann::json::parse(in);
            std::string device = j.at("device").get<std::string>();
            c.device = CostModel::preset(device).device();
            c.gpus = j.at("gpus").get<int>();
            if (j.contains("gpus_per_node")) c.device.gpus_per_node = j.at("gpus_per_node").get<int>();
        } catch (const ConfigError&) {
            throw;
        } catch (const std::exception& e) {
            throw ConfigError("--cluster", fmt::format("'{}': expected {{\"device\": NAME, \"gpus\": N}}: {}", name, e.what()));
        }
    } else {
        size_t x = name.rfind('x');
        int gpus = 0;
        if (x != std::string::npos && x + 1 < name.size()) {
            try {
                size_t used = 0;
                gpus = std::stoi(name.substr(x + 1), &used);
                if (used != name.size() - x - 1) gpus = 0;
            } catch (const std::exception&) {
                gpus = 0;
            }
        }
        if (gpus <= 0)
            throw ConfigError("--cluster", fmt::format("'{}' is not DEVICExGPUS (e.g. h800x2048) or a .json file", name));
        c.device = CostModel::preset(name.substr(0, x)).device();
        c.gpus = gpus;
    }
    DUPLEX_CHECK_ARG(c.gpus > 0 && c.device.gpus_per_node > 0, "--cluster", "'{}': need positive GPU counts", name);
    return c;
}

namespace {

std::vector<int> uniform_partition(int layers, int stages) {
    std::vector<int> first(stages + 1);
    for (int s = 0; s < stages; ++s) first[s] = layers_of_stage(s, stages, layers).first;
    first[stages] = layers;
    return first;
}

// Contiguous layers per stage (at least one each, as the executor needs), head and MTP modules on the last stage,
// chosen to minimize the pipeline's steady-state tick: for 1F1B and ZB1P the slowest stage's F + B; for DualPipe
// and DualPipeV, whose ranks hold stages s and S-1-s and pair the forward of one with the backward of the
// other, the slowest such pair. A dynamic program gives the best split for the slowest stage; for the paired
// schedules a local search then moves single layers between stages while the slowest pair gets faster.
std::vector<int> balanced_partition(const CostModel& cm, const ModelConfig& cfg, const sched::Schedule& sc, int tokens,
                                    const ChunkOptions& co) {
    int L = cfg.layers, S = sc.pp;
    std::vector<double> pf(L + 1, 0), pb(L + 1, 0);
    for (int l = 0; l < L; ++l) {
        ChunkCosts c = cm.chunk(cfg, l, 1, tokens, co);
        pf[l + 1] = pf[l] + c.f;
        pb[l + 1] = pb[l] + c.b;
    }
    ChunkCosts one = cm.chunk(cfg, L - 1, 1, tokens, co), with = cm.chunk(cfg, L - 1, 1, tokens, co, true);
    double head_f = with.f - one.f, head_b = with.b - one.b;
    auto f_of = [&](const std::vector<int>& first, int s) {
        return pf[first[s + 1]] - pf[first[s]] + (s == S - 1 ? head_f : 0);
    };
    auto b_of = [&](const std::vector<int>& first, int s) {
        return pb[first[s + 1]] - pb[first[s]] + (s == S - 1 ? head_b : 0);
    };
    const double inf = 1e300;
    // best[s][l]: the smallest max stage F + B putting layers [0, l) on stages [0, s).
    std::vector<std::vector<double>> best(S + 1, std::vector<double>(L + 1, inf));
    std::vector<std::vector<int>> cut(S + 1, std::vector<int>(L + 1, 0));
    best[0][0] = 0;
    for (int s = 1; s <= S; ++s)
        for (int l = s; l <= L - (S - s); ++l)
            for (int k = s - 1; k < l; ++k) {
                double cost = pf[l] - pf[k] + pb[l] - pb[k] + (s == S ? head_f + head_b : 0);
                double v = std::max(best[s - 1][k], cost);
                if (v < best[s][l]) best[s][l] = v, cut[s][l] = k;
            }
    std::vector<int> first(S + 1);
    first[S] = L;
    for (int s = S, l = L; s > 0; --s) {
        l = cut[s][l];
        first[s - 1] = l;
    }
    if (sc.num_directions == 1 && sc.kind != ScheduleKind::DualPipeV) return first;
    // The paired schedules: every (slowest, second slowest) pair tick, compared lexicographically.
    auto ticks = [&](const std::vector<int>& p) {
        std::vector<double> t;
        for (int s = 0; s < S; ++s) t.push_back(f_of(p, s) + b_of(p, S - 1 - s));
        std::sort(t.rbegin(), t.rend());
        return t;
    };
    auto score = ticks(first);
    for (bool better = true; better;) {
        better = false;
        for (int a = 0; a < S; ++a)
            for (int b = 0; b < S; ++b) {
                if (a == b || first[a + 1] - first[a] < 2) continue;
                std::vector<int> t = first;  // one layer from stage a to stage b; the stages between shift
                if (a < b)
                    for (int k = a + 1; k <= b; ++k) --t[k];
                else
                    for (int k = b + 1; k <= a; ++k) ++t[k];
                auto candidate = ticks(t);
                if (candidate < score) first = t, score = candidate, better = true;
            }
    }
    return first;
}

}  // namespace

namespace {

// The layout's sizes (DP, expert-DP, microbatches, pipeline ranks), or a ConfigError naming what cannot run.
void check_layout(const ModelConfig& cfg, const ClusterConfig& cl, const SimOptions& o, SimResult& r) {
    DUPLEX_CHECK_ARG(o.seq_len >= 0, "--seq-len", "must be positive (0: the model's), got {}", o.seq_len);
    r.gpus = cl.gpus;
    r.pp = o.pp;
    r.ep = o.ep;
    DUPLEX_CHECK_ARG(o.pp >= 1, "--pp", "must be at least 1, got {}", o.pp);
    DUPLEX_CHECK_ARG(o.schedule != ScheduleKind::DualPipeV || o.pp % 2 == 0, "--pp", "DualPipeV needs an even PP, got {}",
                     o.pp);
    sched::check_vpp(o.schedule, o.pp, o.vpp);
    r.pipeline_ranks = pipeline_ranks(o.schedule, o.pp, o.vpp);
    DUPLEX_CHECK_ARG(cl.gpus % r.pipeline_ranks == 0, "--pp",
                     "{} GPUs are not divisible into pipelines of {} ranks (PP {}{})", cl.gpus, r.pipeline_ranks, o.pp,
                     o.schedule == ScheduleKind::DualPipeV     ? ", DualPipeV: PP/2 ranks"
                     : sched::is_interleaved(o.schedule) ? fmt::format(", interleaved: PP/VPP = {} / {}", o.pp, o.vpp)
                                                               : "");
    const int stage_gpus = cl.gpus / r.pipeline_ranks;
    const Shards sh{o.tp, o.cp, o.etp};
    check_shards(cfg, cl.device, sh);
    DUPLEX_CHECK_ARG(stage_gpus % sh.per_stage() == 0, "--tp/--cp",
                     "TP x CP = {} x {} does not divide the {} GPUs of a pipeline rank", o.tp, o.cp, stage_gpus);
    r.dp = stage_gpus / sh.per_stage();
    r.tp = o.tp, r.cp = o.cp, r.etp = o.etp, r.seq_len = cfg.seq_len;
    const int ep_gpus = o.ep * o.etp;
    DUPLEX_CHECK_ARG(o.ep >= 1 && ep_gpus <= stage_gpus, "--ep",
                     "EP x ETP ({} x {}) is larger than the {} GPUs of a pipeline rank", o.ep, o.etp, stage_gpus);
    DUPLEX_CHECK_ARG(stage_gpus % ep_gpus == 0, "--ep", "EP x ETP ({} x {}) must divide the {} GPUs of a stage", o.ep,
                     o.etp, stage_gpus);
    DUPLEX_CHECK_ARG(o.ep == 1 || !cfg.dense(), "--ep", "the {} model is dense: no experts to spread (EP {})", cfg.name,
                     o.ep);
    DUPLEX_CHECK_ARG(cfg.dense() || cfg.experts % o.ep == 0, "--ep", "EP ({}) must divide the {} routed experts", o.ep,
                     cfg.experts);
    const int gpn = cl.device.gpus_per_node;
    DUPLEX_CHECK_ARG(o.ep <= gpn ? gpn % o.ep == 0 : o.ep % gpn == 0, "--ep",
                     "an EP group of {} must fill whole nodes of {} GPUs or divide one", o.ep, gpn);
    DUPLEX_CHECK_ARG(o.mb_sequences >= 1, "--mb-sequences", "must be at least 1, got {}", o.mb_sequences);
    r.edp = stage_gpus / ep_gpus;
    r.microbatches = o.microbatches;
    if (r.microbatches <= 0) {
        DUPLEX_CHECK_ARG(o.global_batch % (r.dp * o.mb_sequences) == 0, "--global-batch",
                         "{} sequences do not split into DP {} x microbatches of {} sequences", o.global_batch, r.dp,
                         o.mb_sequences);
        r.microbatches = o.global_batch / (r.dp * o.mb_sequences);
    }
    sched::check_arguments(o.schedule, o.pp, r.microbatches, o.vpp);
    DUPLEX_CHECK_ARG(cfg.layers >= o.pp, "--pp", "the {} model has {} layers, fewer than {} stages", cfg.name, cfg.layers,
                     o.pp);
    DUPLEX_CHECK_ARG(o.dispatch == "hierarchical" || o.dispatch == "flat", "--dispatch",
                     "'{}' is not a dispatch path (hierarchical, flat)", o.dispatch);
    DUPLEX_CHECK_ARG(o.partition == "balanced" || o.partition == "uniform", "--partition",
                     "'{}' is not a layer partition (balanced, uniform)", o.partition);
}

// The cluster's device with the SMs this layout reserves for the expert exchange (none without EP).
DevicePreset device_of(const ClusterConfig& cl, const SimOptions& o) {
    DevicePreset dev = CostModel(cl.device).for_expert_parallel(o.ep).device();
    if (o.comm_sms >= 0) {
        DUPLEX_CHECK_ARG(o.comm_sms < dev.sms, "--comm-sms", "{} of {} SMs leaves none for compute", o.comm_sms, dev.sms);
        dev.comm_sms = o.comm_sms;
    }
    return dev;
}

// Per stage: the expert exchanges of a forward and of a backward chunk. Each exchange moves the group's mean
// traffic of a sampled routing (runtime/sim/expert_traffic.hpp); the node-limited path's two hops take the sum
// of the links' times, or the larger with pipelined hops (a relay forwards inside its node while later rows
// still cross, as DeepEP does); the flat path's links run side by side.
void expert_costs(const Run& x) {
    const ModelConfig& cfg = x.cfg;
    const SimOptions& o = x.o;
    SimResult& r = x.r;
    r.stage_ep_forward_s.assign(size_t(x.S), 0);
    r.stage_ep_backward_s.assign(size_t(x.S), 0);
    if (o.ep <= 1 || o.free_communication) return;
    const int node_size = std::min(x.gpn, o.ep), group_nodes = std::max(1, o.ep / x.gpn);
    const int tokens = x.Tg * x.sh.etp;  // a GPU's tokens, gathered over its expert-TP group
    const ExpertPath path = choose_path(o.dispatch == "hierarchical", Topology::virtual_nodes(o.ep, group_nodes));
    int sample = 0;
    GroupTraffic traffic = sampled_group_traffic(cfg, o.ep, x.gpn, path, &sample);
    auto charge = [&](Exchange e, double row_elem) {
        TrafficVolume v = scale_tokens(traffic[size_t(e)], sample, tokens);
        TrafficBytes b = v.bytes(double(cfg.hidden) * row_elem, o.elem_bytes);
        double inter = group_nodes > 1 ? x.cm.ep_transfer_s(b.inter, LinkClass::InterNode) : 0;
        double intra = node_size > 1 ? x.cm.ep_transfer_s(b.intra, LinkClass::IntraNode) : 0;
        bool serial = path == ExpertPath::NodeLimited && !o.pipelined_hops;  // the CPU executor's two hops
        return std::make_pair(serial ? inter + intra : std::max(inter, intra), b.inter);
    };
    auto [dispatch_s, dispatch_inter] = charge(Exchange::Dispatch, x.dispatch_elem());
    double forward_s = dispatch_s + charge(Exchange::Combine, o.elem_bytes).first;
    double backward_s = charge(Exchange::CombineBackward, o.elem_bytes).first +
                        charge(Exchange::DispatchBackward, o.elem_bytes).first;
    r.ep_inter_bytes_per_token = dispatch_inter / tokens;
    if (group_nodes > 1) {  // the other nodes a token reaches: the node-limited path's inter-node rows
        GroupTraffic limited = sampled_group_traffic(cfg, o.ep, x.gpn, ExpertPath::NodeLimited, &sample);
        r.ep_remote_nodes_per_token = limited[size_t(Exchange::Dispatch)].rows[1] / sample;
    }
    for (int s = 0; s < x.S; ++s) {
        int moe = 0;
        for (int l = x.first_layer(s); l < x.first_layer(s) + x.num_layers(s); ++l) moe += cfg.is_moe_layer(l);
        r.stage_ep_forward_s[size_t(s)] = moe * forward_s;
        r.stage_ep_backward_s[size_t(s)] = moe * backward_s;
    }
}

// The schedule replayed with the stage costs and the links' transfer times; the exposed P2P and expert
// communication and the bubble.
void replay_pipeline(const Run& x) {
    SimResult& r = x.r;
    const sched::Schedule& sc = r.schedule;
    r.p2p_s = x.o.free_communication ? 0 : x.cm.transfer_s(x.act_bytes(), LinkClass::InterNode);
    auto compute_of = [&](const Instr& in) {
        switch (in.op) {
            case Op::F: return r.stage_costs[in.f.stage].f;
            case Op::B: return r.stage_costs[in.b.stage].b - r.stage_costs[in.b.stage].w;
            case Op::W: return r.stage_costs[in.b.stage].w;
            case Op::BW: return r.stage_costs[in.b.stage].b;
            case Op::FB: return r.stage_costs[in.f.stage].f + r.stage_costs[in.b.stage].b;
        }
        return 0.0;
    };
    auto comm_of = [&](const Instr& in) {
        switch (in.op) {
            case Op::F: return r.stage_ep_forward_s[in.f.stage];
            case Op::B:
            case Op::BW: return r.stage_ep_backward_s[in.b.stage];
            case Op::W: return 0.0;
            case Op::FB: return r.stage_ep_forward_s[in.f.stage] + r.stage_ep_backward_s[in.b.stage];
        }
        return 0.0;
    };
    sched::Timing timing;
    timing.duration = [&](int, const Instr& in) {
        return in.op == Op::FB ? std::max(compute_of(in), comm_of(in)) : compute_of(in) + comm_of(in);
    };
    timing.transfer = [&](int from, int to) {
        if (x.o.free_communication) return 0.0;
        return x.cm.transfer_s(x.act_bytes(), x.node_of(from) == x.node_of(to) ? LinkClass::IntraNode : LinkClass::InterNode);
    };
    r.replay = sched::replay(sc, timing);
    r.pipeline_s = r.replay.makespan;
    {
        sched::Timing free_links = timing;
        free_links.transfer = nullptr;
        r.exposed_comm_s["pipeline"] = std::max(0.0, r.pipeline_s - sched::replay(sc, free_links).makespan);
    }
    double ep_exposed = 0, idle = 0;
    for (int pr = 0; pr < sc.num_ranks; ++pr) {
        double mine = 0;
        for (const Instr& in : sc.ranks[pr])
            mine += in.op == Op::FB ? std::max(0.0, comm_of(in) - compute_of(in)) : comm_of(in);
        ep_exposed = std::max(ep_exposed, mine);
        idle += r.replay.idle[pr] / std::max(r.pipeline_s, 1e-30);
    }
    r.exposed_comm_s["expert"] = ep_exposed;
    // TP and CP: what their collectives leave exposed inside the chunks (stage_shard_comm), on the busiest rank.
    double tp_exposed = 0, cp_exposed = 0;
    for (int pr = 0; pr < sc.num_ranks; ++pr) {
        double tp = 0, cp = 0;
        for (const Instr& in : sc.ranks[pr]) {
            bool f = in.op == Op::F || in.op == Op::FB, b = in.op == Op::B || in.op == Op::BW || in.op == Op::FB;
            if (f) tp += r.stage_shard_comm[in.f.stage].tp_f, cp += r.stage_shard_comm[in.f.stage].cp_f;
            if (b) tp += r.stage_shard_comm[in.b.stage].tp_b, cp += r.stage_shard_comm[in.b.stage].cp_b;
        }
        tp_exposed = std::max(tp_exposed, tp), cp_exposed = std::max(cp_exposed, cp);
    }
    r.exposed_comm_s["tensor"] = tp_exposed;
    r.exposed_comm_s["context"] = cp_exposed;
    r.bubble_fraction = idle / sc.num_ranks;
}

}  // namespace

SimResult simulate(const ModelConfig& model, const ClusterConfig& cl, const SimOptions& o) {
    ModelConfig cfg = model;
    if (o.seq_len > 0) cfg.seq_len = o.seq_len;
    cfg.validate();
    SimResult r;
    check_layout(cfg, cl, o, r);
    DevicePreset dev = device_of(cl, o);
    const Shards sh{o.tp, o.cp, o.etp};
    const int T = int(cfg.tokens_per_microbatch(o.mb_sequences));
    Run x{cfg, cl, o, dev, CostModel(dev), o.pp, T, T / sh.per_stage(), cl.device.gpus_per_node, sh, r};
    r.schedule = sched::generate(o.schedule, o.pp, r.microbatches, o.vpp);
    const ChunkOptions co{o.fp8, o.recompute};
    r.stage_first_layer = o.partition == "uniform" ? uniform_partition(cfg.layers, x.S)
                                                   : balanced_partition(x.cm, cfg, r.schedule, x.Tg, co);
    r.stage_costs.resize(size_t(x.S));
    r.stage_shard_comm.resize(size_t(x.S));
    // CP peers are TP ranks apart: on other nodes once TP x CP outgrows one.
    const LinkClass cp_link = sh.per_stage() > x.gpn ? LinkClass::InterNode : LinkClass::IntraNode;
    for (int s = 0; s < x.S; ++s) {
        ChunkCosts c = x.cm.chunk(cfg, x.first_layer(s), x.num_layers(s), x.Tg, co, s == x.S - 1);
        ChunkComm comm = o.free_communication ? ChunkComm{}
                                              : shard_comm(x.cm, cfg, x.first_layer(s), x.num_layers(s), T, sh,
                                                           o.elem_bytes, o.fp8, cp_link);
        c.f += comm.f();
        c.b += comm.b();
        c.fb = c.f + c.b;
        r.stage_costs[size_t(s)] = c;
        r.stage_shard_comm[size_t(s)] = comm;
    }
    expert_costs(x);
    replay_pipeline(x);
    sim_detail::step_end_and_memory(x);
    sim_detail::throughput(x);
    return r;
}

std::string sim_trace_json(const SimResult& r) {
    nlohmann::json events = nlohmann::json::array();
    const auto& sc = r.schedule;
    for (int pr = 0; pr < sc.num_ranks; ++pr) {
        events.push_back({{"ph", "M"}, {"name", "process_name"}, {"pid", pr}, {"args", {{"name", fmt::format("pipeline rank {}", pr)}}}});
        for (size_t i = 0; i < sc.ranks[pr].size(); ++i) {
            const Instr& in = sc.ranks[pr][i];
            const auto& span = r.replay.spans[pr][i];
            std::string name = in.op == Op::FB ? fmt::format("FB mb {}/{}", in.f.mb, in.b.mb)
                                               : fmt::format("{} mb {} stage {}", sched::op_name(in.op),
                                                             in.op == Op::F ? in.f.mb : in.b.mb,
                                                             in.op == Op::F ? in.f.stage : in.b.stage);
            events.push_back({{"ph", "X"}, {"name", name}, {"pid", pr}, {"tid", 0}, {"ts", span.start * 1e6},
                              {"dur", (span.end - span.start) * 1e6}});
        }
    }
    return nlohmann::json{{"traceEvents", events}, {"displayTimeUnit", "ms"}}.dump();
}

ClusterConfig make_cluster(const std::string& preset, const std::string& device, int gpus, int gpus_per_node,
                           double time_scale) {
    ClusterConfig cl = ClusterConfig::preset(preset);
    if (!device.empty()) {
        int gpn = cl.device.gpus_per_node;
        cl.device = CostModel::preset(device).device();
        cl.device.gpus_per_node = gpn;
    }
    if (gpus > 0 && gpus != cl.gpus) cl.gpus = gpus, cl.name = fmt::format("{}x{}", cl.device.name, gpus);
    if (gpus_per_node > 0) cl.device.gpus_per_node = gpus_per_node;
    DUPLEX_CHECK_ARG(time_scale > 0, "--time-scale", "must be positive, got {}", time_scale);
    cl.device.time_scale = time_scale;
    return cl;
}

std::string simulation_json(const SimResult& r, const ModelConfig& m, const ClusterConfig& cl, const std::string& kind,
                            bool with_timing) {
    nlohmann::json j = {{"model", m.name},
                        {"cluster", cl.name},
                        {"gpus", r.gpus},
                        {"schedule", kind},
                        {"pp", r.pp},
                        {"vpp", r.schedule.vpp},
                        {"pipeline_ranks", r.pipeline_ranks},
                        {"tp", r.tp},
                        {"cp", r.cp},
                        {"etp", r.etp},
                        {"seq_len", r.seq_len},
                        {"dp", r.dp},
                        {"ep", r.ep},
                        {"edp", r.edp},
                        {"microbatches", r.microbatches},
                        {"fits", r.fits},
                        {"memory_per_gpu_bytes", r.memory_per_gpu_bytes},
                        {"memory_total_bytes", r.memory_total_bytes},
                        {"memory_capacity_bytes", r.memory_capacity_bytes}};
    if (!with_timing) return j.dump(1);
    j.update({{"step_time_s", r.step_time_s},
              {"grad_sync_s", r.grad_sync_s},
              {"pipeline_s", r.pipeline_s},
              {"bubble_fraction", r.bubble_fraction},
              {"mfu", r.mfu},
              {"achieved_tflops_per_gpu", r.achieved_flops_s / 1e12},
              {"tokens_per_s_per_gpu", r.tokens_per_s_per_gpu},
              {"gpu_hours_per_trillion_tokens", r.gpu_hours_per_trillion_tokens},
              {"model_flops_per_token", r.model_flops_per_token},
              {"exposed_comm_s", r.exposed_comm_s},
              {"ep_remote_nodes_per_token", r.ep_remote_nodes_per_token},
              {"ep_inter_node_bytes_per_token", r.ep_inter_bytes_per_token}});
    nlohmann::json stages = nlohmann::json::array();
    for (size_t s = 0; s < r.stage_costs.size(); ++s)
        stages.push_back({{"f_s", r.stage_costs[s].f},
                          {"b_s", r.stage_costs[s].b},
                          {"w_s", r.stage_costs[s].w},
                          {"ep_forward_s", r.stage_ep_forward_s[s]},
                          {"ep_backward_s", r.stage_ep_backward_s[s]}});
    j["stages"] = stages;
    return j.dump(1);
}

}  // namespace duplex
