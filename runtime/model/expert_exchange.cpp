#include "runtime/model/expert_exchange.hpp"

#include <algorithm>
#include <cstring>

namespace duplex {

template <typename T>
void LocalExchange<T>::dispatch(const T* x, int tokens, int dim, const Routing& r, RoutedTokens<T>& out) {
    out.slots.assign(experts_, {});
    out.rows.assign(experts_, {});
    for (int slot = 0; slot < tokens * r.top_k; ++slot) out.slots[r.expert[slot]].push_back(slot);
    for (int e = 0; e < experts_; ++e) {
        out.rows[e].resize(out.slots[e].size() * size_t(dim));
        for (size_t i = 0; i < out.slots[e].size(); ++i)
            std::memcpy(&out.rows[e][i * dim], x + size_t(out.slots[e][i] / r.top_k) * dim, sizeof(T) * dim);
    }
}

template <typename T>
void LocalExchange<T>::combine(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& outputs, int tokens,
                               int dim, int top_k, T* y_slots) {
    std::fill(y_slots, y_slots + size_t(tokens) * top_k * dim, T(0));
    for (int e = 0; e < experts_; ++e)
        for (size_t i = 0; i < routed.slots[e].size(); ++i)
            std::memcpy(y_slots + size_t(routed.slots[e][i]) * dim, &outputs[e][i * dim], sizeof(T) * dim);
}

template <typename T>
void LocalExchange<T>::combine_backward(const RoutedTokens<T>& routed, const T* dy_slots, int, int dim, int,
                                        std::vector<std::vector<T>>& d_outputs) {
    d_outputs.assign(experts_, {});
    for (int e = 0; e < experts_; ++e) {
        d_outputs[e].resize(routed.slots[e].size() * size_t(dim));
        for (size_t i = 0; i < routed.slots[e].size(); ++i)
            std::memcpy(&d_outputs[e][i * dim], dy_slots + size_t(routed.slots[e][i]) * dim, sizeof(T) * dim);
    }
}

template <typename T>
void LocalExchange<T>::dispatch_backward(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& d_rows, int,
                                         int dim, int top_k, T* dx) {
    // NOTE: accumulate per token in slot order (k = 0..K-1) so the sum does not depend on expert placement.
    std::vector<std::pair<int, const T*>> by_slot;
    for (int e = 0; e < experts_; ++e)
        for (size_t i = 0; i < routed.slots[e].size(); ++i) by_slot.push_back({routed.slots[e][i], &d_rows[e][i * dim]});
    std::sort(by_slot.begin(), by_slot.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    for (const auto& [slot, row] : by_slot) {
        T* d = dx + size_t(slot / top_k) * dim;
        for (int c = 0; c < dim; ++c) d[c] += row[c];
    }
}

template class LocalExchange<float>;
template class LocalExchange<double>;

}  // namespace duplex
