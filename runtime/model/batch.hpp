// Tokens of one microbatch for the built-in model, and their form as a stage's microbatch data (named int32
// tensors, runtime/exec/stage.hpp) on the way through the executor.
//
//   MicrobatchData d = microbatch_data(batch);            // views on batch's vectors: "tokens", "targets"
//   Batch b = batch_from(mb.data, sequences, seq_len);    // a first or last stage reading it back
#pragma once

#include <vector>

#include "runtime/exec/stage.hpp"

namespace duplex {

// sequences x seq_len input ids and their targets.
struct Batch {
    int sequences = 0;
    int seq_len = 0;
    std::vector<int> tokens, targets;  // [sequences * seq_len]
    int num_tokens() const { return sequences * seq_len; }
};

// Views of b's tokens and targets as int32 [sequences, seq_len] tensors named "tokens" and "targets" (b must
// outlive them).
MicrobatchData microbatch_data(Batch& b);
// The batch a microbatch's data holds (its "tokens" and "targets", either may be missing), shaped sequences x
// seq_len; without data, an empty batch of that shape (a middle stage's). ConfigError for data of another shape
// or type.
Batch batch_from(const MicrobatchData* data, int sequences, int seq_len);

}  // namespace duplex
