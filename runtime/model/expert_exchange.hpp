// How tokens reach their experts and come back: dispatch and combine as explicit calls, so the MoE layer
// is the same code whether every expert is local (LocalExchange, here) or spread over an expert-parallel
// group (the distributed exchange plugs in behind the same interface).
//
// A slot is one (token, k) pair: slot = token * top_k + k. Combine returns each slot's expert output; the
// layer adds them in slot order, so sums are deterministic wherever the experts ran.
#pragma once

#include <memory>
#include <vector>

#include "comm/communicator.hpp"
#include "runtime/model/router.hpp"

namespace duplex {

template <typename T>
struct RoutedTokens {
    std::vector<std::vector<int>> slots;  // per local expert: the slots it serves (the sender's numbering)
    std::vector<std::vector<T>> rows;     // per local expert: [slots, dim] input rows
    // Distributed exchanges only: the slots this rank sent to each peer (ascending), and for each peer the
    // (local expert, row) each of its rows landed in, in the order the peer sent them.
    std::vector<std::vector<int>> sent_slots;
    std::vector<std::vector<std::pair<int, int>>> received;
};

template <typename T>
class ExpertExchange {
public:
    virtual ~ExpertExchange() = default;
    virtual int first_local_expert() const = 0;
    virtual int num_local_experts() const = 0;
    // x[tokens, dim] and the routing -> the rows each local expert processes.
    virtual void dispatch(const T* x, int tokens, int dim, const Routing& r, RoutedTokens<T>& out) = 0;
    // Expert outputs (laid out like routed.rows) -> y_slots[tokens * top_k, dim] back where the tokens live.
    virtual void combine(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& outputs, int tokens, int dim,
                         int top_k, T* y_slots) = 0;
    // d y_slots -> gradients of the expert outputs.
    virtual void combine_backward(const RoutedTokens<T>& routed, const T* dy_slots, int tokens, int dim, int top_k,
                                  std::vector<std::vector<T>>& d_outputs) = 0;
    // Gradients of the expert input rows -> dx[tokens, dim] (accumulated).
    virtual void dispatch_backward(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& d_rows, int tokens,
                                   int dim, int top_k, T* dx) = 0;
};

// Experts spread over an expert-parallel group: expert e lives on group rank e / (experts / group size).
// Every call is a collective over the group (all ranks of an EP group run the same layers in the same order):
// dispatch sends each slot's routing metadata and row to the expert's rank with all-to-all-v; combine returns
// the outputs the same way; the backward calls mirror them. Sums happen on the token's own rank in slot order,
// so results do not depend on where experts live.
template <typename T>
class DistributedExchange : public ExpertExchange<T> {
public:
    DistributedExchange(std::shared_ptr<Communicator> group, int experts);
    int first_local_expert() const override { return group_->rank() * per_rank_; }
    int num_local_experts() const override { return per_rank_; }
    void dispatch(const T* x, int tokens, int dim, const Routing& r, RoutedTokens<T>& out) override;
    void combine(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& outputs, int tokens, int dim,
                 int top_k, T* y_slots) override;
    void combine_backward(const RoutedTokens<T>& routed, const T* dy_slots, int tokens, int dim, int top_k,
                          std::vector<std::vector<T>>& d_outputs) override;
    void dispatch_backward(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& d_rows, int tokens,
                           int dim, int top_k, T* dx) override;

private:
    // Rows of `per_peer` (concatenated per destination) to every peer; returns what each peer sent.
    std::vector<std::vector<T>> exchange_rows(const std::vector<std::vector<T>>& per_peer, int dim);
    std::shared_ptr<Communicator> group_;
    int experts_, per_rank_;
};

// Every expert on this rank.
template <typename T>
class LocalExchange : public ExpertExchange<T> {
public:
    explicit LocalExchange(int experts) : experts_(experts) {}
    int first_local_expert() const override { return 0; }
    int num_local_experts() const override { return experts_; }
    void dispatch(const T* x, int tokens, int dim, const Routing& r, RoutedTokens<T>& out) override;
    void combine(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& outputs, int tokens, int dim,
                 int top_k, T* y_slots) override;
    void combine_backward(const RoutedTokens<T>& routed, const T* dy_slots, int tokens, int dim, int top_k,
                          std::vector<std::vector<T>>& d_outputs) override;
    void dispatch_backward(const RoutedTokens<T>& routed, const std::vector<std::vector<T>>& d_rows, int tokens,
                           int dim, int top_k, T* dx) override;

private:
    int experts_;
};

}  // namespace duplex
