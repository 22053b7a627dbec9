// Token permutation for expert dispatch and combine: the CPU reference of kernels/cuda/permute.cu.
//
// Dispatch moves items (a slot = (token, k), or for the first hop of the node-limited path one row per
// (token, node)) into one contiguous send buffer grouped by destination peer, peers in order and items in
// their original order inside a peer. Combine brings expert outputs back in the same layout and sums, per
// token, gate x output over its slots in slot order — a fixed order, so the result never depends on timing.
//
//   DispatchLayout l = dispatch_layout(dest, /*num_peers=*/8);     // dest[i]: peer of item i
//   permute_rows(x, dim, src_row, l, send);                         // send[l.item_row[i]] = x[src_row[i]]
//   combine_rows(recv, dim, l, gates, tokens, top_k, y);            // y[t] = sum_k gate[t,k] * recv[row of (t,k)]
#pragma once

#include <cstdint>
#include <vector>

namespace duplex::kernels {

struct DispatchLayout {
    int num_peers = 0;
    std::vector<int64_t> counts;   // items per peer
    std::vector<int64_t> offsets;  // num_peers + 1: first row of each peer's block in the send buffer
    std::vector<int64_t> item_row; // per item: its row in the send buffer
    int64_t num_rows() const { return offsets.empty() ? 0 : offsets.back(); }
};

// ConfigError when a destination is outside [0, num_peers).
DispatchLayout dispatch_layout(const std::vector<int>& dest, int num_peers);

// Items of the node-limited first hop: one per (token, distinct target node), tokens in order, nodes in order
// of first appearance among the token's slots. expert[t * top_k + k] is slot (t, k)'s expert; an expert's node
// is (expert / experts_per_rank) / ranks_per_node. Returns dest nodes and source tokens per item.
void node_items(const std::vector<int>& expert, int tokens, int top_k, int experts_per_rank, int ranks_per_node,
                std::vector<int>& dest_node, std::vector<int>& src_token);

// send[item_row[i]] = x[src_row[i]] (rows of dim floats).
void permute_rows(const float* x, int dim, const std::vector<int>& src_row, const DispatchLayout& layout, float* send);

// y[t] = sum over k = 0..top_k-1 (in order, starting from 0) of gates[t * top_k + k] * recv[item_row[t * top_k + k]],
// for a layout whose items are the slots.
void combine_rows(const float* recv, int dim, const DispatchLayout& layout, const float* gates, int tokens, int top_k,
                  float* y);

// Combine backward, per slot s = (t, k) of a slot layout: rows[item_row[s]] *= gates[s] (the gate times the
// token's gradient, after permute_rows put dy there), and dots[s] = dy[t] . outputs[item_row[s]] summed over the
// columns in order (the gate's gradient).
void gate_rows(float* rows, int dim, const DispatchLayout& layout, const float* gates);
void slot_dots(const float* dy, const float* outputs, int dim, const DispatchLayout& layout, int tokens, int top_k,
               float* dots);

// The node-limited combine (the reference of cuda::combine_rows_hierarchical): ranks form `nodes` nodes of L =
// ranks / nodes; masks[s][t] has bit d when token t of rank s went to rank d (as in the dispatch). in[d] holds
// one row per (token, d), source-major like the dispatch's receive buffer (rank 0's tokens for d ascending, then
// rank 1's, ...), and weights[d] one factor per row (empty: all 1). Per token, each node m it touched gives the
// partial sum, from 0, of weight x row over its ranks in rank order (each product and sum rounded); y[s][t] is
// the sum, from 0, of those partials in node order (0 for a token no rank took).
void combine_node_limited(const std::vector<const float*>& in, const std::vector<const float*>& weights,
                          const std::vector<std::vector<uint64_t>>& masks, int nodes, int dim,
                          const std::vector<float*>& y);
// The same with BF16 rows (bit patterns) and fp32 weights: products and sums in fp32 as above, each node's
// partial rounded to BF16 (the row that crosses back), their sum in fp32 rounded to BF16 at the end.
void combine_node_limited_bf16(const std::vector<const uint16_t*>& in, const std::vector<const float*>& weights,
                               const std::vector<std::vector<uint64_t>>& masks, int nodes, int dim,
                               const std::vector<uint16_t*>& y);
// Either of the two on rows given as bytes (device-shaped buffers): BF16 bit patterns when bf16, else fp32.
void combine_node_limited_rows(bool bf16, const std::vector<const void*>& in, const std::vector<const float*>& weights,
                               const std::vector<std::vector<uint64_t>>& masks, int nodes, int dim,
                               const std::vector<void*>& y);

}  // namespace duplex::kernels
