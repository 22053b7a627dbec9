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
    int kv_heads = 0;  // grouped-query attention: key/value heads (0: as many as heads; cost model only)
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
    // Multi-head latent attention (cost model only; the runtime model uses plain multi-head attention): with
    // kv_lora > 0, queries go through a q_lora-rank projection (0: none) and keys/values through a kv_lora-rank
    // one; head_dim is the no-rope part of a query/key head, rope_dim its rotary part, v_head_dim a value head.
    int q_lora = 0, kv_lora = 0, rope_dim = 0, v_head_dim = 0;
    int mtp_depth = 0;  // multi-token-prediction modules after the last layer (cost model only)

    // "tiny", "small" (runnable), "deepseek-v3", "llama3-405b" (the published architectures, for emulate and
    // simulate; Llama 3 405B is dense: every layer's FFN dense, GQA with 8 key/value heads); a path
    // ending in .json reads a ModelConfig object (fields as above, missing ones take the tiny defaults).
    // ConfigError otherwise.
    static ModelConfig preset(const std::string& name);
    static ModelConfig from_json_file(const std::string& path);
    void validate() const;
    // ConfigError unless the built-in runtime model can train it here (plain attention, no MTP, under ~1B
    // parameters): the published-scale presets are for emulate mode and the simulator.
    void check_runnable() const;
    bool is_moe_layer(int layer) const { return layer >= dense_layers; }
    bool mla() const { return kv_lora > 0; }
    int kv_head_count() const { return kv_heads > 0 ? kv_heads : heads; }
    bool dense() const { return dense_layers == layers; }  // no MoE layer
    // Tokens of a microbatch of `sequences` sequences (every path sizes a microbatch with this).
    int64_t tokens_per_microbatch(int sequences) const { return int64_t(sequences) * seq_len; }
    int64_t num_parameters() const;          // of the runtime model (plain attention, no MTP)
    // Parameters by kind, for the cost model (MLA-aware, MTP modules included).
    double attention_params() const;          // one layer's attention projections
    double expert_params() const;             // one routed or shared expert
    double layer_params(int layer) const;     // everything in one layer (all experts)
    double activated_params() const;          // what one token runs through (top-K + shared experts, head, MTP)
    double total_params() const;
};

}  // namespace duplex
