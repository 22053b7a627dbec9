#include "parallel/expert_plan.hpp"

#include <algorithm>

#include "core/error.hpp"

namespace duplex {

ExpertPlacement::ExpertPlacement(int experts, int ranks) : experts_(experts), ranks_(ranks) {
    DUPLEX_CHECK_ARG(ranks >= 1 && experts >= 1 && experts % ranks == 0, "expert placement",
                     "{} experts do not split evenly over {} ranks", experts, ranks);
    per_rank_ = experts / ranks;
}

std::vector<int> ExpertPlacement::ranks_of(const std::vector<int>& experts) const {
    std::vector<int> out(experts.size());
    for (size_t i = 0; i < experts.size(); ++i) {
        DUPLEX_CHECK_ARG(experts[i] >= 0 && experts[i] < experts_, "expert placement", "expert {} outside 0..{}",
                         experts[i], experts_ - 1);
        out[i] = rank_of(experts[i]);
    }
    return out;
}

ExpertPath choose_path(bool node_limited, const Topology& t) {
    return node_limited && t.num_nodes() > 1 ? ExpertPath::NodeLimited : ExpertPath::Flat;
}

const char* path_name(ExpertPath p) { return p == ExpertPath::NodeLimited ? "node-limited" : "flat"; }

const char* exchange_name(Exchange e) {
    switch (e) {
        case Exchange::Dispatch: return "dispatch";
        case Exchange::Combine: return "combine";
        case Exchange::CombineBackward: return "combine-bwd";
        case Exchange::DispatchBackward: return "dispatch-bwd";
    }
    return "?";
}

int relay_rank(int dest, int me, const Topology& t) {
    const std::vector<int>& on = t.ranks_on_node(t.node(dest));
    int local = t.local_rank(me);
    DUPLEX_CHECK_ARG(local < int(on.size()), "node-limited dispatch",
                     "rank {} has local index {} but node {} has {} ranks: no relay there", me, local, t.node(dest),
                     on.size());
    return on[size_t(local)];
}

DispatchPlan plan_dispatch(ExpertPath path, const std::vector<int>& dest, int tokens, int top_k, const Topology& t,
                           int me) {
    const int n = t.size();
    DUPLEX_CHECK_ARG(int64_t(dest.size()) == int64_t(tokens) * top_k, "dispatch plan", "{} slots for {} tokens x top-{}",
                     dest.size(), tokens, top_k);
    DispatchPlan d;
    d.path = path;
    d.slots_to.assign(n, 0);
    for (int r : dest) {
        DUPLEX_CHECK_ARG(r >= 0 && r < n, "dispatch plan", "slot for rank {} outside the group of {}", r, n);
        ++d.slots_to[size_t(r)];
    }
    if (path == ExpertPath::Flat) return d;
    d.rows_to_relay.assign(n, 0);
    d.slots_via_relay.assign(n, std::vector<int64_t>(size_t(t.local_size(t.node(me))), 0));
    std::vector<int> relays;
    for (int tok = 0; tok < tokens; ++tok) {
        relays.clear();
        for (int k = 0; k < top_k; ++k) {
            int to = dest[size_t(tok) * top_k + k], relay = relay_rank(to, me, t);
            if (std::find(relays.begin(), relays.end(), relay) == relays.end()) relays.push_back(relay), ++d.rows_to_relay[size_t(relay)];
            ++d.slots_via_relay[size_t(relay)][size_t(t.local_rank(to))];
        }
    }
    return d;
}

Arrivals arrivals_at(const std::vector<DispatchPlan>& all, const Topology& t, int me) {
    const int n = int(all.size());
    DUPLEX_CHECK_ARG(n == t.size(), "dispatch plan", "{} plans for a group of {}", n, t.size());
    Arrivals a;
    a.slots_from.assign(n, 0);
    for (int p = 0; p < n; ++p) a.slots_from[size_t(p)] = all[size_t(p)].slots_to[size_t(me)];
    if (all[0].path == ExpertPath::Flat) return a;
    a.rows_from.assign(n, 0);
    a.slots_via_me.assign(n, {});
    a.forwarded_from.assign(n, 0);
    for (int p = 0; p < n; ++p) {
        a.rows_from[size_t(p)] = all[size_t(p)].rows_to_relay[size_t(me)];
        a.slots_via_me[size_t(p)] = all[size_t(p)].slots_via_relay[size_t(me)];
        // Relay r (on my node) forwards to me every slot a source routed through it to my local index.
        for (int r : t.ranks_on_node(t.node(me)))
            a.forwarded_from[size_t(r)] += all[size_t(p)].slots_via_relay[size_t(r)][size_t(t.local_rank(me))];
    }
    return a;
}

namespace {

TrafficMove rows_move(int hop, std::vector<int64_t> rows) {
    TrafficMove m;
    m.hop = hop;
    m.values.assign(rows.size(), 0);
    m.rows = std::move(rows);
    return m;
}

TrafficMove values_move(int hop, const std::vector<int64_t>& slots, int per_slot) {
    TrafficMove m;
    m.hop = hop;
    m.rows.assign(slots.size(), 0);
    for (int64_t s : slots) m.values.push_back(s * per_slot);
    return m;
}

}  // namespace

ExchangeTraffic exchange_traffic(const DispatchPlan& sent, const Arrivals& got, const Topology& t, int me) {
    using W = ExchangeWire;
    ExchangeTraffic x;
    x.path = sent.path;
    auto& dispatch = x.moves[size_t(Exchange::Dispatch)];
    auto& combine = x.moves[size_t(Exchange::Combine)];
    auto& combine_bwd = x.moves[size_t(Exchange::CombineBackward)];
    auto& dispatch_bwd = x.moves[size_t(Exchange::DispatchBackward)];
    if (sent.path == ExpertPath::Flat) {
        // Dispatch: (slot, expert) per slot, then the rows; the other three move one row per slot back or forth.
        dispatch = {values_move(0, sent.slots_to, W::kFlatMeta), rows_move(0, sent.slots_to)};
        combine = {rows_move(0, got.slots_from)};
        combine_bwd = {rows_move(0, sent.slots_to)};
        dispatch_bwd = {rows_move(0, got.slots_from)};
        return x;
    }
    const int n = t.size();
    // Slots each relay's hop 1 brought here, per source (gate gradients go back per slot) and per rank of my
    // node (the rows and experts this relay forwards).
    std::vector<int64_t> slots_from_source(n, 0), forward(n, 0);
    const std::vector<int>& node = t.ranks_on_node(t.node(me));
    for (int p = 0; p < n && !got.slots_via_me.empty(); ++p)
        for (size_t q = 0; q < got.slots_via_me[size_t(p)].size(); ++q) {
            slots_from_source[size_t(p)] += got.slots_via_me[size_t(p)][q];
            forward[size_t(node[q])] += got.slots_via_me[size_t(p)][q];
        }
    std::vector<int64_t> to_relay_slots(n, 0);
    for (int p = 0; p < n; ++p)
        for (int64_t s : sent.slots_via_relay[size_t(p)]) to_relay_slots[size_t(p)] += s;
    std::vector<int64_t> forwarded = got.forwarded_from.empty() ? std::vector<int64_t>(n, 0) : got.forwarded_from;
    std::vector<int64_t> rows_from = got.rows_from.empty() ? std::vector<int64_t>(n, 0) : got.rows_from;
    // Dispatch: hop 0 (slot, expert, gate) per slot and a row per (token, node) to the relays; hop 1 the relay's
    // expert id and row per slot to the expert's rank.
    dispatch = {values_move(0, to_relay_slots, W::kToRelayMeta), rows_move(0, sent.rows_to_relay),
                values_move(1, forward, W::kForwardMeta), rows_move(1, forward)};
    // Combine and dispatch backward: experts -> relays one row per slot, relays -> tokens one row per (token, node).
    combine = {rows_move(1, forwarded), rows_move(0, rows_from)};
    dispatch_bwd = combine;
    // Combine backward: dy to the relays per (token, node), gate x dy to the experts per slot, then each slot's
    // gate gradient back to the token's rank.
    combine_bwd = {rows_move(0, sent.rows_to_relay), rows_move(1, forward),
                   values_move(0, slots_from_source, W::kGateGradient)};
    return x;
}

std::vector<double> peer_bytes(const std::vector<TrafficMove>& moves, double row_bytes, double value_bytes, int me,
                               int hop) {
    std::vector<double> out;
    for (const TrafficMove& m : moves) {
        if (hop >= 0 && m.hop != hop) continue;
        out.resize(std::max(out.size(), m.rows.size()), 0.0);
        for (size_t p = 0; p < m.rows.size(); ++p)
            if (int(p) != me)
                out[p] += ExchangeWire::kCountBytes + double(m.rows[p]) * row_bytes + double(m.values[p]) * value_bytes;
    }
    return out;
}

TrafficBytes TrafficVolume::bytes(double row_bytes, double value_bytes) const {
    auto on = [&](int l) { return rows[l] * row_bytes + values[l] * value_bytes + messages[l] * ExchangeWire::kCountBytes; };
    return {on(0), on(1)};
}

TrafficVolume& TrafficVolume::operator+=(const TrafficVolume& o) {
    for (int l = 0; l < 2; ++l) rows[l] += o.rows[l], values[l] += o.values[l], messages[l] += o.messages[l];
    return *this;
}

TrafficVolume& TrafficVolume::operator*=(double f) {
    for (int l = 0; l < 2; ++l) rows[l] *= f, values[l] *= f, messages[l] *= f;
    return *this;
}

TrafficVolume traffic_volume(const std::vector<TrafficMove>& moves, const Topology& t, int me, int hop) {
    TrafficVolume v;
    for (const TrafficMove& m : moves) {
        if (hop >= 0 && m.hop != hop) continue;
        for (size_t p = 0; p < m.rows.size(); ++p) {
            if (int(p) == me) continue;
            int l = t.link(me, int(p)) == LinkClass::InterNode ? 1 : 0;
            v.rows[l] += double(m.rows[p]);
            v.values[l] += double(m.values[p]);
            v.messages[l] += 1;
        }
    }
    return v;
}

TrafficBytes traffic_bytes(const std::vector<TrafficMove>& moves, double row_bytes, double value_bytes,
                           const Topology& t, int me, int hop) {
    return traffic_volume(moves, t, me, hop).bytes(row_bytes, value_bytes);
}

}  // namespace duplex
