// The node-limited expert exchange as lists of row moves, planned on the host from the routing masks before any
// launch. kernels/cuda/node_limited.cu runs a plan on the device (the warps of an SM budget take its output rows
// in turn); tests/kernels/exchange_plan_test.cpp runs it on the CPU against the plain gather and
// kernels::combine_node_limited.
//
// Ranks form `nodes` nodes of L = ranks / nodes; masks[s][t] has bit d when token t of rank s goes to rank d.
// Dispatch crosses to each target node once per token — into a relay row at that node — and the relay copies
// the row to each rank of its node the token is for (DeepSeek-V3's IB-once-then-NVLink). Combine runs the same
// rows back: the relay sums a token's rows of its node (rank order), one row crosses back, and the token's rank
// sums the nodes' partials (node order). With one node there is no relay: each row is written once, straight
// from its source row to its target row.
//
//   NodeLimitedPlan p = plan_node_limited_dispatch(masks, /*nodes=*/2, /*relay_capacity=*/0);
//   for (const PlanRound& round : p.rounds)      // rounds bound the relay's rows
//       for (const Hop& hop : round.hops) ...    // hop k + 1 reads what hop k wrote
#pragma once

#include <cstdint>
#include <vector>

namespace duplex::kernels {

// A row of one of the buffers a plan names: 0 .. R-1 the sources' (dispatch: x[s], a row per token; combine:
// in[d], a row per (token, d) as the dispatch delivered it), R .. 2R-1 the targets' (dispatch: recv[d]; combine:
// y[s], a row per token), 2R the relay rows of the current round.
struct RowRef {
    int32_t buffer = 0;
    int64_t row = 0;
};

// One pass over output rows: output i is the sum, from 0, of from[first[i]] .. from[first[i + 1] - 1] in order
// (a dispatch hop has exactly one source per output: a copy). Combine's sources in buffers 0 .. R-1 are scaled
// by their weight (one per row of in[d]) before they are added.
struct Hop {
    std::vector<RowRef> to;
    std::vector<int64_t> first{0};  // outputs + 1
    std::vector<RowRef> from;
    int64_t outputs() const { return int64_t(to.size()); }
};

struct PlanRound {
    std::vector<Hop> hops;   // in order; each reads what the one before wrote
    int64_t relay_rows = 0;  // relay rows this round writes
};

struct NodeLimitedPlan {
    int ranks = 0, nodes = 0;
    std::vector<int64_t> source_rows;  // rows each source buffer is read at (must hold)
    std::vector<int64_t> target_rows;  // rows written in each target buffer
    int64_t relay_rows = 0;            // the most relay rows a round takes (what the relay buffer must hold)
    int64_t inter_node_rows = 0;       // rows that cross between nodes (one per token and other node)
    int64_t flat_inter_node_rows = 0;  // what one row per (token, rank of another node) would have sent across
    std::vector<PlanRound> rounds;
};

// Plans of the dispatch and the combine for the same masks (deliveries in each target source-major: rank 0's
// tokens ascending, then rank 1's, ...). relay_capacity bounds the relay rows of a round (0: one round; else at
// least `nodes`, so a token fits). ConfigError for more than 64 ranks, ranks that do not split into `nodes` equal
// nodes, a mask naming a rank beyond the last, or a capacity below `nodes`.
// The checks of both plans without building one; returns the rows each rank receives in the dispatch (= the rows
// it contributes to the combine).
std::vector<int64_t> node_limited_rows(const std::vector<std::vector<uint64_t>>& masks, int nodes,
                                       int64_t relay_capacity);
NodeLimitedPlan plan_node_limited_dispatch(const std::vector<std::vector<uint64_t>>& masks, int nodes,
                                           int64_t relay_capacity);
NodeLimitedPlan plan_node_limited_combine(const std::vector<std::vector<uint64_t>>& masks, int nodes,
                                          int64_t relay_capacity);

// ---- the expert-major exchange of the executor's device path (rows stay on the device between the exchange
// and the experts) ----
//
// sent[q][s][e]: rows rank q sends to local expert e of rank s. On the token side, rank q's buffer holds its rows
// grouped by destination s, each group expert-major (what DistributedExchange sends); on the expert side, rank
// s's buffer holds what arrived expert-major: expert 0's rows from rank 0, then from rank 1, ..., then expert 1's
// — the layout the expert MLPs read (runtime/model/expert_exchange.hpp, ResidentRows). A move copies `rows`
// consecutive rows from token-side buffer `token` at `token_row` to expert-side buffer `expert` at `expert_row`:
// dispatch runs the moves as listed, combine runs them backwards.
struct RowMove {
    int token = 0, expert = 0;
    int64_t token_row = 0, expert_row = 0, rows = 0;
};
struct ExpertMajorPlan {
    std::vector<RowMove> moves;                     // one per (q, s, e) with rows
    std::vector<int64_t> token_rows;                // per rank: rows of its token-side buffer
    std::vector<std::vector<int64_t>> expert_first;  // per rank: each local expert's first row, then the total
};
// ConfigError for a tensor that is not n x n x E or holds negative counts.
ExpertMajorPlan plan_expert_major(const std::vector<std::vector<std::vector<int64_t>>>& sent);

}  // namespace duplex::kernels
