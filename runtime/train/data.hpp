// Where training batches come from. A BatchSource gives microbatch `global` of step `step` (the same answer on
// every rank that asks, so the first and last pipeline stage agree and a single-rank run sees the same data):
//   SyntheticBatches  the synthetic task below (the default),
//   TokenFileBatches  a flat binary file of uint16 or uint32 token ids (the format small training codebases
//                     write after tokenizing text): windows of seq_len + 1 tokens, inputs and next-token targets.
//
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
#include <memory>
#include <string>
#include <vector>

#include "runtime/model/batch.hpp"

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

class BatchSource {
public:
    virtual ~BatchSource() = default;
    // Microbatch `global` (0-based position in the step's global batch) of 1-based step `step`.
    virtual Batch batch(int step, int global) const = 0;
    virtual std::string describe() const = 0;
};

// The seed of microbatch `global` of step `step`: the one formula every trainer uses.
uint64_t batch_seed(uint64_t seed, int step, int global);

class SyntheticBatches : public BatchSource {
public:
    SyntheticBatches(int vocab, int seq_len, int sequences, uint64_t seed, double zipf_skew = 0.0);
    Batch batch(int step, int global) const override;
    std::string describe() const override;
    const SyntheticTask& task() const { return task_; }

private:
    SyntheticTask task_;
    int sequences_;
    uint64_t seed_;
    double skew_;
};

class TokenFileBatches : public BatchSource {
public:
    // ConfigError naming the file for a missing file, a size that is not a whole number of ids, fewer ids than
    // one window, or an id >= vocab. Windows start at random offsets drawn from (seed, step, global).
    TokenFileBatches(const std::string& path, int bytes_per_token, int vocab, int seq_len, int sequences,
                     uint64_t seed);
    Batch batch(int step, int global) const override;
    std::string describe() const override;
    size_t num_tokens() const { return ids_.size(); }

private:
    std::string path_;
    std::vector<int> ids_;
    int seq_len_, sequences_;
    uint64_t seed_;
};

// "synthetic" or "FILE[:u16|:u32]" (default u16) -> the source.
std::unique_ptr<BatchSource> make_batch_source(const std::string& spec, int vocab, int seq_len, int sequences,
                                               uint64_t seed, double zipf_skew);

}  // namespace duplex
