#include "runtime/cost_model.hpp"

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

CostModel CostModel::preset(const std::string& name) {
    if (name == "h800") return CostModel({"h800", 989e12 * 0.4, 160e9, 50e9, 10e-6, 1.0});
    throw ConfigError("--device", fmt::format("unknown device preset '{}' (h800)", name));
}

double CostModel::attention_flops(const ModelConfig& c, int tokens) const {
    double d = c.hidden, a = double(c.heads) * c.head_dim, t = tokens;
    return 2 * t * d * a * 4 + 2 * 2 * t * (c.seq_len + 1) / 2.0 * a;  // projections + causal QK^T and PV
}

double CostModel::forward_flops(const ModelConfig& c, int layer, int tokens) const {
    double d = c.hidden, t = tokens;
    double attn = attention_flops(c, tokens);
    double ffn;
    if (c.is_moe_layer(layer)) {
        double expert = 2 * 3 * d * c.expert_ffn;
        ffn = t * (2 * d * c.experts + expert * (c.shared_experts + c.top_k));
    } else {
        ffn = t * 2 * 3 * d * c.dense_ffn;
    }
    return attn + ffn;
}

ChunkCosts CostModel::chunk(const ModelConfig& c, int layers, int tokens) const {
    double flops = 0;
    for (int l = 0; l < layers; ++l) flops += forward_flops(c, l, tokens);
    double f = flops / device_.flops * device_.time_scale;
    // NOTE: no overlap benefit assumed for F&B on its own; emulate mode measures what overlap gains.
    return {f, 2 * f, f, 3 * f};
}

double CostModel::transfer_s(double bytes, LinkClass link) const {
    if (link == LinkClass::Self) return 0;
    double bw = link == LinkClass::IntraNode ? device_.intra_bytes_s : device_.inter_bytes_s;
    return (device_.latency_s + bytes / bw) * device_.time_scale;
}

}  // namespace duplex
