#include "runtime/sim/layout.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

void check_shards(const ModelConfig& c, const DevicePreset& dev, const Shards& sh) {
    const int tp = sh.tp, cp = sh.cp, gpn = dev.gpus_per_node;
    DUPLEX_CHECK_ARG(tp >= 1, "--tp", "must be at least 1, got {}", tp);
    DUPLEX_CHECK_ARG(cp >= 1, "--cp", "must be at least 1, got {}", cp);
    DUPLEX_CHECK_ARG(sh.etp >= 1, "--etp", "must be at least 1, got {}", sh.etp);
    DUPLEX_CHECK_ARG(gpn % tp == 0, "--tp", "TP={} must divide the {} GPUs of a node (TP runs on NVLink)", tp, gpn);
    DUPLEX_CHECK_ARG(c.heads % tp == 0, "--tp", "TP={} must divide the {} attention heads", tp, c.heads);
    DUPLEX_CHECK_ARG(c.kv_head_count() % tp == 0 || tp % c.kv_head_count() == 0, "--tp",
                     "TP={} and the {} key/value heads: one must divide the other", tp, c.kv_head_count());
    DUPLEX_CHECK_ARG(c.hidden % tp == 0, "--tp", "TP={} must divide the hidden size {}", tp, c.hidden);
    if (c.dense_layers > 0)
        DUPLEX_CHECK_ARG(c.dense_ffn % tp == 0, "--tp", "TP={} must divide the dense FFN size {}", tp, c.dense_ffn);
    DUPLEX_CHECK_ARG(c.seq_len % tp == 0, "--tp", "TP={} must divide the sequence of {} tokens (sequence parallelism)",
                     tp, c.seq_len);
    if (cp > 1)
        DUPLEX_CHECK_ARG(c.seq_len % (2 * cp) == 0, "--cp",
                         "CP={} needs a sequence divisible by 2 x CP = {} (causal load balance), got {} tokens", cp,
                         2 * cp, c.seq_len);
    if (!c.dense())
        DUPLEX_CHECK_ARG(c.expert_ffn % sh.etp == 0, "--etp", "ETP={} must divide the experts' FFN size {}", sh.etp,
                         c.expert_ffn);
}

namespace {

// A ring all-gather or reduce-scatter of a `bytes` tensor over n ranks inside a node.
double ring_in_node(const CostModel& cm, double bytes, int n) {
    return n <= 1 ? 0 : (n - 1) * cm.transfer_s(bytes / n, LinkClass::IntraNode);
}

// What a collective pipelined in 4 pieces against its GEMM leaves exposed.
double beside(double comm, double gemm) { return comm <= 0 ? 0 : std::max(comm / 4, comm - gemm); }

}  // namespace

ChunkComm shard_comm(const CostModel& cm, const ModelConfig& c, int first, int layers, int tokens, const Shards& sh,
                     double elem_bytes, bool fp8, LinkClass cp_link) {
    ChunkComm out;
    const DevicePreset& d = cm.device();
    const double scale = d.time_scale, gemm = d.gemm_flops_s(fp8), attn = d.attention_flops_s();
    const double t_cp = double(tokens) / sh.cp;        // the TP group's tokens
    const double h = c.hidden, tp = sh.tp, cp = sh.cp;
    const double coll = ring_in_node(cm, t_cp * h * elem_bytes, sh.tp);  // one all-gather or reduce-scatter
    // Attention's GEMMs on one GPU: the column-parallel input projections and the row-parallel output.
    const double attn_params = c.attention_params();
    const double out_params = h * c.heads * (c.mla() ? c.v_head_dim : c.head_dim);
    const double qkv_s = 2 * t_cp * (attn_params - out_params) / tp / gemm * scale;
    const double o_s = 2 * t_cp * out_params / tp / gemm * scale;
    for (int l = first; l < first + layers; ++l) {
        if (sh.tp > 1) {
            double ffn = c.is_moe_layer(l) ? double(c.expert_ffn) * c.shared_experts : c.dense_ffn;
            double up_s = 2 * t_cp * h * 2 * ffn / tp / gemm * scale, down_s = 2 * t_cp * ffn * h / tp / gemm * scale;
            out.tp_f += beside(coll, qkv_s) + beside(coll, o_s);
            out.tp_b += beside(coll, o_s) + beside(coll, qkv_s) + beside(coll, qkv_s);
            if (ffn > 0) {  // a dense FFN or the shared experts: the same pair of collectives
                out.tp_f += beside(coll, up_s) + beside(coll, down_s);
                out.tp_b += beside(coll, down_s) + beside(coll, up_s) + beside(coll, up_s);
            }
        }
        if (sh.cp > 1) {
            // A block of keys and values: MLA passes its decompressed heads, GQA its key/value heads.
            double kv_dims = c.mla() ? c.heads * (c.head_dim + c.rope_dim + c.v_head_dim)
                                     : 2.0 * c.kv_head_count() * c.head_dim;
            double block_bytes =  // a CP rank's share of the sequence, its TP rank's share of the heads
                t_cp * kv_dims / std::min(tp, double(c.mla() ? c.heads : c.kv_head_count())) * elem_bytes;
            double step_comm = cm.transfer_s(block_bytes, cp_link);
            double step_compute = CostModel::layer_flops(c, l, tokens).scores / (tp * cp * cp) / attn * scale;
            out.cp_f += (cp - 1) * std::max(0.0, step_comm - step_compute);
            out.cp_b += (cp - 1) * std::max(0.0, 2 * step_comm - 2 * step_compute);
        }
    }
    return out;
}

}  // namespace duplex
