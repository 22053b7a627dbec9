// MoE routing (docs/reference.md): sigmoid affinities, group-limited top-K selection on biased scores,
// gates normalized over the selected experts without the bias, the aux-loss-free bias update and MaxVio.
//
//   Routing r = route(scores, bias, tokens, cfg);     // scores = sigmoid(u), [tokens, experts]
//   update_bias(bias, counts, cfg.bias_update_speed);
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/model/config.hpp"

namespace duplex {

struct Routing {
    int tokens = 0, top_k = 0;
    std::vector<int> expert;      // [tokens * top_k], ascending within a token
    std::vector<double> gate;     // [tokens * top_k]: route_scale * s / sum of the selected s
    std::vector<double> sel_sum;  // [tokens]: sum of the selected s (for backward)
};

// scores: sigmoid affinities s[t, e]; bias b[e] (selection only). Ties break towards the lower index.
template <typename T>
Routing route(const T* scores, const std::vector<double>& bias, int tokens, const ModelConfig& cfg);

// Tokens per expert.
std::vector<int64_t> expert_counts(const Routing& r, int experts);
// b_i += speed * sign(mean - c_i)
void update_bias(std::vector<double>& bias, const std::vector<int64_t>& counts, double speed);
// (max load - mean load) / mean load
double max_violation(const std::vector<int64_t>& counts);

}  // namespace duplex
