// How tokens reach their experts and come back: dispatch and combine as explicit calls, so the MoE layer
// is the same code whether every expert is local (LocalExchange, here) or spread over an expert-parallel
// group (the distributed exchange plugs in behind the same interface).
//
// A slot is one (token, k) pair: slot = token * top_k + k. Combine returns each slot's expert output; the
// layer adds them in slot order, so sums are deterministic wherever the experts ran.
#pragma once

#include <vector>

#include "runtime/model/router.hpp"

namespace duplex {

template <typename T>
struct RoutedTokens {
    std::vector<std::vector<int>> slots;  // per local expert: the slots it serves, in ascending order
    std::vector<std::vector<T>> rows;     // per local expert: [slots, dim] input rows
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
