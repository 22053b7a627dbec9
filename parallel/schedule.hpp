// Pipeline schedules as data: for each pipeline rank, the ordered list of instructions it executes.
// Generating, validating (a discrete-event replay), rendering, simulating and executing are separate
// functions over the same value.
//
//   sched::Schedule s = sched::generate(sched::ScheduleKind::DualPipe, /*pp=*/8, /*microbatches=*/20);
//   sched::Replay r = sched::replay(s, {.f = 1, .b = 2, .w = 1, .fb = 3});   // throws ScheduleError if invalid
//   r.makespan == 66;  r.peak_activations[3] == 9;
//   std::string svg = sched::render_svg(s, r);
//
// Interleaved 1F1B (Megatron's virtual pipeline stages) places pp model stages round-robin on pp / vpp ranks:
//   sched::generate(sched::ScheduleKind::Interleaved, /*pp=*/8, /*microbatches=*/8, /*vpp=*/2);  // 4 ranks
// stage s on rank s % (pp / vpp), so Megatron's "PP 4, VP 2" is pp = 8 model stages here, as DualPipeV's pp counts
// its model stages (two per rank).
//
// Instructions. A chunk is one microbatch on one model stage in one direction. F runs its forward; B its
// input-gradient backward (the weight gradient W is deferred, zero-bubble style); BW a full backward (B then
// W); W a deferred weight gradient; FB a forward chunk and a full backward chunk run together (DualPipe's
// overlapped pair). Point-to-point transfers are implied: a forward on stage s > 0 receives the activation
// of stage s-1 of the same direction, a backward on stage s < S-1 receives the gradient of stage s+1; peers
// and tags follow from the instruction (p2p_of).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/error.hpp"

namespace duplex::sched {

enum class ScheduleKind { OneFOneB, ZB1P, DualPipe, DualPipeV, Interleaved, InterleavedFB };
// Interleaved 1F1B, plain or with its steady state's forward and backward run as F&B pairs (InterleavedFB: what
// Megatron-Core's expert-parallel all-to-all overlap does, one microbatch's exchange hidden behind the other's
// compute, as DualPipe's pairs).
inline bool is_interleaved(ScheduleKind k) { return k == ScheduleKind::Interleaved || k == ScheduleKind::InterleavedFB; }
enum class Op : uint8_t { F, B, W, BW, FB };

// Bounds on a schedule's size (ConfigError beyond them).
constexpr int kMaxStages = 4096;
constexpr int kMaxMicrobatches = 1000000;
constexpr int64_t kMaxChunks = 4000000;

const char* kind_name(ScheduleKind k);
ScheduleKind kind_from_name(const std::string& name);  // "1f1b", "zb1p", "dualpipe", "dualpipev", "interleaved", "interleaved-fb"
const char* op_name(Op op);

struct Chunk {
    int mb = -1;     // microbatch id (0..N-1, unique across directions)
    int stage = -1;  // model stage 0..S-1
    int dir = 0;     // direction: 0 enters at rank 0; 1 (DualPipe only) enters at the last rank
    bool operator==(const Chunk&) const = default;
};

struct Instr {
    Op op;
    Chunk f;  // F, FB: the forward chunk
    Chunk b;  // B, W, BW, FB: the backward chunk (full backward in FB)
};

struct Schedule {
    ScheduleKind kind;
    int pp = 0;              // pipeline stages of the model (DualPipeV runs them on pp/2 ranks)
    int num_ranks = 0;
    int num_microbatches = 0;
    int num_directions = 1;
    int vpp = 1;             // model stages per rank (Interleaved; DualPipeV's two are implied by its kind)
    std::vector<std::vector<int>> placement;  // placement[dir][stage] = rank holding it
    std::vector<std::vector<Instr>> ranks;    // per rank, in execution order

    int num_stages() const { return pp; }
    int rank_of(int stage, int dir) const { return placement.at(dir).at(stage); }
    int direction_of_mb(int mb) const;  // DualPipe: first half of the microbatches go down, the rest up
};

// Throws ConfigError naming the violated constraint (odd PP or N for DualPipe, N < 2PP, PP < 1, VPP not dividing
// PP, ...). vpp: model stages per rank, Interleaved only (1 for every other kind).
Schedule generate(ScheduleKind kind, int pp, int num_microbatches, int vpp = 1);
// Which rank holds each model stage: placement[dir][stage] (what generate puts in Schedule::placement). 1F1B and
// ZB1P: stage s on rank s; DualPipe: rank r holds stage r going down and stage PP-1-r going up; DualPipeV: PP/2
// ranks, rank r holds stages r and PP-1-r; Interleaved: PP/VPP ranks, stage s on rank s % (PP/VPP).
std::vector<std::vector<int>> placement(ScheduleKind kind, int pp, int vpp = 1);
// The model stages pipeline rank `rank` holds, its own stage first (r, then PP-1-r for DualPipe and DualPipeV;
// r, r + PP/VPP, ... for Interleaved).
std::vector<int> stages_of_rank(ScheduleKind kind, int pp, int rank, int vpp = 1);
void check_arguments(ScheduleKind kind, int pp, int num_microbatches, int vpp = 1);
void check_vpp(ScheduleKind kind, int pp, int vpp);  // VPP only for Interleaved, dividing PP

struct Costs {
    double f = 1;       // forward chunk
    double b = 2;       // full backward chunk (input gradient + weight gradient)
    double w = 1;       // weight-gradient part of b; an input-gradient-only backward costs b - w
    double fb = -1;     // overlapped forward + full backward; < 0: f + b (no overlap benefit)
    double p2p = 0;     // latency added to a transfer between different ranks
    double fb_cost() const { return fb < 0 ? f + b : fb; }
};
void check_costs(const Costs& c);  // ConfigError for negative costs or w > b

struct Span {
    double start = 0, end = 0;
};

struct Replay {
    double makespan = 0;
    std::vector<double> busy, idle;             // per rank
    std::vector<int> peak_activations;          // per rank, microbatch-chunks alive (forward done, backward not) at
                                                // instruction boundaries
    std::vector<int> param_copies;              // per rank, model stages held
    std::vector<std::vector<Span>> spans;       // per rank, per instruction
};

// The error a replay raises for an invalid schedule; what() lists every problem found.
class ScheduleError : public Error {
public:
    using Error::Error;
};

// Replays every rank's list together with the given costs: raises ScheduleError for deadlock (with the cycle
// of waiting ranks), a transfer nobody receives, a dependency nobody produces, a chunk on the wrong rank, a
// missing or duplicated F/B/W, or a deferred W left over; otherwise returns timings and memory.
Replay replay(const Schedule& s, const Costs& costs);
// The same replay with durations per instruction (stages of different cost, modelled overlap) and a transfer
// time per pair of ranks (links of different classes): what the simulator runs.
struct Timing {
    std::function<double(int rank, const Instr&)> duration;
    std::function<double(int from, int to)> transfer;  // empty: 0
};
Replay replay(const Schedule& s, const Timing& timing);

// The published bubble per rank (docs/reference.md) and whether it is exact for these costs. Interleaved 1F1B:
// (PP/VPP - 1)(F + B) with the costs of one model stage, i.e. (p - 1)/(v m) of the ideal step.
double formula_bubble(ScheduleKind kind, int pp, const Costs& c, int vpp = 1);
bool formula_is_exact(ScheduleKind kind, const Costs& c);

// The transfers an instruction implies on `rank`: receives before it runs, sends after.
struct P2P {
    bool send;      // else receive
    bool gradient;  // else activation
    int peer;
    uint32_t tag;
    Chunk chunk;    // the chunk whose output travels
};
std::vector<P2P> p2p_of(const Schedule& s, int rank, const Instr& instr);
uint32_t p2p_tag(const Schedule& s, const Chunk& c, bool gradient);

struct OpCounts {
    int f = 0, b = 0, w = 0, bw = 0, fb = 0;
};
OpCounts count_ops(const std::vector<Instr>& list);

// An SVG timeline in the style of the DualPipe figure, and a terminal version (one character per
// time unit: F/B/W/X for forward, input-grad backward, weight grad, overlapped pair; lower case for the
// reverse direction; '=' for a full backward; '.' idle).
std::string render_svg(const Schedule& s, const Replay& r, const Costs& c);
std::string render_text(const Schedule& s, const Replay& r);

}  // namespace duplex::sched
