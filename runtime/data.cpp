#include "runtime/data.hpp"

#include <cmath>
#include <numeric>

#include "core/clock.hpp"
#include "core/error.hpp"

namespace duplex {

SyntheticTask::SyntheticTask(int vocab, int seq_len, uint64_t seed) : vocab_(vocab), seq_len_(seq_len) {
    DUPLEX_CHECK_ARG(vocab >= 2 && seq_len >= 1, "task", "vocab {} and seq_len {} must be positive", vocab, seq_len);
    Rng rng(seed ^ 0x5eed7a5cull);
    for (auto& p : perm_) {
        p.resize(vocab);
        std::iota(p.begin(), p.end(), 0);
        for (int i = vocab - 1; i > 0; --i) std::swap(p[i], p[rng.below(uint64_t(i) + 1)]);
    }
}

int SyntheticTask::target_of(int previous, int current) const { return perm_[current % 2][previous]; }

Batch SyntheticTask::batch(int sequences, uint64_t seed, double zipf_skew) const {
    Batch b;
    b.sequences = sequences;
    b.seq_len = seq_len_;
    Rng rng(seed);
    std::vector<double> cdf;
    if (zipf_skew > 0) {
        double sum = 0;
        for (int v = 0; v < vocab_; ++v) cdf.push_back(sum += 1.0 / std::pow(v + 1.0, zipf_skew));
        for (double& c : cdf) c /= sum;
    }
    auto draw = [&] {
        if (cdf.empty()) return int(rng.below(uint64_t(vocab_)));
        double u = rng.uniform();
        return int(std::lower_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
    };
    for (int s = 0; s < sequences; ++s) {
        int prev = -1;
        for (int t = 0; t < seq_len_; ++t) {
            int x = std::min(draw(), vocab_ - 1);
            b.tokens.push_back(x);
            b.targets.push_back(target_of(prev < 0 ? x : prev, prev < 0 ? 0 : x));
            prev = x;
        }
    }
    return b;
}

}  // namespace duplex
