// The validator: a discrete-event replay of every rank's list together. Each rank runs its instructions in
// order, each as soon as the rank is free and its inputs exist; the only shared resources are the
// dependencies, so one pass per instruction gives the exact as-soon-as-possible timeline.
#include <algorithm>
#include <map>
#include <set>
#include <tuple>

#include <fmt/format.h>

#include "parallel/schedule.hpp"

namespace duplex::sched {

namespace {

enum Product { kAct = 0, kGrad = 1, kWeight = 2 };
using Key = std::tuple<int, int, int, int>;  // (product, mb, stage, dir)

Key key(Product p, const Chunk& c) { return {p, c.mb, c.stage, c.dir}; }
std::string chunk_str(const Chunk& c) { return fmt::format("mb {} stage {} dir {}", c.mb, c.stage, c.dir); }
std::string what(Product p) { return p == kAct ? "activation" : p == kGrad ? "gradient" : "weight gradient"; }

struct Need {
    Product product;
    Chunk chunk;
    bool remote;  // produced on another rank: a transfer
    int from = -1;  // the producing rank
};

// What an instruction consumes.
std::vector<Need> needs_of(const Schedule& s, int rank, const Instr& in) {
    std::vector<Need> needs;
    auto forward = [&](const Chunk& c) {
        if (c.stage > 0) {
            Chunk src{c.mb, c.stage - 1, c.dir};
            needs.push_back({kAct, src, s.rank_of(src.stage, src.dir) != rank, s.rank_of(src.stage, src.dir)});
        }
    };
    auto backward = [&](const Chunk& c) {
        needs.push_back({kAct, c, false, rank});  // its own forward, on this rank
        if (c.stage < s.pp - 1) {
            Chunk src{c.mb, c.stage + 1, c.dir};
            needs.push_back({kGrad, src, s.rank_of(src.stage, src.dir) != rank, s.rank_of(src.stage, src.dir)});
        }
    };
    switch (in.op) {
        case Op::F: forward(in.f); break;
        case Op::B:
        case Op::BW: backward(in.b); break;
        case Op::W: needs.push_back({kGrad, in.b, false, rank}); break;
        case Op::FB:
            forward(in.f);
            backward(in.b);
            break;
    }
    return needs;
}

}  // namespace

void check_costs(const Costs& c) {
    DUPLEX_CHECK_ARG(c.f >= 0, "--cost-f", "must not be negative, got {}", c.f);
    DUPLEX_CHECK_ARG(c.b >= 0, "--cost-b", "must not be negative, got {}", c.b);
    DUPLEX_CHECK_ARG(c.w >= 0, "--cost-w", "must not be negative, got {}", c.w);
    DUPLEX_CHECK_ARG(c.fb < 0 || c.fb >= 0, "--cost-fb", "must not be negative, got {}", c.fb);
    DUPLEX_CHECK_ARG(c.p2p >= 0, "--p2p-latency", "must not be negative, got {}", c.p2p);
    DUPLEX_CHECK_ARG(c.w <= c.b, "--cost-w", "the weight-gradient part ({}) cannot exceed the full backward ({})", c.w, c.b);
}

Replay replay(const Schedule& s, const Costs& costs) {
    check_costs(costs);
    Timing t;
    t.duration = [&](int, const Instr& in) {
        switch (in.op) {
            case Op::F: return costs.f;
            case Op::B: return costs.b - costs.w;
            case Op::W: return costs.w;
            case Op::BW: return costs.b;
            case Op::FB: return costs.fb_cost();
        }
        return 0.0;
    };
    double p2p = costs.p2p;
    t.transfer = [p2p](int, int) { return p2p; };
    return replay(s, t);
}

namespace {

// Static checks: every instruction on the rank its stage lives on, none twice, none missing. ScheduleError
// listing the problems.
void check_placement(const Schedule& s) {
    int R = s.num_ranks;
    std::vector<std::string> problems;

    std::map<Key, int> produced_by;  // product -> rank
    auto produce = [&](Product p, const Chunk& c, int rank) {
        if (c.stage < 0 || c.stage >= s.pp || c.dir < 0 || c.dir >= s.num_directions) {
            problems.push_back(fmt::format("rank {}: {} of {} is outside the pipeline", rank, what(p), chunk_str(c)));
            return;
        }
        if (s.rank_of(c.stage, c.dir) != rank)
            problems.push_back(fmt::format("rank {}: runs {} which lives on rank {}", rank, chunk_str(c),
                                           s.rank_of(c.stage, c.dir)));
        auto [it, fresh] = produced_by.emplace(key(p, c), rank);
        if (!fresh)
            problems.push_back(fmt::format("rank {}: duplicate {} of {} (also on rank {})", rank,
                                           p == kAct ? "F" : p == kGrad ? "B" : "W", chunk_str(c), it->second));
    };
    for (int r = 0; r < R; ++r) {
        for (const Instr& in : s.ranks[r]) {
            if (in.op == Op::F || in.op == Op::FB) produce(kAct, in.f, r);
            if (in.op == Op::B || in.op == Op::BW || in.op == Op::FB) produce(kGrad, in.b, r);
            if (in.op == Op::W || in.op == Op::BW || in.op == Op::FB) produce(kWeight, in.b, r);
        }
    }
    int missing = 0;
    for (int mb = 0; mb < s.num_microbatches; ++mb) {
        int dir = s.direction_of_mb(mb);
        for (int st = 0; st < s.pp; ++st) {
            for (Product p : {kAct, kGrad, kWeight}) {
                if (produced_by.count(key(p, {mb, st, dir}))) continue;
                if (++missing <= 20) {
                    const char* op = p == kAct ? "F" : p == kGrad ? "B" : "W";
                    std::string extra;
                    if (p == kAct && st > 0 && produced_by.count(key(kAct, {mb, st - 1, dir})))
                        extra = fmt::format(": the activation sent by stage {} has no matching receive", st - 1);
                    if (p == kWeight && produced_by.count(key(kGrad, {mb, st, dir})))
                        extra = ": a deferred W is left in the queue";
                    problems.push_back(fmt::format("missing {} of mb {} stage {} dir {}{}", op, mb, st, dir, extra));
                }
            }
        }
    }
    if (missing > 20) problems.push_back(fmt::format("... and {} more missing instructions", missing - 20));
    if (!problems.empty())
        throw ScheduleError(fmt::format("invalid {} schedule (PP={}, N={}):\n  {}", kind_name(s.kind), s.pp,
                                        s.num_microbatches, fmt::join(problems, "\n  ")));

}

// Where the timed replay stopped: per rank, the next instruction and when the rank is free; when each product
// was done.
struct Progress {
    std::vector<size_t> pc;
    std::vector<double> free_at;
    std::map<Key, double> done_at;
};

// The timed replay: each rank runs its instructions in order, each as soon as the rank is free and its inputs
// exist, until no rank can go on.
Progress run_timed(const Schedule& s, const Timing& timing, Replay& out) {
    int R = s.num_ranks;
    Progress g{std::vector<size_t>(size_t(R), 0), std::vector<double>(size_t(R), 0.0), {}};
    auto& pc = g.pc;
    auto& free_at = g.free_at;
    auto& done_at = g.done_at;
    out.busy.assign(R, 0);
    out.spans.resize(R);
    for (bool progress = true; progress;) {
        progress = false;
        for (int r = 0; r < R; ++r) {
            while (pc[r] < s.ranks[r].size()) {
                const Instr& in = s.ranks[r][pc[r]];
                double start = free_at[r];
                bool ready = true;
                for (const Need& n : needs_of(s, r, in)) {
                    auto it = done_at.find(key(n.product, n.chunk));
                    if (it == done_at.end()) {
                        ready = false;
                        break;
                    }
                    double link = n.remote && timing.transfer ? timing.transfer(n.from, r) : 0.0;
                    start = std::max(start, it->second + link);
                }
                if (!ready) break;
                double end = start + timing.duration(r, in);
                if (in.op == Op::F || in.op == Op::FB) done_at[key(kAct, in.f)] = end;
                if (in.op == Op::B || in.op == Op::BW || in.op == Op::FB) done_at[key(kGrad, in.b)] = end;
                if (in.op == Op::W || in.op == Op::BW || in.op == Op::FB) done_at[key(kWeight, in.b)] = end;
                out.spans[r].push_back({start, end});
                out.busy[r] += end - start;
                free_at[r] = end;
                ++pc[r];
                progress = true;
            }
        }
    }
    return g;
}

// A rank left with instructions is in a deadlock: follow "waits for" edges from a blocked rank until a rank
// repeats, and throw the cycle.
void throw_if_deadlocked(const Schedule& s, const Progress& g) {
    int R = s.num_ranks;
    const auto& pc = g.pc;
    const auto& done_at = g.done_at;
    std::vector<int> waits_for(R, -1);
    std::vector<std::string> waiting_on(R);
    bool blocked = false;
    for (int r = 0; r < R; ++r) {
        if (pc[r] >= s.ranks[r].size()) continue;
        blocked = true;
        const Instr& in = s.ranks[r][pc[r]];
        for (const Need& n : needs_of(s, r, in)) {
            if (done_at.count(key(n.product, n.chunk))) continue;
            waits_for[r] = s.rank_of(n.chunk.stage, n.chunk.dir);
            waiting_on[r] = fmt::format("rank {} at instruction {} ({}) waits for the {} of {} from rank {}{}", r, pc[r],
                                        op_name(in.op), what(n.product), chunk_str(n.chunk), waits_for[r],
                                        waits_for[r] == r ? " (itself: it comes later in its own list)" : "");
            break;
        }
    }
    if (blocked) {
        int start = 0;
        while (waits_for[start] < 0) ++start;
        std::vector<int> seen(R, -1), path;
        int r = start;
        while (r >= 0 && seen[r] < 0) {
            seen[r] = static_cast<int>(path.size());
            path.push_back(r);
            r = waits_for[r];
        }
        std::vector<std::string> cycle;
        if (r >= 0) {
            for (size_t i = static_cast<size_t>(seen[r]); i < path.size(); ++i) cycle.push_back(waiting_on[path[i]]);
        } else {
            for (int p : path)
                if (!waiting_on[p].empty()) cycle.push_back(waiting_on[p]);
        }
        throw ScheduleError(fmt::format("deadlock in {} schedule (PP={}, N={}); cycle of waiting ranks:\n  {}",
                                        kind_name(s.kind), s.pp, s.num_microbatches, fmt::join(cycle, "\n  ")));
    }
}

// Makespan, idle time, peak live activations and parameter copies per rank.
void summarize(const Schedule& s, const Progress& g, Replay& out) {
    int R = s.num_ranks;
    const auto& free_at = g.free_at;
    for (int r = 0; r < R; ++r) out.makespan = std::max(out.makespan, free_at[r]);
    out.idle.resize(R);
    out.peak_activations.assign(R, 0);
    out.param_copies.assign(R, 0);
    for (int r = 0; r < R; ++r) {
        out.idle[r] = out.makespan - out.busy[r];
        int live = 0;
        std::set<std::pair<int, int>> stages;
        for (const Instr& in : s.ranks[r]) {
            // NOTE: counted at instruction boundaries: an FB pair frees its backward chunk and keeps its forward
            // one, net zero, while an unpaired F followed by B peaks one higher (DualPipe's middle ranks).
            if (in.op == Op::F) live += 1;
            if (in.op == Op::B || in.op == Op::BW) live -= 1;
            out.peak_activations[r] = std::max(out.peak_activations[r], live);
            if (in.op == Op::F || in.op == Op::FB) stages.insert({in.f.stage, 0});
            if (in.op != Op::F) stages.insert({in.b.stage, 0});
        }
        out.param_copies[r] = static_cast<int>(stages.size());
    }
}

}  // namespace

Replay replay(const Schedule& s, const Timing& timing) {
    check_placement(s);
    Replay out;
    Progress g = run_timed(s, timing, out);
    throw_if_deadlocked(s, g);
    summarize(s, g, out);
    return out;
}

double formula_bubble(ScheduleKind kind, int pp, const Costs& c, int vpp) {
    switch (kind) {
        case ScheduleKind::OneFOneB: return (pp - 1) * (c.f + c.b);
        case ScheduleKind::Interleaved:
        case ScheduleKind::InterleavedFB: return (pp / vpp - 1) * (c.f + c.b);  // F&B pairs: an estimate
        case ScheduleKind::ZB1P: return (pp - 1) * (c.f + c.b - 2 * c.w);
        case ScheduleKind::DualPipe:
        case ScheduleKind::DualPipeV: return (pp / 2 - 1) * (c.fb_cost() + c.b - 3 * c.w);
    }
    return 0;
}

bool formula_is_exact(ScheduleKind kind, const Costs& c) {
    if (c.p2p != 0) return false;
    if (kind == ScheduleKind::OneFOneB) return true;
    if (kind == ScheduleKind::Interleaved) return true;  // every rank idles (p - 1)(F + B): checked for any F, B
    return c.b - c.w == c.f;
}

}  // namespace duplex::sched
