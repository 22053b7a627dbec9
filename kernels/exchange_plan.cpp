#include "kernels/exchange_plan.hpp"

#include <algorithm>

#include "core/error.hpp"

namespace duplex::kernels {

namespace {

uint64_t node_bits(uint64_t mask, int node, int L) {
    return (mask >> (node * L)) & (L >= 64 ? ~0ull : (1ull << L) - 1);
}

}  // namespace

std::vector<int64_t> node_limited_rows(const std::vector<std::vector<uint64_t>>& masks, int nodes,
                                       int64_t relay_capacity) {
    const int R = int(masks.size());
    DUPLEX_CHECK_ARG(R >= 1 && R <= 64, "node-limited exchange", "1..64 ranks (a 64-bit mask per token), got {}", R);
    DUPLEX_CHECK_ARG(nodes >= 1 && R % nodes == 0, "node-limited exchange: nodes",
                     "{} ranks do not split into {} nodes of equal size", R, nodes);
    DUPLEX_CHECK_ARG(relay_capacity == 0 || relay_capacity >= nodes, "node-limited exchange: relay rows",
                     "a round must hold a token's rows for every node ({}), got {}", nodes, relay_capacity);
    for (int s = 0; s < R; ++s)
        for (size_t t = 0; t < masks[s].size(); ++t)
            DUPLEX_CHECK_ARG(R == 64 || (masks[s][t] >> R) == 0, "node-limited exchange: routing",
                             "token {} of rank {} goes to a rank beyond the {} present", t, s, R);
    std::vector<int64_t> rows(R, 0);
    for (int s = 0; s < R; ++s)
        for (uint64_t mk : masks[s])
            for (int d = 0; d < R; ++d) rows[d] += (mk >> d) & 1u;
    return rows;
}

namespace {

// Walks the tokens in order and calls visit(s, t, round) with the round a token belongs to: a new round starts
// when the token's relay rows (one per node it reaches; none with one node) would overflow the capacity.
// Fills the plan's crossing counts. The masks were checked (node_limited_rows).
template <typename Visit>
NodeLimitedPlan walk(const std::vector<std::vector<uint64_t>>& masks, int nodes, int64_t capacity, int hops,
                     Visit&& visit) {
    const int R = int(masks.size()), L = R / nodes;
    NodeLimitedPlan p;
    p.ranks = R;
    p.nodes = nodes;
    p.source_rows.assign(R, 0);
    p.target_rows.assign(R, 0);
    p.rounds.emplace_back();
    p.rounds.back().hops.resize(hops);
    for (int s = 0; s < R; ++s)
        for (size_t t = 0; t < masks[s].size(); ++t) {
            int reached = 0;
            for (int m = 0; m < nodes; ++m) {
                uint64_t here = node_bits(masks[s][t], m, L);
                if (!here) continue;
                ++reached;
                if (m != s / L) {
                    ++p.inter_node_rows;
                    p.flat_inter_node_rows += __builtin_popcountll(here);
                }
            }
            int64_t relay = nodes > 1 ? reached : 0;
            if (capacity > 0 && p.rounds.back().relay_rows + relay > capacity) {
                p.rounds.emplace_back();
                p.rounds.back().hops.resize(hops);
            }
            visit(s, int64_t(t), p.rounds.back());
            p.relay_rows = std::max(p.relay_rows, p.rounds.back().relay_rows);
        }
    return p;
}

void add_output(Hop& hop, RowRef to) {
    hop.to.push_back(to);
    hop.first.push_back(int64_t(hop.from.size()));
}

}  // namespace

NodeLimitedPlan plan_node_limited_dispatch(const std::vector<std::vector<uint64_t>>& masks, int nodes,
                                           int64_t relay_capacity) {
    std::vector<int64_t> rows = node_limited_rows(masks, nodes, relay_capacity);  // each recv[d]'s; checks the masks
    const int R = int(masks.size()), L = R / nodes;
    std::vector<int64_t> delivered(R, 0);  // rows written so far in each recv[d]
    const int32_t relay_buffer = 2 * R;
    NodeLimitedPlan p = walk(masks, nodes, relay_capacity, nodes > 1 ? 2 : 1, [&](int s, int64_t t, PlanRound& round) {
        RowRef token{s, t};
        for (int m = 0; m < nodes; ++m) {
            uint64_t here = node_bits(masks[s][t], m, L);
            if (!here) continue;
            RowRef from = token;
            if (nodes > 1) {
                // Hop 1: the one crossing to node m, into a relay row there.
                from = RowRef{relay_buffer, round.relay_rows++};
                round.hops[0].from.push_back(token);
                add_output(round.hops[0], from);
            }
            Hop& deliver = round.hops.back();
            for (int ld = 0; ld < L; ++ld)
                if ((here >> ld) & 1) {
                    int d = m * L + ld;
                    deliver.from.push_back(from);
                    add_output(deliver, RowRef{R + d, delivered[d]++});
                }
        }
    });
    for (int s = 0; s < R; ++s) p.source_rows[s] = int64_t(masks[s].size());
    p.target_rows = std::move(rows);
    return p;
}

NodeLimitedPlan plan_node_limited_combine(const std::vector<std::vector<uint64_t>>& masks, int nodes,
                                          int64_t relay_capacity) {
    std::vector<int64_t> rows = node_limited_rows(masks, nodes, relay_capacity);  // each in[d]'s; checks the masks
    const int R = int(masks.size()), L = R / nodes;
    std::vector<int64_t> read(R, 0);  // rows of in[d] taken so far
    const int32_t relay_buffer = 2 * R;
    NodeLimitedPlan p = walk(masks, nodes, relay_capacity, nodes > 1 ? 2 : 1, [&](int s, int64_t t, PlanRound& round) {
        // One node: the token's row is the sum of its rows from every rank. Several: per node, a relay row sums
        // the node's rows (hop 1); the token's row sums the relay rows in node order (hop 2).
        Hop& gather = round.hops.back();
        for (int m = 0; m < nodes; ++m) {
            uint64_t here = node_bits(masks[s][t], m, L);
            if (!here) continue;
            Hop& sum = round.hops[0];
            for (int ld = 0; ld < L; ++ld)
                if ((here >> ld) & 1) {
                    int d = m * L + ld;
                    sum.from.push_back(RowRef{d, read[d]++});
                }
            if (nodes > 1) {
                RowRef relay{relay_buffer, round.relay_rows++};
                add_output(sum, relay);
                gather.from.push_back(relay);
            }
        }
        add_output(gather, RowRef{R + s, t});  // no sources (no rank took the token): zero
    });
    p.source_rows = std::move(rows);
    for (int s = 0; s < R; ++s) p.target_rows[s] = int64_t(masks[s].size());
    return p;
}

ExpertMajorPlan plan_expert_major(const std::vector<std::vector<std::vector<int64_t>>>& sent) {
    const int n = int(sent.size());
    const int E = n ? int(sent[0].size() ? sent[0][0].size() : 0) : 0;
    for (int q = 0; q < n; ++q) {
        DUPLEX_CHECK_ARG(int(sent[q].size()) == n, "expert-major counts", "rank {} lists {} destinations for {} ranks", q,
                         sent[q].size(), n);
        for (int s = 0; s < n; ++s) {
            DUPLEX_CHECK_ARG(int(sent[q][s].size()) == E, "expert-major counts",
                             "rank {} lists {} experts of rank {}, rank 0 lists {}", q, sent[q][s].size(), s, E);
            for (int e = 0; e < E; ++e)
                DUPLEX_CHECK_ARG(sent[q][s][e] >= 0, "expert-major counts", "rank {} sends {} rows to expert {} of rank {}",
                                 q, sent[q][s][e], e, s);
        }
    }
    ExpertMajorPlan plan;
    plan.token_rows.assign(n, 0);
    plan.expert_first.assign(n, std::vector<int64_t>(E + 1, 0));
    for (int s = 0; s < n; ++s)
        for (int e = 0; e < E; ++e) {
            int64_t rows = 0;
            for (int q = 0; q < n; ++q) rows += sent[q][s][e];
            plan.expert_first[s][e + 1] = plan.expert_first[s][e] + rows;
        }
    // at[s][e]: where the next block for expert e of rank s goes (ranks q in order).
    std::vector<std::vector<int64_t>> at(n);
    for (int s = 0; s < n; ++s) at[s].assign(plan.expert_first[s].begin(), plan.expert_first[s].end() - 1);
    for (int q = 0; q < n; ++q)
        for (int s = 0; s < n; ++s)
            for (int e = 0; e < E; ++e) {
                int64_t rows = sent[q][s][e];
                if (rows == 0) continue;
                plan.moves.push_back({q, s, plan.token_rows[q], at[s][e], rows});
                plan.token_rows[q] += rows;
                at[s][e] += rows;
            }
    return plan;
}

}  // namespace duplex::kernels
