#include "parallel/schedule.hpp"

#include "core/error.hpp"

#include <map>
#include <set>
#include <string>

#include <fmt/format.h>
#include <gtest/gtest.h>

namespace duplex::sched {
namespace {

Costs costs(double f, double b, double w, double fb = -1) {
    Costs c;
    c.f = f;
    c.b = b;
    c.w = w;
    c.fb = fb;
    return c;
}

TEST(Schedule, DualPipePublishedNumbersAtPP8N20) {
    Schedule s = generate(ScheduleKind::DualPipe, 8, 20);
    Replay r3 = replay(s, costs(1, 2, 1, 3));
    EXPECT_EQ(r3.makespan, 66);
    for (double idle : r3.idle) EXPECT_EQ(idle, 6);
    EXPECT_EQ(replay(s, costs(1, 2, 1, 2)).makespan, 52);
    EXPECT_EQ(r3.peak_activations, (std::vector<int>{8, 8, 8, 9, 9, 8, 8, 8}));
    EXPECT_EQ(r3.param_copies, std::vector<int>(8, 2));
}

TEST(Schedule, OneFOneBPublishedNumbersAtPP8N20) {
    Replay r = replay(generate(ScheduleKind::OneFOneB, 8, 20), costs(1, 2, 1));
    EXPECT_EQ(r.makespan, 81);  // (N + PP - 1)(F + B)
    EXPECT_EQ(r.peak_activations[0], 8);
    EXPECT_EQ(r.param_copies[0], 1);
}

// The op letters of a rank's list: F, B (B or BW), W, X (F&B pair).
std::string letters(const std::vector<Instr>& list) {
    std::string out;
    for (const Instr& in : list) out += in.op == Op::F ? 'F' : in.op == Op::W ? 'W' : in.op == Op::FB ? 'X' : 'B';
    return out;
}

std::string repeat(const std::string& unit, int n) {
    std::string out;
    for (int i = 0; i < n; ++i) out += unit;
    return out;
}

TEST(Schedule, DualPipeStepCountsMatchReference) {
    // docs/reference.md, PP=8, N=20, steps 1..8 for h = min(r, PP-1-r).
    const std::map<int, std::vector<int>> steps = {{0, {6, 1, 3, 3, 3, 1, 3, 1}},
                                                   {1, {4, 2, 2, 4, 2, 2, 2, 2}},
                                                   {2, {2, 3, 1, 5, 1, 3, 1, 3}},
                                                   {3, {0, 4, 0, 6, 0, 4, 0, 4}}};
    Schedule s = generate(ScheduleKind::DualPipe, 8, 20);
    for (int r = 0; r < 8; ++r) {
        const auto& n = steps.at(std::min(r, 7 - r));
        bool middle = r == 3 || r == 4;
        std::string step4 = middle ? "FBX" + repeat("XX", n[3] - 1) : repeat("XX", n[3]);
        std::string want = repeat("F", n[0]) + repeat("FF", n[1]) + repeat("BWF", n[2]) + step4 + repeat("BX", n[4]) +
                           repeat("BB", n[5]) + repeat("WB", n[6]) + repeat("W", n[7]);
        EXPECT_EQ(letters(s.ranks[r]), want) << "rank " << r;
        // Warm-up forwards before the first backward: PP on every rank.
        int warm = 0;
        for (const Instr& in : s.ranks[r]) {
            if (in.op != Op::F) break;
            ++warm;
        }
        // (the middle ranks' first F&B pair runs unoverlapped: its F is not a warm-up forward)
        EXPECT_EQ(warm - (middle ? 1 : 0), 8) << "rank " << r;
    }
}

TEST(Schedule, DualPipeRanksHoldMirroredStages) {
    Schedule s = generate(ScheduleKind::DualPipe, 6, 12);
    for (int r = 0; r < 6; ++r) {
        EXPECT_EQ(s.rank_of(r, 0), r);
        EXPECT_EQ(s.rank_of(5 - r, 1), r);
        for (const Instr& in : s.ranks[r]) {
            if (in.op == Op::F || in.op == Op::FB) {
                EXPECT_EQ(in.f.stage, in.f.dir == 0 ? r : 5 - r);
            }
        }
    }
}

// The stages each rank holds, written out from the papers' figures (DualPipe: rank r runs stage r going down and
// stage PP-1-r going up; DualPipeV folds PP stages on PP/2 ranks as a V), and the same answer from every plan.
TEST(Schedule, StagesOfRankArePublishedPairing) {
    using V = std::vector<int>;
    EXPECT_EQ(stages_of_rank(ScheduleKind::OneFOneB, 4, 2), V{2});
    EXPECT_EQ(stages_of_rank(ScheduleKind::ZB1P, 4, 3), V{3});
    EXPECT_EQ(stages_of_rank(ScheduleKind::DualPipe, 8, 0), (V{0, 7}));
    EXPECT_EQ(stages_of_rank(ScheduleKind::DualPipe, 8, 2), (V{2, 5}));
    EXPECT_EQ(stages_of_rank(ScheduleKind::DualPipe, 8, 5), (V{5, 2}));
    EXPECT_EQ(stages_of_rank(ScheduleKind::DualPipeV, 8, 1), (V{1, 6}));
    EXPECT_EQ(stages_of_rank(ScheduleKind::DualPipeV, 8, 3), (V{3, 4}));
    EXPECT_THROW(stages_of_rank(ScheduleKind::DualPipeV, 8, 4), ConfigError);  // 4 ranks
    EXPECT_THROW(stages_of_rank(ScheduleKind::DualPipe, 7, 0), ConfigError);
    for (auto k : {ScheduleKind::OneFOneB, ScheduleKind::ZB1P, ScheduleKind::DualPipe, ScheduleKind::DualPipeV}) {
        Schedule s = generate(k, 6, 12);
        for (int r = 0; r < s.num_ranks; ++r) {
            std::set<int> held;
            for (const auto& rank_of_stage : s.placement)
                for (int st = 0; st < s.pp; ++st)
                    if (rank_of_stage[st] == r) held.insert(st);
            for (const std::vector<Instr>& list : {s.ranks[r]})
                for (const Instr& in : list)
                    for (const Chunk& c : {in.f, in.b}) {
                        if (c.stage >= 0) {
                            EXPECT_TRUE(held.count(c.stage)) << "rank " << r << " runs stage " << c.stage;
                        }
                    }
            V got = stages_of_rank(k, 6, r);
            EXPECT_EQ(std::set<int>(got.begin(), got.end()), held) << "rank " << r;
            EXPECT_EQ(got.front(), r) << "its own stage first";
        }
    }
}

struct Grid {
    ScheduleKind kind;
    int pp, n;
};

std::vector<Grid> property_grid() {
    std::vector<Grid> g;
    for (int pp = 2; pp <= 32; pp += 2)
        for (int n = 2 * pp; n <= 4 * pp; n += 2)
            for (auto k : {ScheduleKind::OneFOneB, ScheduleKind::ZB1P, ScheduleKind::DualPipe, ScheduleKind::DualPipeV})
                g.push_back({k, pp, n});
    return g;
}

TEST(ScheduleProperties, EveryScheduleValidatesAndMeetsItsFormula) {
    const std::vector<Costs> exact_costs = {costs(1, 2, 1, 3), costs(1, 2, 1, 2), costs(1.5, 2.25, 0.75, 3.2)};
    std::map<std::pair<int, int>, double> dualpipe_idle_at_min_n;  // (kind, pp) -> idle at N = 2PP
    int checked = 0;
    for (const Grid& g : property_grid()) {
        Schedule s = generate(g.kind, g.pp, g.n);
        for (const Costs& c : exact_costs) {
            Replay r;
            ASSERT_NO_THROW(r = replay(s, c)) << kind_name(g.kind) << " PP=" << g.pp << " N=" << g.n;
            // Every F has exactly one B and one W (the replay throws otherwise); the counts add up.
            int f = 0, b = 0, w = 0;
            for (const auto& list : s.ranks) {
                OpCounts oc = count_ops(list);
                f += oc.f + oc.fb;
                b += oc.b + oc.bw + oc.fb;
                w += oc.w + oc.bw + oc.fb;
            }
            ASSERT_EQ(f, g.pp * g.n);
            ASSERT_EQ(b, g.pp * g.n);
            ASSERT_EQ(w, g.pp * g.n);
            double formula = formula_bubble(g.kind, g.pp, c);
            double max_idle = *std::max_element(r.idle.begin(), r.idle.end());
            ASSERT_NEAR(max_idle, formula, 1e-9)
                << kind_name(g.kind) << " PP=" << g.pp << " N=" << g.n << " F&B=" << c.fb_cost();
            if (g.kind == ScheduleKind::OneFOneB || g.kind == ScheduleKind::ZB1P) {
                for (double idle : r.idle) {
                    ASSERT_NEAR(idle, formula, 1e-9) << kind_name(g.kind) << " PP=" << g.pp;
                }
                ASSERT_EQ(r.peak_activations[0], g.pp);
            }
            if (&c == &exact_costs[0] && (g.kind == ScheduleKind::DualPipe || g.kind == ScheduleKind::DualPipeV)) {
                auto key = std::make_pair(static_cast<int>(g.kind), g.pp);
                if (!dualpipe_idle_at_min_n.count(key)) dualpipe_idle_at_min_n[key] = max_idle;
                // Idle does not grow with N.
                ASSERT_LE(max_idle, dualpipe_idle_at_min_n[key] + 1e-9) << "PP=" << g.pp << " N=" << g.n;
            }
            ++checked;
        }
    }
    EXPECT_GT(checked, 1000);
}

TEST(ScheduleProperties, FormulaIsAnEstimateWhenBMinusWDiffersFromF) {
    // B - W != F: the replay still validates; the formula is flagged as inexact.
    Costs c = costs(1, 3, 1, 3.5);
    EXPECT_FALSE(formula_is_exact(ScheduleKind::DualPipe, c));
    EXPECT_NO_THROW(replay(generate(ScheduleKind::DualPipe, 8, 20), c));
}

// What fn throws as a ConfigError ("no error" when it does not throw).
template <typename Fn>
std::string message(Fn fn) {
    try {
        fn();
    } catch (const ConfigError& e) {
        return std::string(e.what());
    }
    return std::string("no error");
}

TEST(Schedule, BadInputNamesTheConstraint) {
    EXPECT_NE(message([] { generate(ScheduleKind::DualPipe, 7, 28); }).find("even number of stages"), std::string::npos);
    EXPECT_NE(message([] { generate(ScheduleKind::DualPipe, 8, 21); }).find("N must be even"), std::string::npos);
    EXPECT_NE(message([] { generate(ScheduleKind::DualPipe, 8, 14); }).find("N >= 2*PP = 16"), std::string::npos);
    EXPECT_NE(message([] { generate(ScheduleKind::OneFOneB, 0, 4); }).find("at least 1"), std::string::npos);
    EXPECT_NE(message([] { generate(ScheduleKind::DualPipeV, 8, 6); }).find("N >= 2*ranks"), std::string::npos);
    EXPECT_NE(message([] { replay(generate(ScheduleKind::OneFOneB, 2, 4), costs(-1, 2, 1)); }).find("--cost-f"),
              std::string::npos);
    EXPECT_NE(message([] { replay(generate(ScheduleKind::OneFOneB, 2, 4), costs(1, 2, 3)); }).find("cannot exceed"),
              std::string::npos);
    EXPECT_THROW(kind_from_name("gpipe"), ConfigError);
}

// Interleaved 1F1B as Megatron orders it, written out by hand for PP 2 x VPP 2 (4 model stages: rank 0 holds 0 and 2,
// rank 1 holds 1 and 3), 4 microbatches: forwards in groups of 2 microbatches per model chunk, backwards through the
// chunks in reverse; rank 0 warms up with (2 - 0 - 1) * 2 + (2 - 1) * 2 = 4 forwards, rank 1 with 2.
TEST(Interleaved, MegatronOrderWrittenOut) {
    Schedule s = generate(ScheduleKind::Interleaved, 4, 4, 2);
    ASSERT_EQ(s.num_ranks, 2);
    EXPECT_EQ(s.placement, (std::vector<std::vector<int>>{{0, 1, 0, 1}}));
    auto str = [](const std::vector<Instr>& list) {
        std::string out;
        for (const Instr& in : list) {
            const Chunk& c = in.op == Op::F ? in.f : in.b;
            out += fmt::format("{}{}s{} ", in.op == Op::F ? "F" : "B", c.mb, c.stage);
        }
        return out;
    };
    EXPECT_EQ(str(s.ranks[0]), "F0s0 F1s0 F0s2 F1s2 F2s0 B0s2 F3s0 B1s2 F2s2 B0s0 F3s2 B1s0 B2s2 B3s2 B2s0 B3s0 ");
    EXPECT_EQ(str(s.ranks[1]), "F0s1 F1s1 F0s3 B0s3 F1s3 B1s3 F2s1 B0s1 F3s1 B1s1 F2s3 B2s3 F3s3 B3s3 B2s1 B3s1 ");
    for (const auto& list : s.ranks)
        for (const Instr& in : list) EXPECT_TRUE(in.op == Op::F || in.op == Op::BW) << "full backwards, as Megatron";
    EXPECT_EQ(stages_of_rank(ScheduleKind::Interleaved, 8, 1, 4), (std::vector<int>{1, 3, 5, 7}));
}

// For every (p, v, m): valid, the bubble of every rank is Megatron's (p - 1)(F + B) per chunk costs, i.e. (p - 1)/(v m)
// of the ideal step, whatever F and B; rank 0 holds (p - 1) * 2 + (v - 1) * p + 1 chunks at its peak; v = 1 is 1F1B.
TEST(Interleaved, EveryLayoutValidatesWithMegatronsBubble) {
    int checked = 0;
    for (int p = 2; p <= 8; ++p)
        for (int v = 1; v <= 4; ++v)
            for (int groups = 1; groups <= 3; ++groups) {
                int m = p * groups;
                Schedule s = generate(ScheduleKind::Interleaved, p * v, m, v);
                ASSERT_EQ(s.num_ranks, p);
                for (const Costs& c : {costs(1, 2, 0), costs(1, 3, 0), costs(2, 3, 0), costs(1.5, 1.25, 0)}) {
                    Replay r;
                    ASSERT_NO_THROW(r = replay(s, c)) << "p " << p << " v " << v << " m " << m;
                    double ideal = m * v * (c.f + c.b);
                    for (int rank = 0; rank < p; ++rank) {
                        ASSERT_NEAR(r.busy[rank], ideal, 1e-9);
                        ASSERT_NEAR(r.idle[rank], (p - 1) * (c.f + c.b), 1e-9) << "p " << p << " v " << v << " m " << m;
                    }
                    ASSERT_NEAR(r.makespan / ideal - 1, double(p - 1) / (v * m), 1e-12);
                    ASSERT_NEAR(formula_bubble(ScheduleKind::Interleaved, p * v, c, v), (p - 1) * (c.f + c.b), 1e-12);
                    ++checked;
                }
                Replay r = replay(s, costs(1, 2, 0));
                int expect = v == 1 ? p : m == p ? m * v : std::min(m * v, (p - 1) * 2 + (v - 1) * p + 1);
                EXPECT_EQ(r.peak_activations[0], expect) << "p " << p << " v " << v << " m " << m;
                if (v == 1) {
                    Schedule plain = generate(ScheduleKind::OneFOneB, p, m);
                    for (int rank = 0; rank < p; ++rank) {
                        ASSERT_EQ(s.ranks[rank].size(), plain.ranks[rank].size());
                        for (size_t i = 0; i < s.ranks[rank].size(); ++i) {
                            ASSERT_EQ(s.ranks[rank][i].op, plain.ranks[rank][i].op);
                            ASSERT_EQ(s.ranks[rank][i].f, plain.ranks[rank][i].f);
                            ASSERT_EQ(s.ranks[rank][i].b, plain.ranks[rank][i].b);
                        }
                    }
                }
            }
    EXPECT_GT(checked, 300);
}

// Megatron-Core's all-to-all overlap: the steady state as F&B pairs (a backward with the next forward). With no gain
// from the pairing (F&B = F + B) it takes exactly as long as plain interleaving; with a perfect one (F&B = max) it
// is shorter. (A pair may join two microbatches of one stage: the executor runs those one after the other.)
TEST(Interleaved, FbPairsCostNothingWithoutOverlapAndHideWithIt) {
    int checked = 0;
    for (int p = 1; p <= 8; ++p)
        for (int v = 2; v <= 4; ++v)
            for (int groups = 1; groups <= 3; ++groups) {
                int m = p * groups;
                Schedule plain = generate(ScheduleKind::Interleaved, p * v, m, v);
                Schedule pairs = generate(ScheduleKind::InterleavedFB, p * v, m, v);
                for (const Costs& c : {costs(1, 2, 0), costs(2, 3, 0)}) {
                    Replay a = replay(plain, c), b;
                    ASSERT_NO_THROW(b = replay(pairs, c)) << "p " << p << " v " << v << " m " << m;
                    ASSERT_NEAR(b.makespan, a.makespan, 1e-9) << "p " << p << " v " << v << " m " << m;
                    Costs overlapped = c;
                    overlapped.fb = std::max(c.f, c.b);
                    if (m * v > (p - 1) * 2 + (v - 1) * p + 1) {  // a steady state with pairs in it
                        ASSERT_LT(replay(pairs, overlapped).makespan, a.makespan) << "p " << p << " v " << v;
                    }
                    ++checked;
                }
                int fb = 0;
                for (const auto& list : pairs.ranks) fb += count_ops(list).fb;
                EXPECT_EQ(fb > 0, m * v > (p - 1) * 2 + (v - 1) * p + 1) << "p " << p << " v " << v << " m " << m;
            }
    EXPECT_GT(checked, 100);
}

TEST(Interleaved, BadInputNamesTheConstraint) {
    EXPECT_NE(message([] { generate(ScheduleKind::Interleaved, 6, 8, 4); }).find("VPP=4 must divide the 6 model stages"),
              std::string::npos);
    EXPECT_NE(message([] { generate(ScheduleKind::Interleaved, 8, 6, 2); }).find("groups of the 4 pipeline ranks: 6"),
              std::string::npos);
    EXPECT_NE(message([] { generate(ScheduleKind::DualPipe, 8, 16, 2); }).find("for the interleaved schedule"),
              std::string::npos);
    EXPECT_NE(message([] { generate(ScheduleKind::Interleaved, 8, 8, 0); }).find("at least 1"), std::string::npos);
    EXPECT_NE(message([] { generate(ScheduleKind::InterleavedFB, 4, 8, 1); }).find("needs VPP >= 2"), std::string::npos);
}

std::string replay_error(const Schedule& s) {
    try {
        replay(s, Costs{});
    } catch (const ScheduleError& e) {
        return e.what();
    }
    return "valid";
}

TEST(Validator, ReportsDeadlockWithTheCycle) {
    Schedule s = generate(ScheduleKind::OneFOneB, 2, 4);
    // Rank 1 starts with mb 1, which rank 0 sends only after the backward of mb 0 -- which needs rank 1.
    s.ranks[0] = {{Op::F, {0, 0, 0}, {}}, {Op::BW, {}, {0, 0, 0}}, {Op::F, {1, 0, 0}, {}}, {Op::BW, {}, {1, 0, 0}},
                  {Op::F, {2, 0, 0}, {}}, {Op::BW, {}, {2, 0, 0}}, {Op::F, {3, 0, 0}, {}}, {Op::BW, {}, {3, 0, 0}}};
    s.ranks[1] = {{Op::F, {1, 1, 0}, {}}, {Op::BW, {}, {1, 1, 0}}, {Op::F, {0, 1, 0}, {}}, {Op::BW, {}, {0, 1, 0}},
                  {Op::F, {2, 1, 0}, {}}, {Op::BW, {}, {2, 1, 0}}, {Op::F, {3, 1, 0}, {}}, {Op::BW, {}, {3, 1, 0}}};
    std::string e = replay_error(s);
    EXPECT_NE(e.find("deadlock"), std::string::npos) << e;
    EXPECT_NE(e.find("rank 0"), std::string::npos) << e;
    EXPECT_NE(e.find("rank 1"), std::string::npos) << e;
    EXPECT_NE(e.find("gradient of mb 0"), std::string::npos) << e;
    EXPECT_NE(e.find("activation of mb 1"), std::string::npos) << e;
}

TEST(Validator, ReportsABackwardBeforeItsOwnForward) {
    Schedule s = generate(ScheduleKind::OneFOneB, 2, 4);
    std::swap(s.ranks[1][0], s.ranks[1][1]);  // BW(0) before F(0) on the last stage
    std::string e = replay_error(s);
    EXPECT_NE(e.find("later in its own list"), std::string::npos) << e;
}

TEST(Validator, ReportsMissingDuplicateMisplacedAndLeftoverW) {
    Schedule s = generate(ScheduleKind::DualPipe, 4, 8);
    // Drop the last W on rank 0: a deferred W is left over.
    Schedule a = s;
    for (size_t i = a.ranks[0].size(); i-- > 0;)
        if (a.ranks[0][i].op == Op::W) {
            a.ranks[0].erase(a.ranks[0].begin() + static_cast<long>(i));
            break;
        }
    EXPECT_NE(replay_error(a).find("deferred W is left"), std::string::npos) << replay_error(a);
    // Drop a forward on rank 1: the activation rank 0 sends has no receive.
    Schedule b = s;
    for (size_t i = 0; i < b.ranks[1].size(); ++i)
        if (b.ranks[1][i].op == Op::F && b.ranks[1][i].f.dir == 0) {
            b.ranks[1].erase(b.ranks[1].begin() + static_cast<long>(i));
            break;
        }
    EXPECT_NE(replay_error(b).find("has no matching receive"), std::string::npos) << replay_error(b);
    // Duplicate and misplaced chunks.
    Schedule c = s;
    c.ranks[0].push_back(c.ranks[0][0]);
    EXPECT_NE(replay_error(c).find("duplicate F"), std::string::npos);
    Schedule d = s;
    d.ranks[2].push_back({Op::F, {0, 0, 0}, {}});
    EXPECT_NE(replay_error(d).find("lives on rank 0"), std::string::npos);
}

TEST(P2P, EverySendHasOneMatchingReceive) {
    for (auto k : {ScheduleKind::OneFOneB, ScheduleKind::ZB1P, ScheduleKind::DualPipe, ScheduleKind::DualPipeV,
                   ScheduleKind::Interleaved}) {
        Schedule s = generate(k, 8, 16, k == ScheduleKind::Interleaved ? 2 : 1);
        std::map<std::tuple<int, int, uint32_t>, int> balance;  // (from, to, tag) -> sends - receives
        int sends = 0;
        for (int r = 0; r < s.num_ranks; ++r)
            for (const Instr& in : s.ranks[r])
                for (const P2P& p : p2p_of(s, r, in)) {
                    EXPECT_NE(p.peer, r);
                    if (p.send) {
                        ++balance[{r, p.peer, p.tag}];
                        ++sends;
                    } else {
                        --balance[{p.peer, r, p.tag}];
                    }
                }
        for (auto& [k2, v] : balance) EXPECT_EQ(v, 0) << kind_name(k) << " tag " << std::get<2>(k2);
        // Activations and gradients both cross every stage boundary between different ranks.
        int boundaries = 0;
        for (int dir = 0; dir < s.num_directions; ++dir)
            for (int st = 0; st + 1 < s.pp; ++st) boundaries += s.rank_of(st, dir) != s.rank_of(st + 1, dir);
        EXPECT_EQ(sends, 2 * boundaries * (s.num_microbatches / s.num_directions)) << kind_name(k);
    }
}

TEST(Render, SvgAndTextShowEveryRankAndInstruction) {
    Schedule s = generate(ScheduleKind::DualPipe, 4, 8);
    Costs c = costs(1, 2, 1, 3);
    Replay r = replay(s, c);
    std::string svg = render_svg(s, r, c);
    EXPECT_EQ(svg.rfind("<svg", 0), 0u);
    EXPECT_NE(svg.find("rank 3"), std::string::npos);
    EXPECT_NE(svg.find("makespan"), std::string::npos);
    size_t rects = 0;
    for (size_t p = svg.find("<rect"); p != std::string::npos; p = svg.find("<rect", p + 1)) ++rects;
    size_t boxes = 0;
    for (const auto& l : s.ranks)
        for (const Instr& in : l) boxes += (in.op == Op::BW || in.op == Op::FB) ? 2 : 1;
    EXPECT_GE(rects, boxes);
    std::string text = render_text(s, r);
    EXPECT_NE(text.find("rank   3 |"), std::string::npos);
    EXPECT_NE(text.find('X'), std::string::npos);
}

}  // namespace
}  // namespace duplex::sched
