#include "runtime/model/config.hpp"

#include <fstream>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.hpp"

namespace duplex {

ModelConfig ModelConfig::preset(const std::string& name) {
    ModelConfig c;
    if (name == "tiny") return c;
    if (name == "small") {
        c.name = "small";
        c.vocab = 256;
        c.hidden = 128;
        c.heads = 4;
        c.head_dim = 32;
        c.layers = 6;
        c.dense_layers = 1;
        c.dense_ffn = 384;
        c.experts = 16;
        c.expert_ffn = 64;
        c.top_k = 4;
        c.groups = 4;
        c.top_groups = 2;
        c.seq_len = 64;
        return c;
    }
    if (name == "deepseek-v3") {
        // arXiv 2412.19437, section 4.2 and its config: 61 layers (first 3 dense), MLA, 1 shared + 256 routed
        // experts (top-8, at most 4 of 8 node groups), one MTP module, sequences of 4096.
        c.name = "deepseek-v3";
        c.vocab = 129280;
        c.hidden = 7168;
        c.heads = 128;
        c.head_dim = 128;
        c.rope_dim = 64;
        c.v_head_dim = 128;
        c.q_lora = 1536;
        c.kv_lora = 512;
        c.layers = 61;
        c.dense_layers = 3;
        c.dense_ffn = 18432;
        c.experts = 256;
        c.expert_ffn = 2048;
        c.shared_experts = 1;
        c.top_k = 8;
        c.groups = 8;
        c.top_groups = 4;
        c.mtp_depth = 1;
        c.seq_len = 4096;
        return c;
    }
    if (name == "llama3-405b") {
        // "The Llama 3 Herd of Models" (arXiv 2407.21783), its table of model sizes: 126 layers, hidden 16384,
        // FFN 53248, 128 heads with 8 key/value heads (GQA), vocabulary 128256; pre-training sequences of 8192.
        c.name = "llama3-405b";
        c.vocab = 128256;
        c.hidden = 16384;
        c.heads = 128;
        c.kv_heads = 8;
        c.head_dim = 128;
        c.layers = 126;
        c.dense_layers = 126;
        c.dense_ffn = 53248;
        c.experts = 0, c.expert_ffn = 0, c.shared_experts = 0, c.top_k = 0, c.groups = 1, c.top_groups = 1;
        c.seq_len = 8192;
        return c;
    }
    if (name.size() > 5 && name.substr(name.size() - 5) == ".json") return from_json_file(name);
    throw ConfigError("--model",
                      fmt::format("unknown model '{}' (tiny, small, deepseek-v3, llama3-405b, or a .json file)", name));
}

ModelConfig ModelConfig::from_json_file(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw ConfigError("--model", fmt::format("cannot read '{}'", path));
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(in);
    } catch (const std::exception& e) {
        throw ConfigError("--model", fmt::format("'{}' is not valid JSON: {}", path, e.what()));
    }
    ModelConfig c;
    c.name = path;
    auto get = [&](const char* key, auto& field) {
        if (!j.contains(key)) return;
        try {
            j.at(key).get_to(field);
        } catch (const std::exception&) {
            throw ConfigError("--model", fmt::format("'{}': field '{}' has the wrong type", path, key));
        }
    };
    get("name", c.name);
    get("vocab", c.vocab), get("hidden", c.hidden), get("heads", c.heads), get("head_dim", c.head_dim);
    get("kv_heads", c.kv_heads);
    get("layers", c.layers), get("dense_layers", c.dense_layers), get("dense_ffn", c.dense_ffn);
    get("experts", c.experts), get("expert_ffn", c.expert_ffn), get("shared_experts", c.shared_experts);
    get("top_k", c.top_k), get("groups", c.groups), get("top_groups", c.top_groups), get("seq_len", c.seq_len);
    get("q_lora", c.q_lora), get("kv_lora", c.kv_lora), get("rope_dim", c.rope_dim), get("v_head_dim", c.v_head_dim);
    get("mtp_depth", c.mtp_depth), get("route_scale", c.route_scale);
    for (auto it = j.begin(); it != j.end(); ++it) {
        static const std::set<std::string> known = {
            "name", "vocab", "hidden", "heads", "kv_heads", "head_dim", "layers", "dense_layers", "dense_ffn", "experts",
            "expert_ffn", "shared_experts", "top_k", "groups", "top_groups", "seq_len", "q_lora", "kv_lora",
            "rope_dim", "v_head_dim", "mtp_depth", "route_scale"};
        if (!known.count(it.key()))
            throw ConfigError("--model", fmt::format("'{}': unknown field '{}'", path, it.key()));
    }
    c.validate();
    return c;
}

void ModelConfig::validate() const {
    DUPLEX_CHECK_ARG(vocab >= 2 && hidden >= 1 && heads >= 1 && layers >= 1, "model", "dimensions must be positive");
    DUPLEX_CHECK_ARG(head_dim % 2 == 0, "model.head_dim", "rotary embedding needs an even head dim, got {}", head_dim);
    DUPLEX_CHECK_ARG(dense_layers >= 0 && dense_layers <= layers, "model.dense_layers", "{} outside 0..{}", dense_layers,
                     layers);
    if (dense_layers < layers) {
        DUPLEX_CHECK_ARG(experts >= 1 && top_k >= 1 && top_k <= experts, "model.top_k",
                         "need 1 <= top_k ({}) <= experts ({})", top_k, experts);
        DUPLEX_CHECK_ARG(groups >= 1 && experts % groups == 0, "model.groups", "{} groups do not divide {} experts",
                         groups, experts);
        DUPLEX_CHECK_ARG(top_groups >= 1 && top_groups <= groups, "model.top_groups", "{} outside 1..{}", top_groups,
                         groups);
        DUPLEX_CHECK_ARG(top_k % top_groups == 0, "model.top_k",
                         "top_k ({}) must be a multiple of top_groups ({}): groups are scored by their top K/M experts",
                         top_k, top_groups);
        DUPLEX_CHECK_ARG(top_k <= top_groups * (experts / groups), "model.top_k",
                         "top_k ({}) exceeds the experts of {} groups", top_k, top_groups);
    }
    DUPLEX_CHECK_ARG(seq_len >= 1, "model.seq_len", "must be positive, got {}", seq_len);
    DUPLEX_CHECK_ARG(kv_heads >= 0 && kv_heads <= heads && (kv_heads == 0 || heads % kv_heads == 0), "model.kv_heads",
                     "{} key/value heads must divide the {} heads (0: one per head)", kv_heads, heads);
    DUPLEX_CHECK_ARG(kv_heads == 0 || !mla(), "model.kv_heads", "grouped-query heads and MLA exclude each other");
}

void ModelConfig::check_runnable() const {
    bool gqa = kv_head_count() != heads;
    DUPLEX_CHECK_ARG(!mla() && !gqa && mtp_depth == 0 && num_parameters() < 1000000000LL, "--model",
                     "'{}' ({:.0f}B parameters{}) is for --mode emulate and `duplex simulate`; the runtime model "
                     "trains tiny, small or a JSON model without MLA/GQA/MTP under 1B parameters",
                     name, total_params() / 1e9, mla() ? ", MLA" : gqa ? ", grouped-query attention" : "");
}

double ModelConfig::attention_params() const {
    double h = hidden, H = heads;
    if (!mla()) return 2 * h * H * head_dim + 2 * h * kv_head_count() * head_dim;  // Q and O; K and V (GQA: fewer)
    double q = q_lora > 0 ? h * q_lora + q_lora * H * (head_dim + rope_dim) : h * H * (head_dim + rope_dim);
    return q + h * (kv_lora + rope_dim) + kv_lora * H * (head_dim + v_head_dim) + H * v_head_dim * h;
}

double ModelConfig::expert_params() const { return 3.0 * hidden * expert_ffn; }

double ModelConfig::layer_params(int layer) const {
    double ffn = is_moe_layer(layer) ? expert_params() * (experts + shared_experts) + double(hidden) * experts
                                     : 3.0 * hidden * dense_ffn;
    return attention_params() + ffn;
}

double ModelConfig::activated_params() const {
    double a = 0;
    for (int l = 0; l < layers; ++l)
        a += attention_params() + (is_moe_layer(l) ? expert_params() * (top_k + shared_experts) + double(hidden) * experts
                                                  : 3.0 * hidden * dense_ffn);
    double head = double(vocab) * hidden;
    // An MTP module: a projection of [hidden, hidden] pairs, one MoE layer, the shared head.
    double mtp = mtp_depth * (2.0 * hidden * hidden + attention_params() +
                              expert_params() * (top_k + shared_experts) + double(hidden) * experts + head);
    return a + head + mtp;
}

double ModelConfig::total_params() const {
    double t = 2.0 * vocab * hidden;
    for (int l = 0; l < layers; ++l) t += layer_params(l);
    return t + mtp_depth * (2.0 * hidden * hidden + layer_params(layers - 1));
}

int64_t ModelConfig::num_parameters() const {
    int64_t d = hidden, a = int64_t(heads) * head_dim;
    int64_t attn = 4 * d * a + 2 * d;  // wq wk wv wo + two norms
    int64_t dense = 3 * d * dense_ffn;
    int64_t moe = 3 * d * expert_ffn * (experts + shared_experts) + d * experts;
    return 2 * int64_t(vocab) * d + d + layers * attn + dense_layers * dense + (layers - dense_layers) * moe;
}

}  // namespace duplex
