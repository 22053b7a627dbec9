#include "runtime/model/expert_exchange.hpp"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "core/error.hpp"

namespace duplex {

namespace {

// Rows of `per_peer[p]` (width values each) to every peer p of the group; returns what each peer sent here. The
// flat send and receive buffers come from `staging` (the group's allocator: UCX's shared arena) and go back to it.
template <typename T>
std::vector<std::vector<T>> exchange_rows(Communicator& group, HostBufferPool& staging,
                                          const std::vector<std::vector<T>>& per_peer, int width) {
    int n = group.size();
    std::vector<size_t> sb(n), so(n), rb(n), ro(n);
    std::vector<int64_t> send_rows(n), recv_rows(n);
    for (int p = 0; p < n; ++p) send_rows[p] = int64_t(per_peer[p].size() / size_t(std::max(width, 1)));
    group.all_to_all(send_rows.data(), recv_rows.data(), sizeof(int64_t))->wait();
    size_t sent = 0;
    for (int p = 0; p < n; ++p) {
        so[p] = sent * sizeof(T);
        sb[p] = per_peer[p].size() * sizeof(T);
        sent += per_peer[p].size();
    }
    size_t total = 0;
    for (int p = 0; p < n; ++p) {
        ro[p] = total * sizeof(T);
        rb[p] = size_t(recv_rows[p]) * width * sizeof(T);
        total += size_t(recv_rows[p]) * width;
    }
    HostBuffer send = staging.take(sent * sizeof(T)), recv = staging.take(total * sizeof(T));
    auto s = static_cast<T*>(send.data());
    auto r = static_cast<const T*>(recv.data());
    for (int p = 0; p < n; ++p) std::copy(per_peer[p].begin(), per_peer[p].end(), s + so[p] / sizeof(T));
    group.all_to_all_v(s, sb, so, recv.data(), rb, ro)->wait();
    std::vector<std::vector<T>> out(n);
    for (int p = 0; p < n; ++p) out[p].assign(r + ro[p] / sizeof(T), r + (ro[p] + rb[p]) / sizeof(T));
    staging.give(std::move(send));
    staging.give(std::move(recv));
    return out;
}

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

// y[t] = sum over k (in slot order) of gate * output of slot (t, k).
template <typename T>
void weighted_sum(const T* slot_outputs, const Routing& r, int dim, T* y) {
    for (int t = 0; t < r.tokens; ++t) {
        T* yt = y + size_t(t) * dim;
        std::fill(yt, yt + dim, T(0));
        for (int k = 0; k < r.top_k; ++k) {
            size_t slot = size_t(t) * r.top_k + k;
            T g = T(r.gate[slot]);
            const T* o = slot_outputs + slot * dim;
            for (int i = 0; i < dim; ++i) yt[i] += g * o[i];
        }
    }
}

// One slot's part of the combine backward: d output = gate * dy, d gate = dy . output.
template <typename T>
double slot_gradient(T gate, const T* dy, const T* output, int dim, T* d_output) {
    double acc = 0;
    for (int i = 0; i < dim; ++i) {
        d_output[i] = gate * dy[i];
        acc += double(dy[i]) * output[i];
    }
    return acc;
}

template <typename T>
void slot_gradients(const T* slot_outputs, const T* dy, const Routing& r, int dim, std::vector<T>& dy_slots,
                    std::vector<double>& d_gate) {
    size_t slots = size_t(r.tokens) * r.top_k;
    dy_slots.resize(slots * dim);
    d_gate.resize(slots);
    for (size_t slot = 0; slot < slots; ++slot)
        d_gate[slot] = slot_gradient(T(r.gate[slot]), dy + (slot / r.top_k) * dim, slot_outputs + slot * dim, dim,
                                     dy_slots.data() + slot * dim);
}

template <typename T>
void add_rows_in_slot_order(std::vector<std::pair<int, const T*>> by_slot, int dim, int top_k, T* dx) {
    // NOTE: per token in slot order (k = 0..K-1), so the sum does not depend on expert placement.
    std::sort(by_slot.begin(), by_slot.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    for (const auto& [slot, row] : by_slot) {
        T* d = dx + size_t(slot / top_k) * dim;
        for (int c = 0; c < dim; ++c) d[c] += row[c];
    }
}

}  // namespace

// ---- the expert-major path's defaults: an exchange or transport without it refuses ----

template <typename T>
std::shared_ptr<ResidentRows> RowTransport<T>::exchange_to_experts(const std::vector<std::vector<T>>&,
                                                                   const std::vector<std::vector<int64_t>>&, int) {
    throw Error("this row transport hands rows over on the host (rows_stay_on() is kRowsMove)");
}

template <typename T>
std::vector<std::vector<T>> RowTransport<T>::exchange_from_experts(const ResidentRows&,
                                                                   const std::vector<std::vector<int64_t>>&, int) {
    throw Error("this row transport hands rows over on the host (rows_stay_on() is kRowsMove)");
}

template <typename T>
void ExpertExchange<T>::combine_resident(RoutedTokens<T>&, const ResidentRows&, int, const Routing&, T*) {
    throw Error("this expert exchange hands rows over on the host (rows_stay_on() is kRowsMove)");
}

template <typename T>
void ExpertExchange<T>::combine_backward_resident(RoutedTokens<T>&, const T*, int, const Routing&,
                                                  std::shared_ptr<ResidentRows>&, std::vector<double>&) {
    throw Error("this expert exchange hands rows over on the host (rows_stay_on() is kRowsMove)");
}

template <typename T>
void ExpertExchange<T>::dispatch_backward_resident(const RoutedTokens<T>&, const ResidentRows&, int, const Routing&,
                                                   T*) {
    throw Error("this expert exchange hands rows over on the host (rows_stay_on() is kRowsMove)");
}

// ---- LocalExchange ----

template <typename T>
void LocalExchange<T>::dispatch(const T* x, int dim, const Routing& r, RoutedTokens<T>& out) {
    out.slots.assign(experts_, {});
    out.rows.assign(experts_, {});
    for (int slot = 0; slot < r.tokens * r.top_k; ++slot) out.slots[r.expert[slot]].push_back(slot);
    for (int e = 0; e < experts_; ++e) {
        out.rows[e].resize(out.slots[e].size() * size_t(dim));
        for (size_t i = 0; i < out.slots[e].size(); ++i)
            std::memcpy(&out.rows[e][i * dim], x + size_t(out.slots[e][i] / r.top_k) * dim, sizeof(T) * dim);
    }
}

template <typename T>
void LocalExchange<T>::combine(RoutedTokens<T>& routed, const std::vector<std::vector<T>>& outputs, int dim,
                               const Routing& r, T* y) {
    routed.slot_outputs.assign(size_t(r.tokens) * r.top_k * dim, T(0));
    for (int e = 0; e < experts_; ++e)
        for (size_t i = 0; i < routed.slots[e].size(); ++i)
            std::memcpy(routed.slot_outputs.data() + size_t(routed.slots[e][i]) * dim, &outputs[e][i * dim],
                        sizeof(T) * dim);
    weighted_sum(routed.slot_outputs.data(), r, dim, y);
}

template <typename T>
void LocalExchange<T>::combine_backward(RoutedTokens<T>& routed, const T* dy, int dim, const Routing& r,
                                        std::vector<std::vector<T>>& d_outputs, std::vector<double>& d_gate) {
    std::vector<T> dy_slots;
    slot_gradients(routed.slot_outputs.data(), dy, r, dim, dy_slots, d_gate);
    d_outputs.assign(experts_, {});
    for (int e = 0; e < experts_; ++e) {
        d_outputs[e].resize(routed.slots[e].size() * size_t(dim));
        for (size_t i = 0; i < routed.slots[e].size(); ++i)
            std::memcpy(&d_outputs[e][i * dim], dy_slots.data() + size_t(routed.slots[e][i]) * dim, sizeof(T) * dim);
    }
}

template <typename T>
void LocalExchange<T>::dispatch_backward(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& d_rows,
                                         int dim, const Routing& r, T* dx) {
    std::vector<std::pair<int, const T*>> by_slot;
    for (int e = 0; e < experts_; ++e)
        for (size_t i = 0; i < routed.slots[e].size(); ++i) by_slot.push_back({routed.slots[e][i], &d_rows[e][i * dim]});
    add_rows_in_slot_order(std::move(by_slot), dim, r.top_k, dx);
}

// ---- DistributedExchange (flat: one copy per expert) ----

template <typename T>
DistributedExchange<T>::DistributedExchange(std::shared_ptr<Communicator> group, int experts)
    : group_(std::move(group)), experts_(experts), placement_(experts, group_->size()) {
    per_rank_ = placement_.per_rank();
    staging_ = std::make_shared<HostBufferPool>([g = group_](size_t bytes) { return g->allocate_host(bytes); });
}

template <typename T>
std::vector<std::vector<T>> DistributedExchange<T>::move(const std::vector<std::vector<T>>& per_peer, int width) {
    if (!transport_) return exchange_rows(*group_, *staging_, per_peer, width);
    std::vector<std::vector<T>> out;
    out = transport_->exchange(per_peer, width);
    return out;
}

template <typename T>
void DistributedExchange<T>::dispatch(const T* x, int dim, const Routing& r, RoutedTokens<T>& out) {
    int n = group_->size();
    // Each peer's rows grouped by its local expert (slots ascending within one): the expert-major path writes the
    // groups straight into place, and the rows of an expert come in the same order on every path.
    std::vector<std::vector<int>> by_expert(experts_);
    for (int slot = 0; slot < r.tokens * r.top_k; ++slot) by_expert[r.expert[slot]].push_back(slot);
    out.sent_slots.assign(n, {});
    out.sent_counts.assign(n, std::vector<int64_t>(per_rank_, 0));
    for (int e = 0; e < experts_; ++e) {  // a rank's experts are consecutive
        int p = owner(e);
        out.sent_counts[p][e - placement_.first_expert(p)] = int64_t(by_expert[e].size());
        out.sent_slots[p].insert(out.sent_slots[p].end(), by_expert[e].begin(), by_expert[e].end());
    }
    // Metadata travels as rows of ExchangeWire::kFlatMeta values: (slot, expert) encoded in T (exact for small
    // integers). The moves are parallel/expert_plan.hpp's exchange_traffic, in its order.
    constexpr int kMeta = ExchangeWire::kFlatMeta;
    std::vector<std::vector<T>> meta(n), rows(n);
    for (int p = 0; p < n; ++p)
        for (int slot : out.sent_slots[p]) {
            meta[p].push_back(T(slot));
            meta[p].push_back(T(r.expert[slot]));
            const T* row = x + size_t(slot / r.top_k) * dim;
            rows[p].insert(rows[p].end(), row, row + dim);
        }
    auto meta_in = this->move(meta, kMeta);
    bool keep = out.keep_rows && rows_stay_on() != kRowsMove;
    out.resident.reset();
    std::vector<std::vector<T>> rows_in;
    if (keep)
        out.resident = transport_->exchange_to_experts(rows, out.sent_counts, dim);
    else
        rows_in = this->move(rows, dim);
    out.slots.assign(per_rank_, {});
    out.rows.assign(per_rank_, {});
    out.received.assign(n, {});
    for (int p = 0; p < n; ++p) {
        for (size_t i = 0; i < meta_in[p].size() / kMeta; ++i) {
            int slot = int(meta_in[p][kMeta * i]), e = int(meta_in[p][kMeta * i + 1]) - first_local_expert();
            if (e < 0 || e >= per_rank_)
                throw CommError(fmt::format("rank {}: received a token for expert {} it does not hold", group_->rank(),
                                            e + first_local_expert()));
            out.received[p].push_back({e, int(out.slots[e].size())});
            out.slots[e].push_back(slot);
            if (!keep)
                out.rows[e].insert(out.rows[e].end(), rows_in[p].begin() + long(i * dim),
                                   rows_in[p].begin() + long((i + 1) * dim));
        }
    }
    if (keep)
        for (int e = 0; e < per_rank_; ++e)
            if (out.resident->rows(e) != int64_t(out.slots[e].size()))
                throw CommError(fmt::format("rank {}: expert {} got {} rows and {} slots", group_->rank(),
                                            e + first_local_expert(), out.resident->rows(e), out.slots[e].size()));
}

namespace {

// The combine on the token's rank: what came back from each peer (its slots in sent order) -> y.
template <typename T>
void combine_returned(RoutedTokens<T>& routed, const std::vector<std::vector<T>>& got, int dim, const Routing& r, T* y) {
    routed.slot_outputs.assign(size_t(r.tokens) * r.top_k * dim, T(0));
    for (size_t p = 0; p < routed.sent_slots.size(); ++p)
        for (size_t i = 0; i < routed.sent_slots[p].size(); ++i)
            std::memcpy(routed.slot_outputs.data() + size_t(routed.sent_slots[p][i]) * dim, got[p].data() + i * dim,
                        sizeof(T) * dim);
    weighted_sum(routed.slot_outputs.data(), r, dim, y);
}

// The dispatch backward on the token's rank: the input-row gradients that came back -> dx, in slot order.
template <typename T>
void add_returned(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& got, int dim, const Routing& r,
                  T* dx) {
    std::vector<std::pair<int, const T*>> by_slot;
    for (size_t p = 0; p < routed.sent_slots.size(); ++p)
        for (size_t i = 0; i < routed.sent_slots[p].size(); ++i)
            by_slot.push_back({routed.sent_slots[p][i], got[p].data() + i * dim});
    add_rows_in_slot_order(std::move(by_slot), dim, r.top_k, dx);
}

}  // namespace

template <typename T>
void DistributedExchange<T>::combine(RoutedTokens<T>& routed, const std::vector<std::vector<T>>& outputs, int dim,
                                     const Routing& r, T* y) {
    combine_returned(routed, this->move(rows_for_senders(routed, outputs, dim), dim), dim, r, y);
}

template <typename T>
std::vector<std::vector<T>> DistributedExchange<T>::slot_rows_for_peers(const RoutedTokens<T>& routed,
                                                                        const std::vector<T>& dy_slots, int dim) {
    std::vector<std::vector<T>> rows(group_->size());
    for (size_t p = 0; p < rows.size(); ++p)
        for (int slot : routed.sent_slots[p])
            rows[p].insert(rows[p].end(), dy_slots.data() + size_t(slot) * dim, dy_slots.data() + size_t(slot + 1) * dim);
    return rows;
}

template <typename T>
void DistributedExchange<T>::combine_backward(RoutedTokens<T>& routed, const T* dy, int dim, const Routing& r,
                                              std::vector<std::vector<T>>& d_outputs, std::vector<double>& d_gate) {
    std::vector<T> dy_slots;
    slot_gradients(routed.slot_outputs.data(), dy, r, dim, dy_slots, d_gate);
    auto got = this->move(slot_rows_for_peers(routed, dy_slots, dim), dim);
    d_outputs.assign(per_rank_, {});
    for (int e = 0; e < per_rank_; ++e) d_outputs[e].resize(routed.slots[e].size() * size_t(dim));
    for (int p = 0; p < group_->size(); ++p)
        for (size_t i = 0; i < routed.received[p].size(); ++i) {
            auto [e, row] = routed.received[p][i];
            std::memcpy(d_outputs[e].data() + size_t(row) * dim, got[p].data() + i * dim, sizeof(T) * dim);
        }
}

template <typename T>
void DistributedExchange<T>::dispatch_backward(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& d_rows,
                                               int dim, const Routing& r, T* dx) {
    add_returned(routed, this->move(rows_for_senders(routed, d_rows, dim), dim), dim, r, dx);
}

template <typename T>
void DistributedExchange<T>::combine_resident(RoutedTokens<T>& routed, const ResidentRows& outputs, int dim,
                                              const Routing& r, T* y) {
    std::vector<std::vector<T>> got;
    got = transport_->exchange_from_experts(outputs, routed.sent_counts, dim);
    combine_returned(routed, got, dim, r, y);
}

template <typename T>
void DistributedExchange<T>::combine_backward_resident(RoutedTokens<T>& routed, const T* dy, int dim, const Routing& r,
                                                       std::shared_ptr<ResidentRows>& d_outputs,
                                                       std::vector<double>& d_gate) {
    std::vector<T> dy_slots;
    slot_gradients(routed.slot_outputs.data(), dy, r, dim, dy_slots, d_gate);
    auto rows = slot_rows_for_peers(routed, dy_slots, dim);
    d_outputs = transport_->exchange_to_experts(rows, routed.sent_counts, dim);
}

template <typename T>
void DistributedExchange<T>::dispatch_backward_resident(const RoutedTokens<T>& routed, const ResidentRows& d_rows,
                                                        int dim, const Routing& r, T* dx) {
    std::vector<std::vector<T>> got;
    got = transport_->exchange_from_experts(d_rows, routed.sent_counts, dim);
    add_returned(routed, got, dim, r, dx);
}

// ---- HierarchicalExchange (node-limited, two hops) ----

template <typename T>
HierarchicalExchange<T>::HierarchicalExchange(std::shared_ptr<Communicator> group, int experts)
    : DistributedExchange<T>(std::move(group), experts) {
    const Topology& tp = group_->topology();
    for (int node = 0; node < tp.num_nodes(); ++node)
        DUPLEX_CHECK_ARG(tp.local_size(node) == tp.local_size(0), "--virtual-nodes",
                         "the node-limited dispatch needs equal ranks per node in an EP group ({})", tp.describe());
}

template <typename T>
int HierarchicalExchange<T>::relay_for(int expert) const {
    return relay_rank(owner(expert), group_->rank(), group_->topology());
}

template <typename T>
void HierarchicalExchange<T>::dispatch(const T* x, int dim, const Routing& r, RoutedTokens<T>& out) {
    int n = group_->size(), me = group_->rank(), K = r.top_k;
    const Topology& tp = group_->topology();
    // Hop 1: one row per (token, target node) to the relay there, with (slot, expert, gate) per slot. The moves
    // are parallel/expert_plan.hpp's exchange_traffic, in its order.
    constexpr int kMeta = ExchangeWire::kToRelayMeta, kForward = ExchangeWire::kForwardMeta;
    out.sent_slots.assign(n, {});
    out.sent_tokens.assign(n, {});
    std::vector<std::vector<T>> meta(n), rows(n);
    for (int t = 0; t < r.tokens; ++t)
        for (int k = 0; k < K; ++k) {
            int slot = t * K + k, e = r.expert[slot], p = relay_for(e);
            meta[p].insert(meta[p].end(), {T(slot), T(e), T(r.gate[slot])});
            out.sent_slots[p].push_back(slot);
            if (out.sent_tokens[p].empty() || out.sent_tokens[p].back() != t) {
                out.sent_tokens[p].push_back(t);
                rows[p].insert(rows[p].end(), x + size_t(t) * dim, x + size_t(t + 1) * dim);
            }
        }
    auto meta_in = this->move(meta, kMeta);
    auto rows_in = this->move(rows, dim);
    // Hop 2 (inside the node): the relay forwards one row per slot to the expert's rank.
    out.forwarded.clear();
    out.rows_from.assign(n, 0);
    std::vector<std::vector<T>> fmeta(n), frows(n);
    for (int p = 0; p < n; ++p) {
        int row = -1, prev = -1;
        for (size_t i = 0; i < meta_in[p].size() / kMeta; ++i) {
            int slot = int(meta_in[p][kMeta * i]), e = int(meta_in[p][kMeta * i + 1]);
            if (slot / K != prev) ++row, prev = slot / K;
            int q = owner(e);
            if (q < 0 || q >= n || !tp.same_node(q, me))
                throw CommError(fmt::format("rank {}: relayed a token for expert {} outside its node", me, e));
            out.forwarded.push_back({p, row, q, meta_in[p][kMeta * i + 2]});
            fmeta[q].push_back(T(e));
            frows[q].insert(frows[q].end(), rows_in[p].begin() + long(size_t(row) * dim),
                            rows_in[p].begin() + long(size_t(row + 1) * dim));
        }
        out.rows_from[p] = row + 1;
    }
    auto emeta = this->move(fmeta, kForward);
    auto erows = this->move(frows, dim);
    out.slots.assign(per_rank_, {});
    out.rows.assign(per_rank_, {});
    out.received.assign(n, {});
    for (int q = 0; q < n; ++q)
        for (size_t i = 0; i < emeta[q].size(); ++i) {
            int e = int(emeta[q][i]) - this->first_local_expert();
            if (e < 0 || e >= per_rank_)
                throw CommError(fmt::format("rank {}: received a token for expert {} it does not hold", me,
                                            e + this->first_local_expert()));
            out.received[q].push_back({e, int(out.slots[e].size())});
            out.slots[e].push_back(int(out.slots[e].size()));
            out.rows[e].insert(out.rows[e].end(), erows[q].begin() + long(i * dim), erows[q].begin() + long((i + 1) * dim));
        }
}

namespace {
// Per-node partial rows that came back from the relays -> added into y (or dx) per token, in node order.
template <typename T>
void add_node_partials(const Topology& tp, int me, const RoutedTokens<T>& routed,
                       const std::vector<std::vector<T>>& partials, int dim, T* y) {
    for (int node = 0; node < tp.num_nodes(); ++node) {
        int p = tp.ranks_on_node(node)[tp.local_rank(me)];
        for (size_t j = 0; j < routed.sent_tokens[p].size(); ++j) {
            T* yt = y + size_t(routed.sent_tokens[p][j]) * dim;
            const T* part = partials[p].data() + j * dim;
            for (int i = 0; i < dim; ++i) yt[i] += part[i];
        }
    }
}

// On a relay: the rows the experts returned (per expert rank, in forwarding order), one per forwarded slot.
template <typename T>
std::vector<const T*> rows_per_forwarded(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& got, int dim) {
    std::vector<size_t> cursor(got.size(), 0);
    std::vector<const T*> out;
    out.reserve(routed.forwarded.size());
    for (const auto& f : routed.forwarded) out.push_back(got[f.dest].data() + (cursor[f.dest]++) * dim);
    return out;
}
}  // namespace

template <typename T>
void HierarchicalExchange<T>::combine(RoutedTokens<T>& routed, const std::vector<std::vector<T>>& outputs, int dim,
                                      const Routing& r, T* y) {
    int n = group_->size();
    auto got = this->move(rows_for_senders(routed, outputs, dim), dim);  // experts -> relays
    auto out_rows = rows_per_forwarded(routed, got, dim);
    // The relay sums gate * output per token (slot order) before the crossing back.
    routed.relay_outputs.resize(routed.forwarded.size() * dim);
    std::vector<std::vector<T>> partial(n);
    for (int p = 0; p < n; ++p) partial[p].assign(size_t(routed.rows_from[p]) * dim, T(0));
    for (size_t i = 0; i < routed.forwarded.size(); ++i) {
        const auto& f = routed.forwarded[i];
        std::memcpy(routed.relay_outputs.data() + i * dim, out_rows[i], sizeof(T) * dim);
        T* acc = partial[f.src].data() + size_t(f.row) * dim;
        for (int c = 0; c < dim; ++c) acc[c] += f.gate * out_rows[i][c];
    }
    auto back = this->move(partial, dim);  // relays -> tokens
    std::fill(y, y + size_t(r.tokens) * dim, T(0));
    add_node_partials(group_->topology(), group_->rank(), routed, back, dim, y);
}

template <typename T>
void HierarchicalExchange<T>::combine_backward(RoutedTokens<T>& routed, const T* dy, int dim, const Routing& r,
                                               std::vector<std::vector<T>>& d_outputs, std::vector<double>& d_gate) {
    int n = group_->size();
    // dy crosses once per (token, node), to the relay.
    std::vector<std::vector<T>> rows(n);
    for (int p = 0; p < n; ++p)
        for (int t : routed.sent_tokens[p]) rows[p].insert(rows[p].end(), dy + size_t(t) * dim, dy + size_t(t + 1) * dim);
    auto dy_in = this->move(rows, dim);
    // The relay: d output = gate * dy to the expert's rank; d gate = dy . output back to the token's rank.
    std::vector<std::vector<T>> d_out(n), d_g(n);
    std::vector<T> d_row(dim);
    for (size_t i = 0; i < routed.forwarded.size(); ++i) {
        const auto& f = routed.forwarded[i];
        double g = slot_gradient(f.gate, dy_in[f.src].data() + size_t(f.row) * dim, routed.relay_outputs.data() + i * dim,
                                 dim, d_row.data());
        d_out[f.dest].insert(d_out[f.dest].end(), d_row.begin(), d_row.end());
        d_g[f.src].push_back(T(g));
    }
    auto got = this->move(d_out, dim);
    auto gates = this->move(d_g, ExchangeWire::kGateGradient);
    d_outputs.assign(per_rank_, {});
    for (int e = 0; e < per_rank_; ++e) d_outputs[e].resize(routed.slots[e].size() * size_t(dim));
    for (int q = 0; q < n; ++q)
        for (size_t i = 0; i < routed.received[q].size(); ++i) {
            auto [e, row] = routed.received[q][i];
            std::memcpy(d_outputs[e].data() + size_t(row) * dim, got[q].data() + i * dim, sizeof(T) * dim);
        }
    d_gate.assign(size_t(r.tokens) * r.top_k, 0.0);
    for (int p = 0; p < n; ++p)
        for (size_t i = 0; i < routed.sent_slots[p].size(); ++i) d_gate[size_t(routed.sent_slots[p][i])] = gates[p][i];
}

template <typename T>
void HierarchicalExchange<T>::dispatch_backward(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& d_rows,
                                                int dim, const Routing&, T* dx) {
    int n = group_->size();
    auto got = this->move(rows_for_senders(routed, d_rows, dim), dim);  // experts -> relays
    auto in_rows = rows_per_forwarded(routed, got, dim);
    std::vector<std::vector<T>> partial(n);
    for (int p = 0; p < n; ++p) partial[p].assign(size_t(routed.rows_from[p]) * dim, T(0));
    for (size_t i = 0; i < routed.forwarded.size(); ++i) {
        const auto& f = routed.forwarded[i];
        T* acc = partial[f.src].data() + size_t(f.row) * dim;
        for (int c = 0; c < dim; ++c) acc[c] += in_rows[i][c];
    }
    auto back = this->move(partial, dim);  // relays -> tokens, reduced per node
    add_node_partials(group_->topology(), group_->rank(), routed, back, dim, dx);
}

template class RowTransport<float>;
template class RowTransport<double>;
template class ExpertExchange<float>;
template class ExpertExchange<double>;
template class LocalExchange<float>;
template class LocalExchange<double>;
template class DistributedExchange<float>;
template class DistributedExchange<double>;
template class HierarchicalExchange<float>;
template class HierarchicalExchange<double>;

}  // namespace duplex
