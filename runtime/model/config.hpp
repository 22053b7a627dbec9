// The built-in reference model: a scaled-down DeepSeek-V3-style MoE transformer (pre-norm, RMSNorm, rotary
// multi-head attention, SwiGLU; the first layers dense, the rest MoE with one shared and E routed experts,
// sigmoid affinities, auxiliary-loss-free bias balancing and group-limited routing).
//
//   ModelConfig c = ModelConfig::preset("tiny");   // runs in seconds
//   c.validate();                                   // ConfigError naming the bad field
#pragma once

#include <cstdint>
#include <string>

namespace duplex {

struct ModelConfig {
    std::string name = "tiny";
    int vocab = 64;
    int hidden = 64;
    int heads = 4;
    int head_dim = 16;
    int layers = 4;
    int dense_layers = 1;  // the first layers use a dense FFN (as V3's first 3)
    int dense_ffn = 128;
    int experts = 8;       // routed experts per MoE layer
    int expert_ffn = 32;
    int shared_experts = 1;
    int top_k = 2;
    int groups = 4;        // expert groups (nodes in V3); experts are split evenly
    int top_groups = 2;    // M: a token reaches experts of at most this many groups
    double route_scale = 2.5;
    double bias_update_speed = 0.001;  // gamma of the aux-loss-free balancing
    double balance_alpha = 0.0;        // optional sequence-wise balance loss weight (V3: 0.0001)
    double rope_base = 10000.0;
    double norm_eps = 1e-6;
    double init_std = 0.02;
    int seq_len = 16;

    static ModelConfig preset(const std::string& name);  // "tiny" or "small"; ConfigError otherwise
    void validate() const;
    bool is_moe_layer(int layer) const { return layer >= dense_layers; }
    int64_t num_parameters() const;
};

}  // namespace duplex
