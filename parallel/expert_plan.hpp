// The expert-parallel plan: every count of the expert exchange that more than one part of Duplex needs, each in
// one function. Where an expert lives (ExpertPlacement), which path a group's tokens take (choose_path), the
// relay of the node-limited path (relay_rank), what one rank sends in a dispatch (plan_dispatch), what the
// group's dispatches bring to one rank (arrivals_at), and from those the moves of all four exchanges — rows
// and metadata values per peer, hop by hop, in the order the host exchange runs them (exchange_traffic) — and
// their bytes per link class (traffic_bytes).
//
// The host exchange (runtime/model/expert_exchange.cpp) sends exactly these moves, each as an int64 row count
// to every peer and then the payload; emulate mode charges them; the simulator charges their group average;
// duplex.torch takes the path and relays from here. tests/runtime/exchange_traffic_test.cpp holds all of them
// to the bytes the communicator counts.
//
//   Topology t = Topology::virtual_nodes(4, 2);
//   DispatchPlan d = plan_dispatch(ExpertPath::NodeLimited, dest_rank_per_slot, tokens, top_k, t, /*me=*/0);
//   ExchangeTraffic x = exchange_traffic(d, arrivals_at(every_ranks_plan, t, 0), t, 0);
//   TrafficBytes b = traffic_bytes(x.of(Exchange::Dispatch), /*row=*/hidden * 2, /*value=*/2, t, 0);
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "comm/topology.hpp"

namespace duplex {

// Experts of one MoE layer spread over an expert-parallel group of `ranks`: expert e on group rank
// e / (experts / ranks), contiguous blocks.
class ExpertPlacement {
public:
    ExpertPlacement(int experts, int ranks);  // ConfigError unless ranks divides experts
    int experts() const { return experts_; }
    int ranks() const { return ranks_; }
    int per_rank() const { return per_rank_; }
    int rank_of(int expert) const { return expert / per_rank_; }
    int first_expert(int rank) const { return rank * per_rank_; }
    // The group rank holding each slot's expert.
    std::vector<int> ranks_of(const std::vector<int>& experts) const;

private:
    int experts_, ranks_, per_rank_;
};

// Flat: each slot's row straight to its expert's rank. NodeLimited: DeepSeek-V3's two hops — one row per
// (token, target node) to the relay there, which forwards one row per slot inside its node.
enum class ExpertPath { Flat, NodeLimited };
// The node-limited path when it is asked for and the group spans more than one node; flat otherwise.
ExpertPath choose_path(bool node_limited, const Topology& t);
const char* path_name(ExpertPath p);

// The node-limited path's relay for rows from `me` to `dest`: the rank on dest's node with me's local index.
// ConfigError when that node has fewer ranks than me's local index.
int relay_rank(int dest, int me, const Topology& t);

// Metadata values (in the rows' element type) and the count message of each move.
struct ExchangeWire {
    static constexpr int kFlatMeta = 2;      // (slot, expert) with each flat dispatch row
    static constexpr int kToRelayMeta = 3;   // (slot, expert, gate) per slot with a hop-1 row
    static constexpr int kForwardMeta = 1;   // (expert) with each row a relay forwards
    static constexpr int kGateGradient = 1;  // per slot, relay -> token rank in the node-limited combine backward
    static constexpr int kCountBytes = 8;    // the int64 row count every move sends each peer first
};

// What one rank sends in a dispatch, per group peer. dest[slot] is the group rank of the slot's expert
// (slot = token * top_k + k).
struct DispatchPlan {
    ExpertPath path = ExpertPath::Flat;
    std::vector<int64_t> slots_to;       // slots whose expert the peer holds (flat: the rows sent)
    std::vector<int64_t> rows_to_relay;  // node-limited: rows (token, node) the peer relays
    std::vector<std::vector<int64_t>> slots_via_relay;  // node-limited: [relay][local index of the expert's rank]
};
DispatchPlan plan_dispatch(ExpertPath path, const std::vector<int>& dest, int tokens, int top_k, const Topology& t,
                           int me);

// What the group's dispatches bring to rank `me`, per source peer.
struct Arrivals {
    std::vector<int64_t> slots_from;                 // flat: slots for my experts
    std::vector<int64_t> rows_from;                  // node-limited hop 1: rows I relay
    std::vector<std::vector<int64_t>> slots_via_me;  // node-limited hop 1: [source][local index] slots I forward
    std::vector<int64_t> forwarded_from;             // node-limited hop 2: slots for my experts, per relay
};
// From every rank's plan (all[p] = plan_dispatch(..., p)).
Arrivals arrivals_at(const std::vector<DispatchPlan>& all, const Topology& t, int me);

enum class Exchange { Dispatch, Combine, CombineBackward, DispatchBackward };
constexpr int kExchanges = 4;
const char* exchange_name(Exchange e);

// One message of an exchange: rows (of the model's width) and metadata values to each peer; hop 0 is the
// flat path's only hop and the node-limited path's crossing, hop 1 its forwarding inside the node.
struct TrafficMove {
    int hop = 0;
    std::vector<int64_t> rows, values;  // per peer
};
struct ExchangeTraffic {
    ExpertPath path = ExpertPath::Flat;
    std::array<std::vector<TrafficMove>, kExchanges> moves;  // by Exchange, in the order they run
    const std::vector<TrafficMove>& of(Exchange e) const { return moves[size_t(e)]; }
};
// The moves of all four exchanges of one routed microbatch, as rank `me` sends them.
ExchangeTraffic exchange_traffic(const DispatchPlan& sent, const Arrivals& got, const Topology& t, int me);

// Bytes on each link class (self excluded, as the communicator counts).
struct TrafficBytes {
    double intra = 0, inter = 0;
    TrafficBytes& operator+=(const TrafficBytes& o) {
        intra += o.intra, inter += o.inter;
        return *this;
    }
};
// Rows, metadata values and count messages a rank's moves put on each link class ([0] intra-node, [1] inter-node).
struct TrafficVolume {
    double rows[2] = {0, 0}, values[2] = {0, 0}, messages[2] = {0, 0};
    TrafficBytes bytes(double row_bytes, double value_bytes) const;
    TrafficVolume& operator+=(const TrafficVolume& o);
    TrafficVolume& operator*=(double f);
};
// hop >= 0: that hop's moves alone.
TrafficVolume traffic_volume(const std::vector<TrafficMove>& moves, const Topology& t, int me, int hop = -1);
TrafficBytes traffic_bytes(const std::vector<TrafficMove>& moves, double row_bytes, double value_bytes,
                           const Topology& t, int me, int hop = -1);
// Per peer: what `moves` (of one hop, or all) send each peer, in bytes, count messages included.
std::vector<double> peer_bytes(const std::vector<TrafficMove>& moves, double row_bytes, double value_bytes, int me,
                               int hop = -1);

}  // namespace duplex
