// How tokens reach their experts and come back: dispatch and combine as explicit calls, so the MoE layer
// is the same code whether every expert is local (LocalExchange), spread over an expert-parallel group with
// one copy per expert (DistributedExchange), or spread over several nodes with the node-limited two-hop path
// (HierarchicalExchange).
//
// A slot is one (token, k) pair: slot = token * top_k + k. Combine returns, per token, the gate-weighted sum
// of its experts' outputs; combine_backward returns the expert-output gradients and each slot's gate gradient.
// Every exchange adds in a fixed order, so results never depend on timing. Calls block until their rows are
// there; a stage runs them on its expert lanes (runtime/exec/expert_service.hpp) and waits for the lane.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "comm/communicator.hpp"
#include "parallel/expert_plan.hpp"
#include "runtime/model/router.hpp"

namespace duplex {

// Rows of the local experts left where an exchange put them, expert-major: rows first[e] .. first[e + 1] - 1 are
// local expert e's (from group rank 0 first, then 1, ...). The producer has finished writing them when it hands
// them over. The executor's device path keeps a dispatch's rows on the GPU this way from the exchange through the
// expert MLPs and back (RowTransport::exchange_to_experts, ExpertCompute::forward_resident).
struct ResidentRows {
    virtual ~ResidentRows() = default;
    std::vector<int64_t> first;  // per local expert, then the total
    int width = 0;
    int device = -1;             // the CUDA device holding them; -1: host memory
    void* data = nullptr;        // first.back() x width values of the model's element type
    int64_t rows(int e) const { return first[size_t(e) + 1] - first[size_t(e)]; }
};

// Where rows stay: nowhere (the host path), or a device index (-1 the host, for tests).
constexpr int kRowsMove = -2;

template <typename T>
struct RoutedTokens {
    // Set by the caller before dispatch: leave the rows where the exchange puts them (`resident`) instead of in
    // `rows`, when the exchange can (ExpertExchange::rows_stay_on).
    bool keep_rows = false;
    std::shared_ptr<ResidentRows> resident;
    // On the token's rank (flat exchange): rows sent to each peer's local experts, [peer][expert].
    std::vector<std::vector<int64_t>> sent_counts;
    std::vector<std::vector<int>> slots;  // per local expert: one id per row it serves (its count is what matters)
    std::vector<std::vector<T>> rows;     // per local expert: [rows, dim] input rows
    // On the expert's rank, for each peer that sent rows: the (local expert, row) each one landed in, in order.
    std::vector<std::vector<std::pair<int, int>>> received;
    // On the token's rank: the slots sent to each peer (ascending); hierarchical: also the tokens (ascending).
    std::vector<std::vector<int>> sent_slots, sent_tokens;
    // Local and flat exchanges: each slot's expert output [tokens * top_k, dim], kept for the gate gradient.
    std::vector<T> slot_outputs;
    // Hierarchical, on a relay: one entry per slot it forwarded inside its node, in arrival order.
    struct Forwarded {
        int src = 0;    // the token's rank (group rank)
        int row = 0;    // index of the token's row among the rows that arrived from src
        int dest = 0;   // the expert's rank (group rank, same node as the relay)
        T gate = 0;
    };
    std::vector<Forwarded> forwarded;
    std::vector<int> rows_from;   // per source rank: token rows that arrived from it
    std::vector<T> relay_outputs; // per forwarded slot: the expert output (for the gate gradient)
};

template <typename T>
class ExpertExchange {
public:
    virtual ~ExpertExchange() = default;
    virtual int first_local_expert() const = 0;
    virtual int num_local_experts() const = 0;
    // x[tokens, dim] and the routing -> the rows each local expert processes.
    virtual void dispatch(const T* x, int dim, const Routing& r, RoutedTokens<T>& out) = 0;
    // Expert outputs (laid out like routed.rows) -> y[tokens, dim] = sum over k of gate * output (overwritten).
    virtual void combine(RoutedTokens<T>& routed, const std::vector<std::vector<T>>& outputs, int dim, const Routing& r,
                         T* y) = 0;
    // dy[tokens, dim] -> gradients of the expert outputs (laid out like routed.rows) and d gate per slot.
    virtual void combine_backward(RoutedTokens<T>& routed, const T* dy, int dim, const Routing& r,
                                  std::vector<std::vector<T>>& d_outputs, std::vector<double>& d_gate) = 0;
    // Gradients of the expert input rows -> dx[tokens, dim] (accumulated).
    virtual void dispatch_backward(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& d_rows, int dim,
                                   const Routing& r, T* dx) = 0;

    // Where a dispatch asked to keep its rows leaves them (kRowsMove: this exchange always hands them over in
    // RoutedTokens::rows). When not kRowsMove, the three calls below take and give expert rows where they are.
    virtual int rows_stay_on() const { return kRowsMove; }
    virtual void combine_resident(RoutedTokens<T>& routed, const ResidentRows& outputs, int dim, const Routing& r, T* y);
    virtual void combine_backward_resident(RoutedTokens<T>& routed, const T* dy, int dim, const Routing& r,
                                           std::shared_ptr<ResidentRows>& d_outputs, std::vector<double>& d_gate);
    virtual void dispatch_backward_resident(const RoutedTokens<T>& routed, const ResidentRows& d_rows, int dim,
                                            const Routing& r, T* dx);
};

// Every expert on this rank.
template <typename T>
class LocalExchange : public ExpertExchange<T> {
public:
    explicit LocalExchange(int experts) : experts_(experts) {}
    int first_local_expert() const override { return 0; }
    int num_local_experts() const override { return experts_; }
    void dispatch(const T* x, int dim, const Routing& r, RoutedTokens<T>& out) override;
    void combine(RoutedTokens<T>& routed, const std::vector<std::vector<T>>& outputs, int dim, const Routing& r,
                 T* y) override;
    void combine_backward(RoutedTokens<T>& routed, const T* dy, int dim, const Routing& r,
                          std::vector<std::vector<T>>& d_outputs, std::vector<double>& d_gate) override;
    void dispatch_backward(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& d_rows, int dim,
                           const Routing& r, T* dx) override;

private:
    int experts_;
};

// How the rows of an exchange move between the ranks of an expert-parallel group. Each call is a collective:
// per_peer[p] holds rows of `width` values for group rank p; the result holds, per peer, the rows it sent here.
// Without one, DistributedExchange moves them with the communicator's all-to-all-v; runtime/device/device_exchange.hpp
// moves them with the GPU exchange kernel on its own stream and SM budget.
template <typename T>
class RowTransport {
public:
    virtual ~RowTransport() = default;
    virtual std::vector<std::vector<T>> exchange(const std::vector<std::vector<T>>& per_peer, int width) = 0;

    // The expert-major path (kernels/exchange_plan.hpp, plan_expert_major): where its rows stay (kRowsMove: no such
    // path). sent[p][e]: rows this rank sends, in the dispatch the call belongs to, to local expert e of rank p.
    virtual int rows_stay_on() const { return kRowsMove; }
    // per_peer[p]: rows for p grouped by p's local expert (sent[p][e] each); returns what arrived here, left where
    // it landed, expert-major.
    virtual std::shared_ptr<ResidentRows> exchange_to_experts(const std::vector<std::vector<T>>& per_peer,
                                                              const std::vector<std::vector<int64_t>>& sent, int width);
    // The way back: expert rows laid out as exchange_to_experts left them return to the ranks they came from;
    // returns per peer the rows that come back here, in the order this rank sent them.
    virtual std::vector<std::vector<T>> exchange_from_experts(const ResidentRows& rows,
                                                              const std::vector<std::vector<int64_t>>& sent, int width);
};

// Experts spread over an expert-parallel group: expert e lives on group rank e / (experts / group size).
// Every call is a collective over the group (all ranks of an EP group run the same layers in the same order).
// The flat path: each slot's routing metadata and row go straight to the expert's rank with all-to-all-v (one
// copy per expert, whatever link it crosses); outputs come back per slot and are summed on the token's rank
// in slot order, exactly as LocalExchange sums them.
template <typename T>
class DistributedExchange : public ExpertExchange<T> {
public:
    DistributedExchange(std::shared_ptr<Communicator> group, int experts);
    int first_local_expert() const override { return placement_.first_expert(group_->rank()); }
    int num_local_experts() const override { return per_rank_; }
    void dispatch(const T* x, int dim, const Routing& r, RoutedTokens<T>& out) override;
    void combine(RoutedTokens<T>& routed, const std::vector<std::vector<T>>& outputs, int dim, const Routing& r,
                 T* y) override;
    void combine_backward(RoutedTokens<T>& routed, const T* dy, int dim, const Routing& r,
                          std::vector<std::vector<T>>& d_outputs, std::vector<double>& d_gate) override;
    void dispatch_backward(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& d_rows, int dim,
                           const Routing& r, T* dx) override;
    // Where its transport keeps rows (a dispatch whose caller set keep_rows leaves them there); kRowsMove without
    // such a transport.
    int rows_stay_on() const override { return transport_ ? transport_->rows_stay_on() : kRowsMove; }
    void combine_resident(RoutedTokens<T>& routed, const ResidentRows& outputs, int dim, const Routing& r,
                          T* y) override;
    void combine_backward_resident(RoutedTokens<T>& routed, const T* dy, int dim, const Routing& r,
                                   std::shared_ptr<ResidentRows>& d_outputs, std::vector<double>& d_gate) override;
    void dispatch_backward_resident(const RoutedTokens<T>& routed, const ResidentRows& d_rows, int dim,
                                    const Routing& r, T* dx) override;

    // Every later exchange of this object moves its rows through `transport` (null: the communicator).
    void set_transport(std::shared_ptr<RowTransport<T>> transport) { transport_ = std::move(transport); }

protected:
    int owner(int expert) const { return placement_.rank_of(expert); }
    std::vector<std::vector<T>> move(const std::vector<std::vector<T>>& per_peer, int width);
    // dy of every slot, in the rows each peer gets back (its slots in the order they were sent).
    std::vector<std::vector<T>> slot_rows_for_peers(const RoutedTokens<T>& routed, const std::vector<T>& dy_slots, int dim);
    std::shared_ptr<Communicator> group_;
    int experts_;
    ExpertPlacement placement_;
    int per_rank_;
    std::shared_ptr<RowTransport<T>> transport_;
    std::shared_ptr<HostBufferPool> staging_;  // the all-to-all-v's flat buffers, from the group's allocator
};

// The node-limited two-hop path of DeepSeek-V3 over a group whose topology has several (virtual) nodes of
// equal size. Dispatch: a token crosses the inter-node link at most once per target node, to the relay there
// with the same local index as its own rank, carrying the (slot, expert, gate) of each of its experts on that
// node; the relay forwards one row per slot inside its node to the expert's rank. Combine runs the path back:
// experts return their outputs to the relay, which sums gate * output per token (slot order) before the
// one crossing back; the token's rank adds the per-node partial sums in node order. The backward calls mirror
// this (the relay computes the gate gradients from the outputs it kept, and reduces input gradients per token
// before they cross). Inter-node bytes per direction are at most tokens x nodes-per-token x dim x sizeof(T)
// plus a few metadata values per slot.
template <typename T>
class HierarchicalExchange : public DistributedExchange<T> {
public:
    // ConfigError unless the group's nodes all have the same number of ranks.
    HierarchicalExchange(std::shared_ptr<Communicator> group, int experts);
    void dispatch(const T* x, int dim, const Routing& r, RoutedTokens<T>& out) override;
    void combine(RoutedTokens<T>& routed, const std::vector<std::vector<T>>& outputs, int dim, const Routing& r,
                 T* y) override;
    void combine_backward(RoutedTokens<T>& routed, const T* dy, int dim, const Routing& r,
                          std::vector<std::vector<T>>& d_outputs, std::vector<double>& d_gate) override;
    void dispatch_backward(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& d_rows, int dim,
                           const Routing& r, T* dx) override;
    // The two hops hand rows over on the host.
    int rows_stay_on() const override { return kRowsMove; }

private:
    using DistributedExchange<T>::group_;
    using DistributedExchange<T>::per_rank_;
    using DistributedExchange<T>::owner;
    int relay_for(int expert) const;  // the rank on the expert's node with this rank's local index
};

}  // namespace duplex
