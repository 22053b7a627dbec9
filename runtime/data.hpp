// The synthetic task the reference model trains on: a deterministic sequence transformation from a seed.
// Each target is a fixed random permutation of the *previous* token, chosen by the class of the current one:
//     y[t] = P_{c(x[t])}(x[t-1]),  c(x) = x mod 2,   y[0] = P_0(x[0])
// so the model must attend one position back (attention), combine it with the current token, and memorize
// two vocabulary-sized tables (capacity that experts supply). Uniform guessing costs ln(vocab).
//
//   SyntheticTask task(vocab, seq_len, seed);
//   Batch b = task.batch(sequences, step_seed, /*zipf_skew=*/0.0);
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/model/stage.hpp"

namespace duplex {

class SyntheticTask {
public:
    SyntheticTask(int vocab, int seq_len, uint64_t seed);
    // `sequences` sequences drawn from `seed`; zipf_skew > 0 draws tokens Zipf-distributed (skewed expert load).
    Batch batch(int sequences, uint64_t seed, double zipf_skew = 0.0) const;
    int target_of(int previous, int current) const;

private:
    int vocab_, seq_len_;
    std::vector<int> perm_[2];
};

}  // namespace duplex
