// Schedule generators. Costs never enter a plan: the same lists serve every cost model.
#include <algorithm>
#include <deque>
#include <functional>

#include <fmt/format.h>

#include "parallel/schedule.hpp"

#include "parallel/plan.hpp"

namespace duplex::sched {

namespace {

std::vector<std::vector<int>> linear_placement(int pp) {
    std::vector<int> p(pp);
    for (int s = 0; s < pp; ++s) p[s] = s;
    return {p};
}

// 1F1B: warm-up forwards, then one forward and one full backward in turn, then the remaining backwards.
std::vector<Instr> one_f_one_b_rank(int pp, int n, int rank) {
    std::vector<Instr> out;
    int warmup = std::min(pp - 1 - rank, n);
    int next_f = 0, next_b = 0;
    auto f = [&] { out.push_back({Op::F, {next_f++, rank, 0}, {}}); };
    auto bw = [&] { out.push_back({Op::BW, {}, {next_b++, rank, 0}}); };
    for (int i = 0; i < warmup; ++i) f();
    for (int i = 0; i < n - warmup; ++i) {
        f();
        bw();
    }
    for (int i = 0; i < warmup; ++i) bw();
    return out;
}

// Interleaved 1F1B (Megatron's virtual pipeline): p ranks, v model stages each (stage c * p + r on rank r). The
// forwards go in groups of p microbatches through the rank's stages in order (for each group: every stage of the
// rank, for each stage the group's p microbatches), the backwards in the same groups through the stages in reverse;
// (p - r - 1) * 2 + (v - 1) * p forwards warm up, then one forward and one full backward alternate, then the
// remaining backwards drain. With m == p every forward goes first (Megatron's all-warm-up case); with v == 1 the
// lists are 1F1B's. pairs (Megatron-Core's all-to-all overlap): the steady state's first forward alone, then each
// backward with the next forward as one F&B pair, the last steady backward alone.
std::vector<Instr> interleaved_rank(int p, int v, int m, int r, bool pairs) {
    int total = m * v;
    auto chunk = [&](int k, bool forward) {
        int in_group = k % (p * v);
        int c = in_group / p;
        return Chunk{k / (p * v) * p + in_group % p, (forward ? c : v - 1 - c) * p + r, 0};
    };
    int warmup = v == 1 ? std::min(p - r - 1, m)  // one stage per rank: plain 1F1B
                 : m == p ? total
                          : std::min(total, (p - r - 1) * 2 + (v - 1) * p);
    std::vector<Instr> out;
    int next_f = 0, next_b = 0;
    for (int i = 0; i < warmup; ++i) out.push_back({Op::F, chunk(next_f++, true), {}});
    for (int i = 0; i < total - warmup; ++i) {
        if (pairs && i > 0) {  // the backward of the previous step with this step's forward (never the same chunk)
            Chunk b = chunk(next_b++, false);
            out.push_back({Op::FB, chunk(next_f++, true), b});
            continue;
        }
        out.push_back({Op::F, chunk(next_f++, true), {}});
        if (!pairs) out.push_back({Op::BW, {}, chunk(next_b++, false)});
    }
    while (next_b < total) out.push_back({Op::BW, {}, chunk(next_b++, false)});
    return out;
}

// ZB-H1: the 1F1B memory limit (pp - stage forwards in flight), backward split into B and W, and every W
// deferred until the rank has nothing else to do. The order comes from a list-scheduling pass with unit
// costs (F = B = W = 1), priorities B > F > W; it is then fixed: the plan does not depend on real costs.
std::vector<std::vector<Instr>> zb1p(int pp, int n) {
    std::vector<std::vector<Instr>> lists(pp);
    std::vector<int> next_f(pp, 0), next_b(pp, 0), free_at(pp, 0);
    std::vector<std::deque<int>> pending_w(pp);
    // Time at which F(mb) / B(mb) of each stage finishes; -1 before it is scheduled.
    std::vector<std::vector<int>> f_done(pp, std::vector<int>(n, -1)), b_done(pp, std::vector<int>(n, -1));
    int remaining = 3 * n * pp;
    for (int t = 0; remaining > 0; ++t) {
        for (int s = 0; s < pp; ++s) {
            if (free_at[s] > t) continue;
            int b = next_b[s], f = next_f[s];
            bool b_ready = b < n && f_done[s][b] >= 0 && f_done[s][b] <= t &&
                           (s == pp - 1 || (b_done[s + 1][b] >= 0 && b_done[s + 1][b] <= t));
            bool f_ready = f < n && (f - b) < pp - s && (s == 0 || (f_done[s - 1][f] >= 0 && f_done[s - 1][f] <= t));
            if (b_ready) {
                lists[s].push_back({Op::B, {}, {b, s, 0}});
                b_done[s][b] = t + 1;
                pending_w[s].push_back(b);
                ++next_b[s];
            } else if (f_ready) {
                lists[s].push_back({Op::F, {f, s, 0}, {}});
                f_done[s][f] = t + 1;
                ++next_f[s];
            } else if (!pending_w[s].empty()) {
                lists[s].push_back({Op::W, {}, {pending_w[s].front(), s, 0}});
                pending_w[s].pop_front();
            } else {
                continue;
            }
            free_at[s] = t + 1;
            --remaining;
        }
    }
    return lists;
}

// DualPipe's eight-step per-rank plan, written once for DualPipe and DualPipeV. Phase 0 is the rank's own
// direction (DualPipe) or its first V stage (DualPipeV); phase 1 the other. B chunks with zero-bubble put
// their W on a FIFO that W instructions drain.
class DualPlan {
public:
    DualPlan(int half_ranks, int half_rank, int chunks_per_phase, std::function<Chunk(int phase, int index)> chunk)
        : H_(half_ranks), h_(half_rank), n_(chunks_per_phase), chunk_(std::move(chunk)) {}

    std::vector<Instr> build() {
        bool middle = h_ == H_ - 1;
        for (int i = 0; i < 2 * (H_ - h_ - 1); ++i) f(0);  // 1: nF0
        for (int i = 0; i < h_ + 1; ++i) {                   // 2: nF0F1
            f(0);
            f(1);
        }
        for (int i = 0; i < H_ - h_ - 1; ++i) {  // 3: nB1W1F1
            b(1, true);
            w();
            f(1);
        }
        for (int i = 0; i < n_ - 2 * H_ + h_ + 1; ++i) {  // 4: nF0B1F1B0
            if (i == 0 && middle) {
                // NOTE: the middle ranks run their first pair unoverlapped, which shortens the bubble.
                f(0);
                b(1, false);
            } else {
                fb(0, 1);
            }
            fb(1, 0);
        }
        for (int i = 0; i < H_ - h_ - 1; ++i) {  // 5: nB1F1B0
            b(1, false);
            fb(1, 0);
        }
        bool zb = false;  // 6: nB1B0, the second half with zero bubble
        int step6 = h_ + 1;
        for (int i = 0; i < step6; ++i) {
            if (i == step6 / 2 && h_ % 2 == 1) zb = true;
            b(1, zb);
            if (i == step6 / 2 && h_ % 2 == 0) zb = true;
            b(0, zb);
        }
        for (int i = 0; i < H_ - h_ - 1; ++i) {  // 7: nWB0
            w();
            b(0, true);
        }
        for (int i = 0; i < h_ + 1; ++i) w();  // 8: nW
        return std::move(out_);
    }

private:
    Chunk next_f(int phase) { return chunk_(phase, f_index_[phase]++); }
    Chunk next_b(int phase) { return chunk_(phase, b_index_[phase]++); }
    void f(int phase) { out_.push_back({Op::F, next_f(phase), {}}); }
    void b(int phase, bool zero_bubble) {
        Chunk c = next_b(phase);
        if (zero_bubble) {
            out_.push_back({Op::B, {}, c});
            deferred_.push_back(c);
        } else {
            out_.push_back({Op::BW, {}, c});
        }
    }
    void w() {
        if (deferred_.empty()) throw Error("DualPipe plan: W with no deferred weight gradient");
        out_.push_back({Op::W, {}, deferred_.front()});
        deferred_.pop_front();
    }
    void fb(int f_phase, int b_phase) {
        Chunk fc = next_f(f_phase);
        Chunk bc = next_b(b_phase);
        out_.push_back({Op::FB, fc, bc});
    }

    int H_, h_, n_;
    std::function<Chunk(int, int)> chunk_;
    int f_index_[2] = {0, 0}, b_index_[2] = {0, 0};
    std::deque<Chunk> deferred_;
    std::vector<Instr> out_;
};

}  // namespace

const char* kind_name(ScheduleKind k) {
    switch (k) {
        case ScheduleKind::OneFOneB: return "1f1b";
        case ScheduleKind::ZB1P: return "zb1p";
        case ScheduleKind::DualPipe: return "dualpipe";
        case ScheduleKind::DualPipeV: return "dualpipev";
        case ScheduleKind::Interleaved: return "interleaved";
        case ScheduleKind::InterleavedFB: return "interleaved-fb";
    }
    return "?";
}

ScheduleKind kind_from_name(const std::string& name) {
    for (auto k : {ScheduleKind::OneFOneB, ScheduleKind::ZB1P, ScheduleKind::DualPipe, ScheduleKind::DualPipeV,
                   ScheduleKind::Interleaved, ScheduleKind::InterleavedFB})
        if (name == kind_name(k)) return k;
    throw ConfigError(
        "--kind", fmt::format("unknown schedule '{}' (1f1b, zb1p, dualpipe, dualpipev, interleaved, interleaved-fb)", name));
}

const char* op_name(Op op) {
    switch (op) {
        case Op::F: return "F";
        case Op::B: return "B";
        case Op::W: return "W";
        case Op::BW: return "BW";
        case Op::FB: return "FB";
    }
    return "?";
}

int Schedule::direction_of_mb(int mb) const {
    return kind == ScheduleKind::DualPipe && mb >= num_microbatches / 2 ? 1 : 0;
}

void check_vpp(ScheduleKind kind, int pp, int vpp) {
    DUPLEX_CHECK_ARG(vpp == 1 || is_interleaved(kind), "--vpp",
                     "virtual pipeline stages (--vpp {}) are for the interleaved schedule, not {}", vpp, kind_name(kind));
    DUPLEX_CHECK_ARG(vpp >= 1, "--vpp", "model stages per rank must be at least 1, got {}", vpp);
    DUPLEX_CHECK_ARG(pp % vpp == 0, "--vpp",
                     "VPP={} must divide the {} model stages (interleaved: PP/VPP ranks hold VPP stages each)", vpp, pp);
}

void check_arguments(ScheduleKind kind, int pp, int n, int vpp) {
    DUPLEX_CHECK_ARG(pp >= 1, "--pp", "pipeline stages must be at least 1, got {}", pp);
    DUPLEX_CHECK_ARG(n >= 1, "--microbatches", "need at least 1 microbatch, got {}", n);
    // Bounds no real run comes near (DeepSeek-V3: 16 stages, tens of microbatches), so a typo is an error, not an
    // hour of generating instructions.
    DUPLEX_CHECK_ARG(pp <= kMaxStages, "--pp", "{} stages: at most {} are supported", pp, kMaxStages);
    DUPLEX_CHECK_ARG(n <= kMaxMicrobatches, "--microbatches", "{} microbatches: at most {} are supported", n,
                     kMaxMicrobatches);
    DUPLEX_CHECK_ARG(int64_t(pp) * n <= kMaxChunks, "--pp/--microbatches",
                     "{} stages x {} microbatches = {} chunks per direction: at most {} are supported", pp, n,
                     int64_t(pp) * n, kMaxChunks);
    check_vpp(kind, pp, vpp);
    DUPLEX_CHECK_ARG(kind != ScheduleKind::InterleavedFB || vpp >= 2, "--vpp",
                     "interleaved-fb pairs chunks of different stages of a rank: it needs VPP >= 2, got {} (with one "
                     "stage per rank its pairs would serialize the pipeline)", vpp);
    if (is_interleaved(kind)) {
        int ranks = pp / vpp;
        DUPLEX_CHECK_ARG(n % ranks == 0, "--microbatches",
                         "interleaved 1F1B runs microbatches in groups of the {} pipeline ranks: {} is not a multiple",
                         ranks, n);
    }
    if (kind == ScheduleKind::DualPipe || kind == ScheduleKind::DualPipeV) {
        const char* name = kind_name(kind);
        DUPLEX_CHECK_ARG(pp % 2 == 0 && pp >= 2, "--pp", "{} needs an even number of stages (>= 2), got {}", name, pp);
        if (kind == ScheduleKind::DualPipe) {
            DUPLEX_CHECK_ARG(n % 2 == 0, "--microbatches",
                             "dualpipe feeds half the microbatches from each end, so N must be even, got {}", n);
            DUPLEX_CHECK_ARG(n >= 2 * pp, "--microbatches", "dualpipe needs N >= 2*PP = {}, got {}", 2 * pp, n);
        } else {
            DUPLEX_CHECK_ARG(n >= pp, "--microbatches", "dualpipev needs N >= 2*ranks = PP = {}, got {}", pp, n);
        }
    }
}

std::vector<std::vector<int>> placement(ScheduleKind kind, int pp, int vpp) {
    switch (kind) {
        case ScheduleKind::Interleaved:
        case ScheduleKind::InterleavedFB: {
            std::vector<int> p(pp);
            for (int st = 0; st < pp; ++st) p[st] = st % pipeline_ranks(kind, pp, vpp);
            return {p};
        }
        case ScheduleKind::OneFOneB:
        case ScheduleKind::ZB1P: return linear_placement(pp);
        case ScheduleKind::DualPipe: {
            // Rank r holds stage r of the down direction and stage PP-1-r of the up one.
            std::vector<int> up(pp);
            for (int st = 0; st < pp; ++st) up[st] = pp - 1 - st;
            return {linear_placement(pp)[0], up};
        }
        case ScheduleKind::DualPipeV: {
            // PP/2 ranks: rank r holds stages r and PP-1-r, the V's two arms.
            int ranks = pipeline_ranks(kind, pp);
            std::vector<int> v(pp);
            for (int st = 0; st < pp; ++st) v[st] = st < ranks ? st : pp - 1 - st;
            return {v};
        }
    }
    throw ConfigError("--schedule", "unknown schedule kind");
}

std::vector<int> stages_of_rank(ScheduleKind kind, int pp, int rank, int vpp) {
    DUPLEX_CHECK_ARG(pp >= 1 && pp <= kMaxStages, "--pp", "pipeline stages must be at least 1, got {}", pp);
    DUPLEX_CHECK_ARG(kind != ScheduleKind::DualPipe || pp % 2 == 0, "--pp", "dualpipe needs an even number, got {}",
                     pp);
    DUPLEX_CHECK_ARG(kind != ScheduleKind::DualPipeV || pp % 2 == 0, "--pp", "dualpipev needs an even number, got {}",
                     pp);
    check_vpp(kind, pp, vpp);
    int ranks = pipeline_ranks(kind, pp, vpp);
    DUPLEX_CHECK_ARG(rank >= 0 && rank < ranks, "rank", "pipeline rank {} of {}", rank, ranks);
    std::vector<int> out;
    for (const std::vector<int>& dir : placement(kind, pp, vpp)) {
        // The stage this rank holds first in each direction's order of stages (its own, then its mirror).
        std::vector<int> mine;
        for (int st = 0; st < pp; ++st)
            if (dir[st] == rank) mine.push_back(st);
        for (int st : mine)
            if (std::find(out.begin(), out.end(), st) == out.end()) out.push_back(st);
    }
    return out;
}

Schedule generate(ScheduleKind kind, int pp, int n, int vpp) {
    check_arguments(kind, pp, n, vpp);
    Schedule s;
    s.kind = kind;
    s.pp = pp;
    s.vpp = vpp;
    s.num_microbatches = n;
    switch (kind) {
        case ScheduleKind::Interleaved:
        case ScheduleKind::InterleavedFB:
            s.num_ranks = pipeline_ranks(kind, pp, vpp);
            s.placement = placement(kind, pp, vpp);
            for (int r = 0; r < s.num_ranks; ++r)
                s.ranks.push_back(interleaved_rank(s.num_ranks, vpp, n, r, kind == ScheduleKind::InterleavedFB));
            break;
        case ScheduleKind::OneFOneB:
            s.num_ranks = pp;
            s.placement = placement(kind, pp);
            for (int r = 0; r < pp; ++r) s.ranks.push_back(one_f_one_b_rank(pp, n, r));
            break;
        case ScheduleKind::ZB1P:
            s.num_ranks = pp;
            s.placement = placement(kind, pp);
            s.ranks = zb1p(pp, n);
            break;
        case ScheduleKind::DualPipe: {
            s.num_ranks = pp;
            s.num_directions = 2;
            s.placement = placement(kind, pp);
            int half = pp / 2, per_dir = n / 2;
            for (int r = 0; r < pp; ++r) {
                bool second_half = r >= half;
                auto chunk = [=](int phase, int index) {
                    int dir = phase ^ (second_half ? 1 : 0);
                    return Chunk{dir * per_dir + index, dir == 0 ? r : pp - 1 - r, dir};
                };
                s.ranks.push_back(DualPlan(half, std::min(r, pp - 1 - r), per_dir, chunk).build());
            }
            break;
        }
        case ScheduleKind::DualPipeV: {
            int ranks = pipeline_ranks(kind, pp);
            s.num_ranks = ranks;
            s.placement = placement(kind, pp);
            for (int r = 0; r < ranks; ++r) {
                auto chunk = [=](int phase, int index) { return Chunk{index, phase == 0 ? r : pp - 1 - r, 0}; };
                s.ranks.push_back(DualPlan(ranks, r, n, chunk).build());
            }
            break;
        }
    }
    return s;
}

OpCounts count_ops(const std::vector<Instr>& list) {
    OpCounts c;
    for (const Instr& i : list) {
        switch (i.op) {
            case Op::F: ++c.f; break;
            case Op::B: ++c.b; break;
            case Op::W: ++c.w; break;
            case Op::BW: ++c.bw; break;
            case Op::FB: ++c.fb; break;
        }
    }
    return c;
}

uint32_t p2p_tag(const Schedule& s, const Chunk& c, bool gradient) {
    return static_cast<uint32_t>(((c.mb * s.pp + c.stage) * 2 + c.dir) * 2 + (gradient ? 1 : 0));
}

std::vector<P2P> p2p_of(const Schedule& s, int rank, const Instr& in) {
    std::vector<P2P> out;
    int last = s.pp - 1;
    auto forward = [&](const Chunk& c, bool recv_side) {
        if (recv_side && c.stage > 0) {
            int peer = s.rank_of(c.stage - 1, c.dir);
            Chunk src{c.mb, c.stage - 1, c.dir};
            if (peer != rank) out.push_back({false, false, peer, p2p_tag(s, src, false), src});
        }
        if (!recv_side && c.stage < last) {
            int peer = s.rank_of(c.stage + 1, c.dir);
            if (peer != rank) out.push_back({true, false, peer, p2p_tag(s, c, false), c});
        }
    };
    auto backward = [&](const Chunk& c, bool recv_side) {
        if (recv_side && c.stage < last) {
            int peer = s.rank_of(c.stage + 1, c.dir);
            Chunk src{c.mb, c.stage + 1, c.dir};
            if (peer != rank) out.push_back({false, true, peer, p2p_tag(s, src, true), src});
        }
        if (!recv_side && c.stage > 0) {
            int peer = s.rank_of(c.stage - 1, c.dir);
            if (peer != rank) out.push_back({true, true, peer, p2p_tag(s, c, true), c});
        }
    };
    bool has_f = in.op == Op::F || in.op == Op::FB;
    bool has_b = in.op == Op::B || in.op == Op::BW || in.op == Op::FB;
    if (has_f) forward(in.f, true);
    if (has_b) backward(in.b, true);
    if (has_f) forward(in.f, false);
    if (has_b) backward(in.b, false);
    return out;
}

}  // namespace duplex::sched
