#include "runtime/sim/grad_sync.hpp"

namespace duplex {

namespace {

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

}  // namespace

StageParams stage_params(const ModelConfig& c, int first, int n, bool first_stage, bool last_stage, int ep, int tp,
                         int etp) {
    return {dense_params(c, first, n, first_stage, last_stage) / tp,
            c.dense() ? 0.0 : expert_params(c, first, n, last_stage, ep) / etp};
}

double ring_s(const CostModel& cm, double bytes, int n, LinkClass link) {
    if (n <= 1) return 0;
    return (n - 1) * cm.transfer_s(bytes / n, link);
}

double stage_sync_s(const CostModel& cm, const StageParams& p, int dense_dp, int edp, LinkClass dp_link, bool pair_sum,
                    LinkClass pair_link) {
    double t = 0;
    if (pair_sum) t += cm.transfer_s((p.dense + p.experts) * 4 / 2, pair_link) * 2;  // half each way, fp32
    t += ring_s(cm, p.dense * 4, dense_dp, dp_link) + ring_s(cm, p.dense * 2, dense_dp, dp_link);   // RS fp32, AG bf16
    t += ring_s(cm, p.experts * 4, edp, dp_link) + ring_s(cm, p.experts * 2, edp, dp_link);
    return t;
}

}  // namespace duplex
