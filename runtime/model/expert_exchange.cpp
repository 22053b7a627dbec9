#include "runtime/model/expert_exchange.hpp"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "core/error.hpp"

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

template <typename T>
DistributedExchange<T>::DistributedExchange(std::shared_ptr<Communicator> group, int experts)
    : group_(std::move(group)), experts_(experts) {
    DUPLEX_CHECK_ARG(experts % group_->size() == 0, "--ep", "EP ({}) must divide the {} routed experts", group_->size(),
                     experts);
    per_rank_ = experts / group_->size();
}

template <typename T>
std::vector<std::vector<T>> DistributedExchange<T>::exchange_rows(const std::vector<std::vector<T>>& per_peer, int dim) {
    int n = group_->size();
    std::vector<size_t> sb(n), so(n), rb(n), ro(n);
    std::vector<int64_t> send_rows(n), recv_rows(n);
    for (int p = 0; p < n; ++p) send_rows[p] = int64_t(per_peer[p].size() / size_t(std::max(dim, 1)));
    group_->all_to_all(send_rows.data(), recv_rows.data(), sizeof(int64_t))->wait();
    std::vector<T> send;
    for (int p = 0; p < n; ++p) {
        so[p] = send.size() * sizeof(T);
        sb[p] = per_peer[p].size() * sizeof(T);
        send.insert(send.end(), per_peer[p].begin(), per_peer[p].end());
    }
    size_t total = 0;
    for (int p = 0; p < n; ++p) {
        ro[p] = total * sizeof(T);
        rb[p] = size_t(recv_rows[p]) * dim * sizeof(T);
        total += size_t(recv_rows[p]) * dim;
    }
    std::vector<T> recv(total);
    group_->all_to_all_v(send.data(), sb, so, recv.data(), rb, ro)->wait();
    std::vector<std::vector<T>> out(n);
    for (int p = 0; p < n; ++p)
        out[p].assign(recv.begin() + long(ro[p] / sizeof(T)), recv.begin() + long((ro[p] + rb[p]) / sizeof(T)));
    return out;
}

namespace {
// Rows of per-expert data, regrouped per sender in the order that sender sent them.
template <typename T>
std::vector<std::vector<T>> rows_for_senders(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& data,
                                             int dim) {
    std::vector<std::vector<T>> back(routed.received.size());
    for (size_t p = 0; p < routed.received.size(); ++p)
        for (auto [e, row] : routed.received[p])
            back[p].insert(back[p].end(), data[e].begin() + long(size_t(row) * dim),
                           data[e].begin() + long(size_t(row + 1) * dim));
    return back;
}
}  // namespace

template <typename T>
void DistributedExchange<T>::dispatch(const T* x, int tokens, int dim, const Routing& r, RoutedTokens<T>& out) {
    int n = group_->size();
    out.sent_slots.assign(n, {});
    for (int slot = 0; slot < tokens * r.top_k; ++slot) out.sent_slots[r.expert[slot] / per_rank_].push_back(slot);
    // Metadata travels as rows of one value: (slot, expert) pairs encoded in T (exact for small integers).
    std::vector<std::vector<T>> meta(n), rows(n);
    for (int p = 0; p < n; ++p)
        for (int slot : out.sent_slots[p]) {
            meta[p].push_back(T(slot));
            meta[p].push_back(T(r.expert[slot]));
            const T* row = x + size_t(slot / r.top_k) * dim;
            rows[p].insert(rows[p].end(), row, row + dim);
        }
    auto meta_in = exchange_rows(meta, 2);
    auto rows_in = exchange_rows(rows, dim);
    out.slots.assign(per_rank_, {});
    out.rows.assign(per_rank_, {});
    out.received.assign(n, {});
    for (int p = 0; p < n; ++p) {
        for (size_t i = 0; i < meta_in[p].size() / 2; ++i) {
            int slot = int(meta_in[p][2 * i]), e = int(meta_in[p][2 * i + 1]) - first_local_expert();
            if (e < 0 || e >= per_rank_)
                throw CommError(fmt::format("rank {}: received a token for expert {} it does not hold", group_->rank(),
                                            e + first_local_expert()));
            out.received[p].push_back({e, int(out.slots[e].size())});
            out.slots[e].push_back(slot);
            out.rows[e].insert(out.rows[e].end(), rows_in[p].begin() + long(i * dim), rows_in[p].begin() + long((i + 1) * dim));
        }
    }
}

template <typename T>
void DistributedExchange<T>::combine(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& outputs, int tokens,
                                     int dim, int top_k, T* y_slots) {
    int n = group_->size();
    auto got = exchange_rows(rows_for_senders(routed, outputs, dim), dim);
    std::fill(y_slots, y_slots + size_t(tokens) * top_k * dim, T(0));
    for (int p = 0; p < n; ++p)
        for (size_t i = 0; i < routed.sent_slots[p].size(); ++i)
            std::memcpy(y_slots + size_t(routed.sent_slots[p][i]) * dim, got[p].data() + i * dim, sizeof(T) * dim);
}

template <typename T>
void DistributedExchange<T>::combine_backward(const RoutedTokens<T>& routed, const T* dy_slots, int, int dim, int,
                                              std::vector<std::vector<T>>& d_outputs) {
    int n = group_->size();
    std::vector<std::vector<T>> rows(n);
    for (int p = 0; p < n; ++p)
        for (int slot : routed.sent_slots[p])
            rows[p].insert(rows[p].end(), dy_slots + size_t(slot) * dim, dy_slots + size_t(slot + 1) * dim);
    auto got = exchange_rows(rows, dim);
    d_outputs.assign(per_rank_, {});
    for (int e = 0; e < per_rank_; ++e) d_outputs[e].resize(routed.slots[e].size() * size_t(dim));
    for (int p = 0; p < n; ++p)
        for (size_t i = 0; i < routed.received[p].size(); ++i) {
            auto [e, row] = routed.received[p][i];
            std::memcpy(d_outputs[e].data() + size_t(row) * dim, got[p].data() + i * dim, sizeof(T) * dim);
        }
}

template <typename T>
void DistributedExchange<T>::dispatch_backward(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& d_rows,
                                               int, int dim, int top_k, T* dx) {
    int n = group_->size();
    auto got = exchange_rows(rows_for_senders(routed, d_rows, dim), dim);
    // NOTE: add per token in slot order, as LocalExchange does, so placement never changes the sum.
    std::vector<std::pair<int, const T*>> by_slot;
    for (int p = 0; p < n; ++p)
        for (size_t i = 0; i < routed.sent_slots[p].size(); ++i) by_slot.push_back({routed.sent_slots[p][i], got[p].data() + i * dim});
    std::sort(by_slot.begin(), by_slot.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    for (const auto& [slot, row] : by_slot) {
        T* d = dx + size_t(slot / top_k) * dim;
        for (int c = 0; c < dim; ++c) d[c] += row[c];
    }
}

template class DistributedExchange<float>;
template class DistributedExchange<double>;

template class LocalExchange<float>;
template class LocalExchange<double>;

}  // namespace duplex
