// ZeRO-1 AdamW over a data-parallel group: every rank holds all parameters and gradients, but the fp32
// optimizer state (and the update) of only its 1/d shard. One step is
//   reduce-scatter the gradients (sum, rank order: deterministic) -> AdamW on the local shard
//   -> all-gather the updated weights,
// which moves as many bytes as one all-reduce. Clipping uses the global gradient norm: reduce() returns this
// rank's share of the squared norm, the caller sums those over every group that owns parameters and
// passes the resulting scale to apply().
//
//   Zero1AdamW<float> opt(dp_comm, {{w.data(), g.data(), n}, ...}, adamw);
//   double local_sq = opt.reduce();                         // after backward
//   double total = ...sum local_sq over ranks...;
//   opt.apply(step, clip > 0 ? std::min(1.0, clip / sqrt(total)) : 1.0);
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "comm/communicator.hpp"
#include "kernels/cpu/ops.hpp"

namespace duplex {

template <typename T>
struct ParamRef {
    T* value;
    T* grad;
    size_t numel;
};

template <typename T>
class Zero1AdamW {
public:
    Zero1AdamW(std::shared_ptr<Communicator> group, std::vector<ParamRef<T>> params, kernels::AdamWConfig config,
               std::vector<double> weight_decay_per_param = {});
    // Reduce-scatters the gradients; returns the squared norm of this rank's reduced shard.
    double reduce();
    // AdamW on the shard with gradients scaled by clip_scale, then all-gathers the weights.
    void apply(long step, double clip_scale);
    size_t shard_size() const { return shard_; }
    size_t total_size() const { return total_; }
    // This rank's optimizer state, for checkpoints: AdamW's moments of elements [shard_begin(), shard_begin() +
    // shard_size()) of the flat parameter vector (the parameters in order, padded to the group size).
    size_t shard_begin() const { return size_t(group_->rank()) * shard_; }
    std::vector<T>& first_moment() { return m_; }
    std::vector<T>& second_moment() { return v_; }

private:
    void gather_flat(bool grads, std::span<T> out) const;
    void scatter_flat(std::span<const T> in);
    std::shared_ptr<Communicator> group_;
    std::vector<ParamRef<T>> params_;
    kernels::AdamWConfig config_;
    std::vector<double> decay_of_element_;  // per shard element (norms are not decayed)
    size_t total_ = 0, shard_ = 0;
    // The flat parameters/gradients and this rank's updated shard: the buffers the collectives send from, so from the
    // group's allocator (UCX: its shared arena, copied by the receivers out of a mapping).
    HostBuffer flat_memory_, mine_memory_;
    std::span<T> flat_, mine_;
    std::vector<T> shard_grad_, m_, v_;
};

}  // namespace duplex
