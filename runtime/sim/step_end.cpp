// The step end and the memory model of the simulator (runtime/sim/sim_run.hpp).
//
// Gradient synchronization, per stage a rank holds: DualPipe's pair sum with the partner rank (fp32), ZeRO-1's
// ring reduce-scatter of fp32 gradients and all-gather of BF16 weights over the dense parameters' data-parallel
// group (DP x CP ranks) and the experts' (expert-DP). With overlap (the default, as Megatron's overlapped gradient
// reduction and DeepSeek-V3's run) a stage's synchronization starts when its last weight gradient is done, the
// stages of a rank one after the other on its links; the step ends when the last rank's last synchronization does
// (or the pipeline, whichever is later). Serialized: each rank's synchronizations after its own last instruction
// (its data-parallel peers run the same list; no other rank takes part).
//
// Memory per GPU: BF16 weights and FP32 gradients of the rank's stages (dense ones / TP, experts / (EP x ETP)),
// FP32 master weights and two BF16 moments sharded over the data-parallel groups, the activations of the chunks
// alive at the schedule's peak (each a microbatch's tokens on this GPU, / (TP x CP) with sequence parallelism),
// and the exchange and P2P buffers.
#include <algorithm>
#include <map>

#include "runtime/sim/grad_sync.hpp"
#include "runtime/sim/sim_run.hpp"

namespace duplex::sim_detail {

using sched::Instr;
using sched::Op;
using sched::ScheduleKind;

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
        bytes += (H + 2.0 * c.kv_head_count()) * c.head_dim * b + H * c.head_dim * cached;  // Q, K, V; the output
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

// When each stage a rank holds computes its last weight gradient (the end of the instruction that does).
std::map<int, double> last_weight_gradient(const sched::Schedule& sc, const sched::Replay& rp, int rank) {
    std::map<int, double> done;
    for (size_t i = 0; i < sc.ranks[rank].size(); ++i) {
        const Instr& in = sc.ranks[rank][i];
        if (in.op == Op::W || in.op == Op::BW || in.op == Op::FB) done[in.b.stage] = rp.spans[rank][i].end;
    }
    return done;
}

}  // namespace

void step_end_and_memory(const Run& x) {
    const ModelConfig& cfg = x.cfg;
    const SimOptions& o = x.o;
    const CostModel& cm = x.cm;
    SimResult& r = x.r;
    const sched::Schedule& sc = r.schedule;
    const int S = x.S, Tg = x.Tg;
    const double K = cfg.top_k, h = cfg.hidden, e = o.elem_bytes, act_bytes = x.act_bytes();
    const double etp = x.sh.etp;
    const int dense_dp = r.dp * x.sh.cp;  // CP ranks hold the same weights
    const LinkClass dp_link = x.stage_gpus() > x.gpn ? LinkClass::InterNode : LinkClass::IntraNode;
    double step_end = r.pipeline_s, serial = 0;
    std::map<std::string, double> worst_mem;
    double worst_total = -1;
    for (int pr = 0; pr < sc.num_ranks; ++pr) {
        std::map<int, double> ready = last_weight_gradient(sc, r.replay, pr);
        std::vector<std::pair<double, double>> syncs;  // (ready, seconds) per stage held
        double pd = 0, pe = 0, act = 0, total_sync = 0;
        for (int dir = 0; dir < sc.num_directions; ++dir)
            for (int s = 0; s < S; ++s) {
                if (sc.rank_of(s, dir) != pr) continue;  // DualPipe: each stage twice (two copies)
                StageParams sp = stage_params(cfg, x.first_layer(s), x.num_layers(s), s == 0, s == S - 1, o.ep, x.sh.tp,
                                              x.sh.etp);
                const double d = sp.dense, p = sp.experts;
                pd += d, pe += p;
                double per_token = 0;
                for (int l = x.first_layer(s); l < x.first_layer(s) + x.num_layers(s); ++l)
                    per_token += layer_activation_bytes(cfg, l, o);
                act = std::max(act, per_token * Tg);
                double t = 0;
                if (!o.free_communication) {
                    LinkClass pair = x.node_of(pr) == x.node_of(S - 1 - pr) ? LinkClass::IntraNode : LinkClass::InterNode;
                    t = stage_sync_s(cm, sp, dense_dp, r.edp, dp_link, o.schedule == ScheduleKind::DualPipe, pair);
                }
                syncs.push_back({ready.count(s) ? ready[s] : r.pipeline_s, t});
                total_sync += t;
            }
        std::sort(syncs.begin(), syncs.end());
        double busy_until = 0;  // the rank's links: one stage's synchronization after the other
        for (auto [at, t] : syncs) busy_until = std::max(busy_until, at) + t;
        // Serialized: after this rank's own last instruction (its data-parallel peers run the same list; the
        // other pipeline ranks do not take part).
        const double own_end = r.replay.spans[pr].empty() ? 0 : r.replay.spans[pr].back().end;
        step_end = std::max(step_end, o.overlap_grad_sync ? busy_until : own_end + total_sync);
        serial = std::max(serial, total_sync);
        std::map<std::string, double> mem;
        mem["parameters"] = 2 * (pd + pe);                                      // BF16 working weights
        mem["gradients"] = 4 * (pd + pe);                                       // FP32 gradients
        mem["optimizer"] = 8 * (pd / dense_dp + pe / r.edp);                    // FP32 master + 2 BF16 moments
        mem["activations"] = r.replay.peak_activations[pr] * act;               // live chunks at the peak
        // Expert-exchange buffers for the two chunks of an F&B pair (dispatch in, combine out) and P2P buffers.
        mem["communication_buffers"] =
            o.ep > 1 ? 2.0 * Tg * etp * K * h * (x.dispatch_elem() + e) + 4 * act_bytes : 4 * act_bytes;
        double total = 0;
        for (auto& [k, v] : mem) total += v;
        if (total > worst_total) worst_total = total, worst_mem = mem;
    }
    r.memory_per_gpu_bytes = worst_mem;
    r.memory_total_bytes = worst_total;
    r.memory_capacity_bytes = x.dev.memory_bytes;
    r.fits = x.dev.memory_bytes <= 0 || worst_total <= x.dev.memory_bytes;
    r.grad_sync_s = serial;
    r.exposed_comm_s["data_parallel"] = step_end - r.pipeline_s;
    r.step_time_s = step_end;
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


}  // namespace duplex::sim_detail
