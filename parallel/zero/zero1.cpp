#include "parallel/zero1.hpp"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

template <typename T>
Zero1AdamW<T>::Zero1AdamW(std::shared_ptr<Communicator> group, std::vector<ParamRef<T>> params,
                          kernels::AdamWConfig config, std::vector<double> weight_decay_per_param)
    : group_(std::move(group)), params_(std::move(params)), config_(config) {
    DUPLEX_CHECK_ARG(weight_decay_per_param.empty() || weight_decay_per_param.size() == params_.size(),
                     "weight decay list", "{} entries for {} parameters", weight_decay_per_param.size(), params_.size());
    for (const auto& p : params_) total_ += p.numel;
    size_t d = static_cast<size_t>(group_->size());
    shard_ = (total_ + d - 1) / d;  // the flat buffer is padded to d * shard_
    flat_memory_ = group_->allocate_host(shard_ * d * sizeof(T));
    mine_memory_ = group_->allocate_host(shard_ * sizeof(T));
    flat_ = flat_memory_.as<T>().first(shard_ * d);
    mine_ = mine_memory_.as<T>().first(shard_);
    std::fill(flat_.begin(), flat_.end(), T(0));
    shard_grad_.assign(shard_, T(0));
    m_.assign(shard_, T(0));
    v_.assign(shard_, T(0));
    decay_of_element_.assign(shard_, config.weight_decay);
    size_t offset = 0, begin = size_t(group_->rank()) * shard_;
    for (size_t i = 0; i < params_.size(); ++i) {
        double wd = weight_decay_per_param.empty() ? config.weight_decay : weight_decay_per_param[i];
        for (size_t j = 0; j < params_[i].numel; ++j, ++offset)
            if (offset >= begin && offset < begin + shard_) decay_of_element_[offset - begin] = wd;
    }
}

template <typename T>
void Zero1AdamW<T>::gather_flat(bool grads, std::span<T> out) const {
    size_t offset = 0;
    for (const auto& p : params_) {
        std::memcpy(out.data() + offset, grads ? p.grad : p.value, p.numel * sizeof(T));
        offset += p.numel;
    }
    std::fill(out.begin() + long(offset), out.end(), T(0));
}

template <typename T>
void Zero1AdamW<T>::scatter_flat(std::span<const T> in) {
    size_t offset = 0;
    for (auto& p : params_) {
        std::memcpy(p.value, in.data() + offset, p.numel * sizeof(T));
        offset += p.numel;
    }
}

template <typename T>
double Zero1AdamW<T>::reduce() {
    gather_flat(true, flat_);
    group_->reduce_scatter(flat_.data(), shard_grad_.data(), shard_, dtype_of<T>())->wait();
    return kernels::sum_squares<T>(shard_grad_.data(), shard_);
}

template <typename T>
void Zero1AdamW<T>::apply(long step, double clip_scale) {
    gather_flat(false, flat_);
    size_t begin = size_t(group_->rank()) * shard_;
    T* shard = flat_.data() + begin;
    if (clip_scale != 1.0)
        for (T& g : shard_grad_) g = T(g * clip_scale);
    // Runs of equal weight decay share one AdamW call.
    kernels::AdamWConfig c = config_;
    for (size_t i = 0; i < shard_;) {
        size_t j = i;
        while (j < shard_ && decay_of_element_[j] == decay_of_element_[i]) ++j;
        c.weight_decay = decay_of_element_[i];
        kernels::adamw_step<T>(shard + i, shard_grad_.data() + i, m_.data() + i, v_.data() + i, j - i, c, step);
        i = j;
    }
    std::copy(shard, shard + shard_, mine_.begin());
    group_->all_gather(mine_.data(), flat_.data(), shard_ * sizeof(T))->wait();
    scatter_flat(flat_);
}

template class Zero1AdamW<float>;
template class Zero1AdamW<double>;

}  // namespace duplex
