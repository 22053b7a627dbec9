#include "runtime/model/router.hpp"

#include <algorithm>
#include <numeric>

namespace duplex {

template <typename T>
Routing route(const T* scores, const std::vector<double>& bias, int tokens, const ModelConfig& cfg) {
    const int E = cfg.experts, K = cfg.top_k, G = cfg.groups, M = cfg.top_groups, per_group = E / G;
    const int per_group_top = K / M;
    Routing r;
    r.tokens = tokens;
    r.top_k = K;
    r.expert.resize(size_t(tokens) * K);
    r.gate.resize(size_t(tokens) * K);
    r.sel_sum.resize(tokens);
    std::vector<double> biased(E), group_score(G), top(per_group);
    std::vector<int> gorder(G), candidates;
    candidates.reserve(E);
    for (int t = 0; t < tokens; ++t) {
        const T* s = scores + size_t(t) * E;
        for (int e = 0; e < E; ++e) biased[e] = double(s[e]) + bias[e];
        // Group score: the sum of its top K/M biased scores.
        for (int g = 0; g < G; ++g) {
            std::copy(biased.begin() + g * per_group, biased.begin() + (g + 1) * per_group, top.begin());
            std::partial_sort(top.begin(), top.begin() + per_group_top, top.end(), std::greater<double>());
            group_score[g] = std::accumulate(top.begin(), top.begin() + per_group_top, 0.0);
        }
        // The M best groups (ties: lower index first), then the K best experts inside them (ties: lower index).
        std::iota(gorder.begin(), gorder.end(), 0);
        std::partial_sort(gorder.begin(), gorder.begin() + M, gorder.end(), [&](int a, int b) {
            return group_score[a] != group_score[b] ? group_score[a] > group_score[b] : a < b;
        });
        std::sort(gorder.begin(), gorder.begin() + M);
        candidates.clear();
        for (int i = 0; i < M; ++i)
            for (int e = gorder[i] * per_group; e < (gorder[i] + 1) * per_group; ++e) candidates.push_back(e);
        std::partial_sort(candidates.begin(), candidates.begin() + K, candidates.end(),
                          [&](int a, int b) { return biased[a] != biased[b] ? biased[a] > biased[b] : a < b; });
        std::vector<int>& order = candidates;
        std::vector<int> chosen(order.begin(), order.begin() + K);
        std::sort(chosen.begin(), chosen.end());
        double sum = 0;
        for (int e : chosen) sum += double(s[e]);
        r.sel_sum[t] = sum;
        for (int k = 0; k < K; ++k) {
            r.expert[size_t(t) * K + k] = chosen[k];
            r.gate[size_t(t) * K + k] = cfg.route_scale * double(s[chosen[k]]) / sum;
        }
    }
    return r;
}

template Routing route<float>(const float*, const std::vector<double>&, int, const ModelConfig&);
template Routing route<double>(const double*, const std::vector<double>&, int, const ModelConfig&);

std::vector<int64_t> expert_counts(const Routing& r, int experts) {
    std::vector<int64_t> c(experts, 0);
    for (int e : r.expert) ++c[e];
    return c;
}

void update_bias(std::vector<double>& bias, const std::vector<int64_t>& counts, double speed) {
    double mean = 0;
    for (int64_t c : counts) mean += double(c);
    mean /= double(counts.size());
    for (size_t i = 0; i < bias.size(); ++i) {
        double diff = mean - double(counts[i]);
        bias[i] += speed * (diff > 0 ? 1.0 : diff < 0 ? -1.0 : 0.0);
    }
}

double max_violation(const std::vector<int64_t>& counts) {
    double mean = 0, mx = 0;
    for (int64_t c : counts) {
        mean += double(c);
        mx = std::max(mx, double(c));
    }
    mean /= double(counts.size());
    return mean > 0 ? (mx - mean) / mean : 0;
}

}  // namespace duplex
