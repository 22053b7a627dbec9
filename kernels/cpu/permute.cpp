#include "kernels/cpu/permute.hpp"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "core/dtype.hpp"
#include "core/error.hpp"

namespace duplex::kernels {

DispatchLayout dispatch_layout(const std::vector<int>& dest, int num_peers) {
    DUPLEX_CHECK_ARG(num_peers >= 1, "dispatch layout", "needs at least one peer, got {}", num_peers);
    DispatchLayout l;
    l.num_peers = num_peers;
    l.counts.assign(num_peers, 0);
    for (size_t i = 0; i < dest.size(); ++i) {
        DUPLEX_CHECK_ARG(dest[i] >= 0 && dest[i] < num_peers, "dispatch layout",
                         "item {} goes to peer {} outside 0..{}", i, dest[i], num_peers - 1);
        ++l.counts[dest[i]];
    }
    l.offsets.assign(num_peers + 1, 0);
    for (int p = 0; p < num_peers; ++p) l.offsets[p + 1] = l.offsets[p] + l.counts[p];
    std::vector<int64_t> next(l.offsets.begin(), l.offsets.end() - 1);
    l.item_row.resize(dest.size());
    for (size_t i = 0; i < dest.size(); ++i) l.item_row[i] = next[dest[i]]++;
    return l;
}

void node_items(const std::vector<int>& expert, int tokens, int top_k, int experts_per_rank, int ranks_per_node,
                std::vector<int>& dest_node, std::vector<int>& src_token) {
    DUPLEX_CHECK_ARG(experts_per_rank >= 1 && ranks_per_node >= 1, "node items", "needs positive group sizes");
    DUPLEX_CHECK_ARG(expert.size() == size_t(tokens) * top_k, "node items", "{} slots for {} tokens x top-{}",
                     expert.size(), tokens, top_k);
    dest_node.clear();
    src_token.clear();
    std::vector<int> seen;
    for (int t = 0; t < tokens; ++t) {
        seen.clear();
        for (int k = 0; k < top_k; ++k) {
            int node = (expert[size_t(t) * top_k + k] / experts_per_rank) / ranks_per_node;
            if (std::find(seen.begin(), seen.end(), node) != seen.end()) continue;
            seen.push_back(node);
            dest_node.push_back(node);
            src_token.push_back(t);
        }
    }
}

void permute_rows(const float* x, int dim, const std::vector<int>& src_row, const DispatchLayout& layout, float* send) {
    DUPLEX_CHECK_ARG(src_row.size() == layout.item_row.size(), "permute", "{} source rows for {} items",
                     src_row.size(), layout.item_row.size());
    for (size_t i = 0; i < src_row.size(); ++i)
        std::memcpy(send + size_t(layout.item_row[i]) * dim, x + size_t(src_row[i]) * dim, sizeof(float) * dim);
}

void combine_rows(const float* recv, int dim, const DispatchLayout& layout, const float* gates, int tokens, int top_k,
                  float* y) {
    DUPLEX_CHECK_ARG(layout.item_row.size() == size_t(tokens) * top_k, "combine", "{} items for {} tokens x top-{}",
                     layout.item_row.size(), tokens, top_k);
    for (int t = 0; t < tokens; ++t) {
        float* yt = y + size_t(t) * dim;
        std::fill(yt, yt + dim, 0.0f);
        for (int k = 0; k < top_k; ++k) {
            size_t slot = size_t(t) * top_k + k;
            const float* r = recv + size_t(layout.item_row[slot]) * dim;
            float g = gates[slot];
            // NOTE: multiply then add, each rounded (no fused multiply-add): the CUDA kernel does the same.
            for (int c = 0; c < dim; ++c) {
                volatile float p = g * r[c];
                yt[c] = yt[c] + p;
            }
        }
    }
}

void gate_rows(float* rows, int dim, const DispatchLayout& layout, const float* gates) {
    for (size_t slot = 0; slot < layout.item_row.size(); ++slot) {
        float* r = rows + size_t(layout.item_row[slot]) * dim;
        for (int c = 0; c < dim; ++c) r[c] = r[c] * gates[slot];
    }
}

void slot_dots(const float* dy, const float* outputs, int dim, const DispatchLayout& layout, int tokens, int top_k,
               float* dots) {
    DUPLEX_CHECK_ARG(layout.item_row.size() == size_t(tokens) * top_k, "slot dots", "{} items for {} tokens x top-{}",
                     layout.item_row.size(), tokens, top_k);
    for (size_t slot = 0; slot < layout.item_row.size(); ++slot) {
        const float* g = dy + (slot / top_k) * dim;
        const float* o = outputs + size_t(layout.item_row[slot]) * dim;
        float acc = 0;
        // NOTE: multiply then add, each rounded, columns in order: the CUDA kernel does the same.
        for (int c = 0; c < dim; ++c) {
            volatile float p = g[c] * o[c];
            acc = acc + p;
        }
        dots[slot] = acc;
    }
}

namespace {

// combine_node_limited in the row type T (float, or BF16 as uint16_t bit patterns): load(T) -> float,
// store(float) -> T rounds a node's partial (what crosses) and the token's sum.
template <typename T, typename Load, typename Store>
void combine_node_limited_as(const std::vector<const T*>& in, const std::vector<const float*>& weights,
                             const std::vector<std::vector<uint64_t>>& masks, int nodes, int dim,
                             const std::vector<T*>& y, Load load, Store store) {
    const int R = int(masks.size());
    DUPLEX_CHECK_ARG(R >= 1 && R <= 64 && nodes >= 1 && R % nodes == 0, "node-limited combine",
                     "{} ranks in {} nodes of equal size (at most 64 ranks)", R, nodes);
    DUPLEX_CHECK_ARG(int(in.size()) == R && int(y.size()) == R && (weights.empty() || int(weights.size()) == R),
                     "node-limited combine", "{} inputs, {} weights and {} outputs for {} ranks", in.size(),
                     weights.size(), y.size(), R);
    const int L = R / nodes;
    // next[d]: the row of in[d] the next token that went to d reads (sources in order, tokens in order).
    std::vector<int64_t> next(R, 0);
    std::vector<float> partial(dim), sum(dim);
    for (int s = 0; s < R; ++s)
        for (size_t t = 0; t < masks[s].size(); ++t) {
            std::fill(sum.begin(), sum.end(), 0.0f);
            for (int m = 0; m < nodes; ++m) {
                uint64_t here = (masks[s][t] >> (m * L)) & (L >= 64 ? ~0ull : (1ull << L) - 1);
                if (here == 0) continue;
                std::fill(partial.begin(), partial.end(), 0.0f);
                for (int ld = 0; ld < L; ++ld) {
                    if (!((here >> ld) & 1)) continue;
                    int d = m * L + ld;
                    int64_t row = next[d]++;
                    const T* r = in[d] + row * dim;
                    float w = weights.empty() ? 1.0f : weights[d][row];
                    // NOTE: multiply then add, each rounded (no fused multiply-add): the CUDA kernel does the same.
                    for (int c = 0; c < dim; ++c) {
                        volatile float p = weights.empty() ? load(r[c]) : w * load(r[c]);
                        partial[c] = partial[c] + p;
                    }
                }
                for (int c = 0; c < dim; ++c) sum[c] = sum[c] + load(store(partial[c]));
            }
            T* yt = y[s] + t * dim;
            for (int c = 0; c < dim; ++c) yt[c] = store(sum[c]);
        }
}

}  // namespace

void combine_node_limited(const std::vector<const float*>& in, const std::vector<const float*>& weights,
                          const std::vector<std::vector<uint64_t>>& masks, int nodes, int dim,
                          const std::vector<float*>& y) {
    auto same = [](float v) { return v; };
    combine_node_limited_as<float>(in, weights, masks, nodes, dim, y, same, same);
}

void combine_node_limited_bf16(const std::vector<const uint16_t*>& in, const std::vector<const float*>& weights,
                               const std::vector<std::vector<uint64_t>>& masks, int nodes, int dim,
                               const std::vector<uint16_t*>& y) {
    combine_node_limited_as<uint16_t>(in, weights, masks, nodes, dim, y, bf16_to_fp32, fp32_to_bf16);
}

void combine_node_limited_rows(bool bf16, const std::vector<const void*>& in, const std::vector<const float*>& weights,
                               const std::vector<std::vector<uint64_t>>& masks, int nodes, int dim,
                               const std::vector<void*>& y) {
    auto typed = [&](auto* element) {
        using T = std::remove_pointer_t<decltype(element)>;
        std::vector<const T*> in_t;
        std::vector<T*> y_t;
        for (const void* p : in) in_t.push_back(static_cast<const T*>(p));
        for (void* p : y) y_t.push_back(static_cast<T*>(p));
        if constexpr (std::is_same_v<T, float>)
            combine_node_limited(in_t, weights, masks, nodes, dim, y_t);
        else
            combine_node_limited_bf16(in_t, weights, masks, nodes, dim, y_t);
    };
    if (bf16)
        typed(static_cast<uint16_t*>(nullptr));
    else
        typed(static_cast<float*>(nullptr));
}

}  // namespace duplex::kernels
