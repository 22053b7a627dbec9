// The simulator's rank layout beyond the pipeline, and what it costs a chunk: tensor parallelism with sequence
// parallelism (TP, Megatron's column/row split of attention and MLP) inside a node, context parallelism (CP, ring
// attention) next, then data parallelism and the pipeline; the routed experts over EP x ETP inside a stage's
// TP x CP x DP ranks (Megatron's MoE parallel folding: expert TP apart from attention TP).
//
//   Shards sh{.tp = 8, .cp = 16};
//   check_shards(cfg, device, sh);                   // ConfigError naming the constraint (TP not dividing heads, ...)
//   ChunkComm c = shard_comm(cm, cfg, first, layers, tokens, sh, o);   // exposed TP and CP seconds of one chunk
//
// Rank order (innermost first): TP, CP, DP, pipeline rank; a stage's TP x CP x DP ranks are contiguous.
//
// Costs, per layer and microbatch (tokens: the microbatch's, all sequences; each GPU holds tokens / (TP x CP)):
//   TP  forward: an all-gather before the column-parallel GEMMs and a reduce-scatter after the row-parallel one, for
//       attention and for the dense FFN (or a MoE layer's shared experts): ring collectives of the
//       [tokens / CP, hidden] activation over the TP group on NVLink. Backward: three per pair (the gradient's
//       all-gather for the row-parallel GEMM, the input's all-gather again for the column-parallel weight
//       gradient, the reduce-scatter of its input gradient). Each collective runs in 4 pieces pipelined with the
//       GEMM next to it (Megatron's TP communication overlap): exposed max(comm / 4, comm - GEMM).
//   CP  ring attention: CP - 1 steps, each passing a block of keys and values ([tokens / CP, KV heads / TP,
//       head dims]) to the next CP rank while the local block computes; exposed (CP - 1) max(0, transfer - block)
//       forward, twice the bytes and twice the compute backward (the blocks' gradients travel too). The causal
//       load balance (each rank holds chunks i and 2 CP - 1 - i) makes the blocks equal.
#pragma once

#include "runtime/model/config.hpp"
#include "runtime/sim/cost_model.hpp"

namespace duplex {

struct Shards {
    int tp = 1;   // tensor parallel (with sequence parallelism)
    int cp = 1;   // context parallel
    int etp = 1;  // the routed experts' tensor parallel (apart from TP)
    int per_stage() const { return tp * cp; }
};

// ConfigError unless the model and the node can take these shards: TP dividing the GPUs of a node, the heads, the
// key/value heads and the hidden and FFN sizes; the sequence divisible by TP (sequence parallelism) and by 2 CP
// (causal load balance); ETP dividing the experts' FFN.
void check_shards(const ModelConfig& cfg, const DevicePreset& dev, const Shards& sh);

struct ChunkComm {
    double tp_f = 0, tp_b = 0;  // exposed TP seconds of a forward chunk and of its backward (the B part)
    double cp_f = 0, cp_b = 0;  // exposed CP seconds, likewise
    double f() const { return tp_f + cp_f; }
    double b() const { return tp_b + cp_b; }
};

// The exposed TP and CP communication of layers [first, first + layers) on `tokens` tokens per microbatch.
ChunkComm shard_comm(const CostModel& cm, const ModelConfig& cfg, int first, int layers, int tokens, const Shards& sh,
                     double elem_bytes, bool fp8, LinkClass cp_link);

}  // namespace duplex
