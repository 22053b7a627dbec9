#include "runtime/model/config.hpp"

#include <fmt/format.h>

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
    throw ConfigError("--model", fmt::format("unknown model '{}' (tiny, small)", name));
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
}

int64_t ModelConfig::num_parameters() const {
    int64_t d = hidden, a = int64_t(heads) * head_dim;
    int64_t attn = 4 * d * a + 2 * d;  // wq wk wv wo + two norms
    int64_t dense = 3 * d * dense_ffn;
    int64_t moe = 3 * d * expert_ffn * (experts + shared_experts) + d * experts;
    return 2 * int64_t(vocab) * d + d + layers * attn + dense_layers * dense + (layers - dense_layers) * moe;
}

}  // namespace duplex
