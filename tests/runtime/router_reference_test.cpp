// The router against an independent group-limited top-K written here from the specification
// (docs/reference.md), not from router.cpp: on the small and the DeepSeek-V3-shaped presets (K/M = 2), with a
// skewed non-zero bias, the expert sets and gates must be the same for every token. Catches a group scored by its
// top-1 instead of the sum of its top K/M, a bias left out of selection or put into the gates.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include <gtest/gtest.h>

#include "core/clock.hpp"
#include "runtime/model/config.hpp"
#include "runtime/model/router.hpp"

namespace duplex {
namespace {

struct Choice {
    std::set<int> experts;
    std::vector<double> gates;  // in ascending expert order
};

// Specification: biased_i = s_i + b_i; a group's score is the sum of its K/M largest biased values; the M best
// groups (lower index on ties) are allowed; the K largest biased values among their experts are selected (lower
// index on ties); gate_i = route_scale * s_i / (sum of the selected s).
Choice spec_route(const std::vector<double>& s, const std::vector<double>& b, const ModelConfig& c) {
    int E = c.experts, G = c.groups, M = c.top_groups, K = c.top_k, per = E / G;
    std::vector<double> biased(E);
    for (int e = 0; e < E; ++e) biased[e] = s[e] + b[e];
    std::vector<std::pair<double, int>> groups;
    for (int g = 0; g < G; ++g) {
        std::vector<double> v(biased.begin() + g * per, biased.begin() + (g + 1) * per);
        std::sort(v.rbegin(), v.rend());
        groups.push_back({-std::accumulate(v.begin(), v.begin() + K / M, 0.0), g});  // ascending = best first
    }
    std::sort(groups.begin(), groups.end());
    std::vector<std::pair<double, int>> cand;
    for (int i = 0; i < M; ++i)
        for (int e = groups[i].second * per; e < (groups[i].second + 1) * per; ++e) cand.push_back({-biased[e], e});
    std::sort(cand.begin(), cand.end());
    Choice ch;
    double sum = 0;
    for (int k = 0; k < K; ++k) ch.experts.insert(cand[k].second), sum += s[cand[k].second];
    for (int e : ch.experts) ch.gates.push_back(c.route_scale * s[e] / sum);
    return ch;
}

class RouterReference : public ::testing::TestWithParam<std::string> {};

TEST_P(RouterReference, ChoicesAndGatesEqualAnIndependentGroupLimitedTopK) {
    ModelConfig c = ModelConfig::preset(GetParam());
    ASSERT_GT(c.top_k / c.top_groups, 1) << "a preset where the group score is a sum of several experts";
    const int tokens = 2000, E = c.experts;
    Rng rng(11);
    std::vector<double> scores(size_t(tokens) * E), bias(E);
    for (double& v : scores) v = 1.0 / (1.0 + std::exp(-rng.normal()));
    for (int e = 0; e < E; ++e) bias[e] = 0.05 * std::sin(0.7 * e) + (e % 5 == 0 ? 0.03 : -0.01);  // skewed, non-zero
    Routing r = route<double>(scores.data(), bias, tokens, c);
    int differ = 0;
    for (int t = 0; t < tokens; ++t) {
        std::vector<double> s(scores.begin() + long(t) * E, scores.begin() + long(t + 1) * E);
        Choice want = spec_route(s, bias, c);
        std::set<int> got(r.expert.begin() + long(t) * c.top_k, r.expert.begin() + long(t + 1) * c.top_k);
        if (got != want.experts) {
            ++differ;
            continue;
        }
        for (int k = 0; k < c.top_k; ++k)
            EXPECT_NEAR(r.gate[size_t(t) * c.top_k + k], want.gates[k], 1e-12) << "token " << t;
    }
    EXPECT_EQ(differ, 0) << "tokens routed to another expert set than the specification's";
    // The bias matters: without it some tokens choose differently (else this test could not see it dropped).
    Routing plain = route<double>(scores.data(), std::vector<double>(E, 0.0), tokens, c);
    EXPECT_NE(plain.expert, r.expert);
}

INSTANTIATE_TEST_SUITE_P(Presets, RouterReference, ::testing::Values("small", "deepseek-v3"),
                         [](const auto& info) { return std::string(info.param == "small" ? "small" : "deepseek_v3"); });

}  // namespace
}  // namespace duplex
