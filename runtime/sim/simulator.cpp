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

namespace duplex {

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

// Activation bytes one token leaves alive in one layer between its forward and its backward.
double layer_activation_bytes(const ModelConfig& c, int layer, const SimOptions& o) {
    double b = o.elem_bytes, cached = o.fp8 ? 1.0 : b;  // DeepSeek-V3 caches GEMM inputs in FP8
    double h = c.hidden, H = c.heads, bytes = 0;
    bool rc = o.recompute;
    // Attention: the residual input, (no recompute) its normed copy, the projections flash attention needs,
    // the attention output (input of the out-projection) and the softmax statistics.
    bytes += h * b + (rc ? 0 : h * b);
    if (c.mla()) {
        bytes += (c.q_lora + c.kv_lora + c.rope_dim) * b;
        if (!rc) bytes += H * ((c.head_dim + c.rope_dim) * 2 + c.v_head_dim) * b;
        bytes += H * c.v_head_dim * cached;
    } else {
        bytes += 3 * H * c.head_dim * b + H * c.head_dim * cached;
    }
    bytes += H * 4;
    // FFN.
    bytes += h * b + (rc ? 0 : h * b);
    if (c.is_moe_layer(layer)) {
        double slots = c.top_k, experts_run = c.top_k + c.shared_experts;
        bytes += c.experts * 4.0                         // router affinities (fp32)
                 + slots * h * cached                    // dispatched rows
                 + experts_run * 2 * c.expert_ffn * cached;  // SwiGLU inputs
        if (!rc) bytes += experts_run * c.expert_ffn * b + slots * h * b;  // SwiGLU outputs, expert outputs
    } else {
        bytes += 2 * c.dense_ffn * cached + (rc ? 0 : c.dense_ffn * b);
    }
    return bytes;
}

double dense_params(const ModelConfig& c, int first, int n, bool has_embedding, bool has_head) {
    double p = 0;
    for (int l = first; l < first + n; ++l)
        p += c.attention_params() + (c.is_moe_layer(l) ? c.expert_params() * c.shared_experts + double(c.hidden) * c.experts
                                                       : 3.0 * c.hidden * c.dense_ffn);
    if (has_embedding) p += double(c.vocab) * c.hidden;
    if (has_head) {
        p += double(c.vocab) * c.hidden;
        p += c.mtp_depth * (2.0 * c.hidden * c.hidden + c.attention_params() +
                            c.expert_params() * c.shared_experts + double(c.hidden) * c.experts);
    }
    return p;
}

double expert_params(const ModelConfig& c, int first, int n, bool has_head, int ep) {
    int moe = 0;
    for (int l = first; l < first + n; ++l) moe += c.is_moe_layer(l);
    if (has_head) moe += c.mtp_depth;
    return double(moe) * (double(c.experts) / ep) * c.expert_params();
}

// Ring reduce-scatter or all-gather of `bytes` over n ranks.
double ring_s(const CostModel& cm, double bytes, int n, LinkClass link) {
    if (n <= 1) return 0;
    return (n - 1) * cm.transfer_s(bytes / n, link);
}

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
                     : o.schedule == ScheduleKind::Interleaved ? fmt::format(", interleaved: PP/VPP = {} / {}", o.pp, o.vpp)
                                                               : "");
    r.dp = cl.gpus / r.pipeline_ranks;
    DUPLEX_CHECK_ARG(o.ep >= 1 && o.ep <= r.dp, "--ep", "EP ({}) is larger than the {} GPUs of a pipeline stage", o.ep,
                     r.dp);
    DUPLEX_CHECK_ARG(r.dp % o.ep == 0, "--ep", "EP ({}) must divide the {} GPUs of a stage (DP)", o.ep, r.dp);
    DUPLEX_CHECK_ARG(cfg.experts % o.ep == 0, "--ep", "EP ({}) must divide the {} routed experts", o.ep, cfg.experts);
    const int gpn = cl.device.gpus_per_node;
    DUPLEX_CHECK_ARG(o.ep <= gpn ? gpn % o.ep == 0 : o.ep % gpn == 0, "--ep",
                     "an EP group of {} must fill whole nodes of {} GPUs or divide one", o.ep, gpn);
    DUPLEX_CHECK_ARG(o.mb_sequences >= 1, "--mb-sequences", "must be at least 1, got {}", o.mb_sequences);
    r.edp = r.dp / o.ep;
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

// What the pieces of one simulation share: the checked options, the device, its cost model, the sizes.
struct Run {
    const ModelConfig& cfg;
    const ClusterConfig& cl;
    const SimOptions& o;
    DevicePreset dev;
    CostModel cm;
    int S, T, gpn;
    SimResult& r;
    int first_layer(int s) const { return r.stage_first_layer[size_t(s)]; }
    int num_layers(int s) const { return r.stage_first_layer[size_t(s) + 1] - r.stage_first_layer[size_t(s)]; }
    int node_of(int pipeline_rank) const { return (pipeline_rank * r.dp) / gpn; }  // stage-major rank grid
    double act_bytes() const { return double(T) * cfg.hidden * o.elem_bytes; }
    double dispatch_elem() const { return o.fp8 ? 1.0 + 4.0 / 128 : o.elem_bytes; }  // FP8 rows with their scales
};

DevicePreset device_of(const ClusterConfig& cl, const SimOptions& o) {
    DevicePreset dev = cl.device;
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
    const ExpertPath path = choose_path(o.dispatch == "hierarchical", Topology::virtual_nodes(o.ep, group_nodes));
    int sample = 0;
    GroupTraffic traffic = sampled_group_traffic(cfg, o.ep, x.gpn, path, &sample);
    auto charge = [&](Exchange e, double row_elem) {
        TrafficVolume v = scale_tokens(traffic[size_t(e)], sample, x.T);
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
    r.ep_inter_bytes_per_token = dispatch_inter / x.T;
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
    r.bubble_fraction = idle / sc.num_ranks;
}

// The step end (DualPipe's pair sum of the two copies' gradients, ZeRO-1's reduce-scatter and all-gather) and
// the memory of the busiest pipeline rank.
void step_end_and_memory(const Run& x) {
    const ModelConfig& cfg = x.cfg;
    const SimOptions& o = x.o;
    const CostModel& cm = x.cm;
    SimResult& r = x.r;
    const sched::Schedule& sc = r.schedule;
    const int S = x.S, T = x.T, gpn = x.gpn;
    const double K = cfg.top_k, h = cfg.hidden, e = o.elem_bytes, act_bytes = x.act_bytes();
    double sync = 0;
    std::map<std::string, double> worst_mem;
    double worst_total = -1;
    for (int pr = 0; pr < sc.num_ranks; ++pr) {
        std::vector<int> held;
        for (int dir = 0; dir < sc.num_directions; ++dir)
            for (int s = 0; s < S; ++s)
                if (sc.rank_of(s, dir) == pr) held.push_back(s);  // DualPipe: each stage twice (two copies)
        double pd = 0, pe = 0, act = 0;
        for (int s : held) {
            pd += dense_params(cfg, x.first_layer(s), x.num_layers(s), s == 0, s == S - 1);
            pe += expert_params(cfg, x.first_layer(s), x.num_layers(s), s == S - 1, o.ep);
            double per_token = 0;
            for (int l = x.first_layer(s); l < x.first_layer(s) + x.num_layers(s); ++l) per_token += layer_activation_bytes(cfg, l, o);
            act = std::max(act, per_token * T);
        }
        LinkClass dp_link = r.dp > gpn ? LinkClass::InterNode : LinkClass::IntraNode;
        double t = 0;
        if (!o.free_communication) {
            if (o.schedule == ScheduleKind::DualPipe)  // the two copies' gradients (fp32) summed with the partner rank
                t += cm.transfer_s((pd + pe) * 4 / 2, x.node_of(pr) == x.node_of(S - 1 - pr) ? LinkClass::IntraNode
                                                                                      : LinkClass::InterNode) * 2;
            t += ring_s(cm, pd * 4, r.dp, dp_link) + ring_s(cm, pd * 2, r.dp, dp_link);  // RS fp32 grads, AG bf16
            t += ring_s(cm, pe * 4, r.edp, dp_link) + ring_s(cm, pe * 2, r.edp, dp_link);
        }
        sync = std::max(sync, t);
        std::map<std::string, double> mem;
        mem["parameters"] = 2 * (pd + pe);                         // BF16 working weights
        mem["gradients"] = 4 * (pd + pe);                          // FP32 gradients
        mem["optimizer"] = 8 * (pd / r.dp + pe / r.edp);           // FP32 master + two BF16 moments, sharded
        mem["activations"] = r.replay.peak_activations[pr] * act;  // live chunks at the schedule's peak
        // Expert-exchange buffers for the two chunks of an F&B pair (dispatch in, combine out) and P2P buffers.
        mem["communication_buffers"] = o.ep > 1 ? 2.0 * T * K * h * (x.dispatch_elem() + e) + 4 * act_bytes : 4 * act_bytes;
        double total = 0;
        for (auto& [k, v] : mem) total += v;
        if (total > worst_total) worst_total = total, worst_mem = mem;
    }
    r.memory_per_gpu_bytes = worst_mem;
    r.memory_total_bytes = worst_total;
    r.memory_capacity_bytes = x.dev.memory_bytes;
    r.fits = x.dev.memory_bytes <= 0 || worst_total <= x.dev.memory_bytes;
    r.exposed_comm_s["data_parallel"] = sync;
    r.step_time_s = r.pipeline_s + sync;
}

void throughput(const Run& x) {
    SimResult& r = x.r;
    double flops_token = 0;
    for (int l = 0; l < x.cfg.layers; ++l) flops_token += CostModel::layer_flops(x.cfg, l, 1).total();
    flops_token += CostModel::head_flops(x.cfg, 1).total();
    r.model_flops_per_token = 3 * flops_token;  // forward + input-gradient + weight-gradient; recompute not counted
    double tokens_step = double(r.dp) * r.microbatches * x.T;
    r.tokens_per_s_per_gpu = tokens_step / std::max(r.step_time_s, 1e-30) / x.cl.gpus;
    r.achieved_flops_s = r.tokens_per_s_per_gpu * r.model_flops_per_token;
    r.mfu = r.achieved_flops_s / x.dev.bf16_flops;
    r.gpu_hours_per_trillion_tokens = 1e12 / std::max(r.tokens_per_s_per_gpu, 1e-30) / 3600;
}

}  // namespace

SimResult simulate(const ModelConfig& cfg, const ClusterConfig& cl, const SimOptions& o) {
    cfg.validate();
    SimResult r;
    check_layout(cfg, cl, o, r);
    DevicePreset dev = device_of(cl, o);
    Run x{cfg, cl, o, dev, CostModel(dev), o.pp, int(cfg.tokens_per_microbatch(o.mb_sequences)),
          cl.device.gpus_per_node, r};
    r.schedule = sched::generate(o.schedule, o.pp, r.microbatches, o.vpp);
    r.stage_first_layer = o.partition == "uniform"
                              ? uniform_partition(cfg.layers, x.S)
                              : balanced_partition(x.cm, cfg, r.schedule, x.T, {o.fp8, o.recompute});
    r.stage_costs.resize(size_t(x.S));
    for (int s = 0; s < x.S; ++s)
        r.stage_costs[size_t(s)] =
            x.cm.chunk(cfg, x.first_layer(s), x.num_layers(s), x.T, {o.fp8, o.recompute}, s == x.S - 1);
    expert_costs(x);
    replay_pipeline(x);
    step_end_and_memory(x);
    throughput(x);
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
    if (gpus > 0) cl.gpus = gpus;
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
