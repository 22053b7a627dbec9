// Distributed training equals single-rank training on the same global batch, for every schedule.
#include "runtime/train/pipeline_trainer.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <sstream>

#include <gtest/gtest.h>

#include "comm/launch.hpp"
#include "core/clock.hpp"
#include "core/error.hpp"
#include "parallel/plan.hpp"
#include "runtime/train/reference.hpp"

namespace duplex {
namespace {

using sched::ScheduleKind;

struct Case {
    ScheduleKind kind;
    int pp, dp, ep;
    int nodes = 0;  // > 0: virtual nodes (EP groups spanning nodes take the node-limited path)
    int vpp = 1;    // interleaved: model stages per rank
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
    std::string kind = sched::kind_name(info.param.kind);
    std::replace(kind.begin(), kind.end(), '-', '_');  // a test name takes no '-'
    return fmt::format("{}_pp{}{}_dp{}_ep{}{}", kind, info.param.pp,
                       info.param.vpp > 1 ? fmt::format("_vpp{}", info.param.vpp) : "", info.param.dp, info.param.ep,
                       info.param.nodes ? fmt::format("_nodes{}", info.param.nodes) : "");
}

template <typename T>
void check_equivalence(const Case& c, double param_tol, bool recompute = false) {
    TrainOptions o;
    o.recompute = recompute;
    o.model = "tiny";
    o.steps = 3;
    o.microbatches = 2 * c.pp;  // N per replica: DualPipe needs N >= 2 PP
    o.sequences_per_microbatch = 2;
    o.seed = 5;
    PipelineOptions p{c.kind, c.pp, c.dp, c.ep, c.vpp};
    int ranks = pipeline_ranks(c.kind, c.pp, c.vpp) * c.dp;

    TrainOptions ref_o = o;
    ref_o.microbatches = o.microbatches * c.dp;
    ref_o.recompute = false;
    ReferenceTrainer<T> ref(ref_o);
    std::vector<StepMetrics> ref_steps = ref.run();
    std::map<std::string, std::vector<T>> ref_params;
    for (Param<T>* prm : ref.model().parameters()) ref_params[prm->name] = prm->value;

    std::mutex m;
    std::map<std::string, std::vector<T>> got;
    std::vector<StepMetrics> steps;
    LaunchOptions l;
    l.ranks = ranks;
    l.virtual_nodes = c.nodes;
    l.timeout_s = 60;
    launch(l, [&](const std::shared_ptr<Communicator>& world) {
        PipelineTrainer<T> t(world, p, o);
        std::vector<StepMetrics> mine;
        for (int s = 0; s < o.steps; ++s) mine.push_back(t.step());
        auto owned = t.owned_parameters();
        std::lock_guard<std::mutex> lock(m);
        if (world->rank() == 0) steps = mine;
        for (auto& [name, v] : owned) {
            if (got.count(name)) {
                EXPECT_EQ(got[name], v) << name << ": DP replicas disagree";
            }
            got[name] = v;
        }
    });
    ASSERT_EQ(steps.size(), ref_steps.size());
    // Step 1 runs on identical weights: the same losses, bit for bit while experts are local; with experts
    // spread over ranks their GEMMs see other row counts, so the last bits may differ.
    if (c.ep == 1) {
        EXPECT_EQ(steps[0].loss, ref_steps[0].loss);
    } else {
        EXPECT_NEAR(steps[0].loss, ref_steps[0].loss, 1e-6 * std::fabs(ref_steps[0].loss));
    }
    for (size_t s = 1; s < steps.size(); ++s)
        EXPECT_NEAR(steps[s].loss, ref_steps[s].loss, 1e-6 * std::fabs(ref_steps[s].loss)) << "step " << s + 1;
    ASSERT_EQ(got.size(), ref_params.size());
    ParamDiff d = compare_parameters(got, ref_params);
    EXPECT_TRUE(d.missing.empty());
    EXPECT_LE(d.worst, param_tol) << d.worst_name;
    double worst = d.worst;
    ::testing::Test::RecordProperty("max_param_rel_diff", fmt::format("{:.3g}", worst));
}

class PipelineEquivalence : public ::testing::TestWithParam<Case> {};

// NOTE: with EP > 1 an expert's weight gradient adds the rows of two replicas' microbatches in one GEMM, an
// order of additions the single-rank run cannot share; in fp32 AdamW's first steps (update ~ lr * sign(g))
// turn those last-bit differences on near-zero gradients into ~1e-5 relative parameter differences. fp64
// shows the algorithm itself is exact (1e-12).
TEST_P(PipelineEquivalence, Fp32MatchesTheReference) {
    check_equivalence<float>(GetParam(), reference_tolerance(false, GetParam().ep, false).param);
}
TEST_P(PipelineEquivalence, Fp64MatchesTheReference) {
    check_equivalence<double>(GetParam(), reference_tolerance(true, GetParam().ep, false).param);
}

std::vector<Case> cases() {
    std::vector<Case> out;
    for (auto k : {ScheduleKind::OneFOneB, ScheduleKind::ZB1P, ScheduleKind::DualPipe, ScheduleKind::DualPipeV})
        for (int pp : {2, 4})
            for (int dp : {1, 2})
                for (int ep : {1, 2})
                    if (ep <= dp) out.push_back({k, pp, dp, ep});
    // EP groups of 4 ranks over 2 virtual nodes: the node-limited two-hop dispatch.
    for (auto k : {ScheduleKind::OneFOneB, ScheduleKind::DualPipe}) out.push_back({k, 2, 4, 4, 4});
    // Interleaved 1F1B: the tiny model's 4 layers as 4 stages, 2 per rank on 2 ranks and all 4 on one.
    for (int dp : {1, 2})
        for (int ep : {1, 2})
            if (ep <= dp) out.push_back({ScheduleKind::Interleaved, 4, dp, ep, 0, 2});
    out.push_back({ScheduleKind::Interleaved, 4, 1, 1, 0, 4});
    out.push_back({ScheduleKind::InterleavedFB, 4, 2, 2, 0, 2});  // its F&B pairs overlap the expert exchanges
    return out;
}

INSTANTIATE_TEST_SUITE_P(Schedules, PipelineEquivalence, ::testing::ValuesIn(cases()), case_name);

// Recompute under every schedule: the distributed run with recompute equals the reference without it.
class PipelineRecompute : public ::testing::TestWithParam<ScheduleKind> {};
TEST_P(PipelineRecompute, Fp64MatchesTheReference) {
    check_equivalence<double>({GetParam(), 4, 2, 2, 0, GetParam() == ScheduleKind::Interleaved ? 2 : 1}, 1e-12, true);
}
INSTANTIATE_TEST_SUITE_P(Schedules, PipelineRecompute,
                         ::testing::Values(ScheduleKind::OneFOneB, ScheduleKind::ZB1P, ScheduleKind::DualPipe,
                                           ScheduleKind::DualPipeV, ScheduleKind::Interleaved),
                         [](const auto& info) { return std::string(sched::kind_name(info.param)); });

TEST(PipelineTrainer, RejectsImpossibleLayouts) {
    TrainOptions o;
    o.microbatches = 8;
    EXPECT_THROW(PipelineTrainer<float>::validate({ScheduleKind::DualPipe, 3, 1, 1}, o, 3), ConfigError);
    EXPECT_THROW(PipelineTrainer<float>::validate({ScheduleKind::OneFOneB, 4, 2, 1}, o, 6), ConfigError);
    EXPECT_THROW(PipelineTrainer<float>::validate({ScheduleKind::OneFOneB, 8, 1, 1}, o, 8), ConfigError);  // 4 layers
    EXPECT_THROW(PipelineTrainer<float>::validate({ScheduleKind::OneFOneB, 2, 2, 3}, o, 4), ConfigError);  // EP | DP
    o.microbatches = 6;
    EXPECT_THROW(PipelineTrainer<float>::validate({ScheduleKind::DualPipe, 4, 1, 1}, o, 4), ConfigError);  // N < 2PP
}

}  // namespace
}  // namespace duplex

namespace duplex {
namespace {

TEST(PipelineTrainer, CpuEmaEqualsAStraightforwardEmaOfTheWeights) {
    TrainOptions o;
    o.microbatches = 4;
    o.sequences_per_microbatch = 2;
    PipelineOptions p{sched::ScheduleKind::OneFOneB, 2, 1, 1};
    p.ema_decay = 0.8;
    std::mutex m;
    double worst = 0;
    LaunchOptions l;
    l.ranks = 2;
    launch(l, [&](const std::shared_ptr<Communicator>& world) {
        PipelineTrainer<float> t(world, p, o);
        auto ref = t.owned_parameters();
        for (int s = 0; s < 4; ++s) {
            t.step();
            for (auto& [name, v] : t.owned_parameters())
                for (size_t i = 0; i < v.size(); ++i) ref[name][i] = float(0.8 * ref[name][i] + (1 - 0.8) * v[i]);
        }
        double w = 0;
        for (auto& [name, v] : t.ema_parameters())
            for (size_t i = 0; i < v.size(); ++i) w = std::max(w, double(std::fabs(v[i] - ref[name][i])));
        std::lock_guard<std::mutex> lock(m);
        worst = std::max(worst, w);
    });
    EXPECT_EQ(worst, 0.0);
}

TEST(PipelineTrainer, TracesComputeAndCommunicationOfEveryRank) {
    TrainOptions o;
    o.microbatches = 4;
    o.sequences_per_microbatch = 2;
    PipelineOptions p{sched::ScheduleKind::DualPipe, 2, 1, 1};
    p.trace = true;
    std::vector<std::string> blobs;
    std::mutex m;
    double bubble = -1;
    LaunchOptions l;
    l.ranks = 2;
    launch(l, [&](const std::shared_ptr<Communicator>& world) {
        PipelineTrainer<float> t(world, p, o);
        StepMetrics s = t.step();
        auto all = gather_strings(*world, t.trace_blob());
        std::lock_guard<std::mutex> lock(m);
        if (world->rank() == 0) {
            blobs = all;
            bubble = s.bubble_fraction;
        }
    });
    ASSERT_EQ(blobs.size(), 2u);
    for (const auto& b : blobs) {
        EXPECT_NE(b.find("F mb"), std::string::npos);
        EXPECT_NE(b.find("BW mb"), std::string::npos);
        EXPECT_NE(b.find("recv act"), std::string::npos);
        EXPECT_NE(b.find("ZeRO-1"), std::string::npos);
    }
    EXPECT_GE(bubble, 0.0);
    EXPECT_LT(bubble, 1.0);
    std::string path = ::testing::TempDir() + "pipeline_trace.json";
    write_chrome_trace(path, blobs);
    std::ifstream in(path);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_NE(text.find("\"traceEvents\""), std::string::npos);
    EXPECT_NE(text.find("rank 1"), std::string::npos);
    std::remove(path.c_str());
}

}  // namespace
}  // namespace duplex

namespace duplex {
namespace {

// A rank that fails mid-run stops every other rank with an error naming it, long before any timeout.
TEST(PipelineTrainer, ARankThatThrowsStopsTheOthers) {
    TrainOptions o;
    o.microbatches = 8;
    o.sequences_per_microbatch = 2;
    PipelineOptions p{sched::ScheduleKind::DualPipe, 4, 1, 1};
    std::mutex m;
    std::vector<std::string> errors;
    LaunchOptions l;
    l.ranks = 4;
    l.timeout_s = 120;
    Stopwatch sw;
    EXPECT_THROW(launch(l,
                        [&](const std::shared_ptr<Communicator>& world) {
                            PipelineTrainer<float> t(world, p, o);
                            t.step();
                            if (world->rank() == 2) throw std::runtime_error("injected failure in step 2");
                            try {
                                t.step();
                            } catch (const CommError& e) {
                                std::lock_guard<std::mutex> lock(m);
                                errors.push_back(e.what());
                                throw;
                            }
                        }),
                 std::runtime_error);
    EXPECT_LT(sw.seconds(), 60.0);
    ASSERT_EQ(errors.size(), 3u);
    for (const auto& e : errors) EXPECT_NE(e.find("rank 2 failed: injected failure"), std::string::npos) << e;
}

}  // namespace
}  // namespace duplex

namespace duplex {
namespace {

// Emulate mode runs every schedule's real executor path (ranks, transfers of real sizes) with timed waits
// for compute. Timing is a benchmark (scripts/bench-emulate); here: it completes, no faster than the schedule's
// replay allows, and accounts sanely.
TEST(PipelineTrainer, EmulateModeRunsEverySchedule) {
    for (auto k : {ScheduleKind::OneFOneB, ScheduleKind::ZB1P, ScheduleKind::DualPipe, ScheduleKind::DualPipeV,
                   ScheduleKind::Interleaved}) {
        TrainOptions o;
        o.microbatches = 8;
        const int vpp = k == ScheduleKind::Interleaved ? 2 : 1;
        PipelineOptions p{k, 4, 1, 1, vpp};
        p.emulate = true;
        p.emulate_costs = {2e-4, 4e-4, 2e-4, 6e-4};
        int ranks = pipeline_ranks(k, 4, vpp);
        std::mutex m;
        StepMetrics seen;
        LaunchOptions l;
        l.ranks = ranks;
        l.virtual_nodes = 2;
        launch(l, [&](const std::shared_ptr<Communicator>& world) {
            PipelineTrainer<float> t(world, p, o);
            StepMetrics s = t.step();
            std::lock_guard<std::mutex> lock(m);
            if (world->rank() == 0) seen = s;
            EXPECT_TRUE(t.owned_parameters().empty());  // nothing computed, nothing allocated
        });
        // The timed waits cannot finish a step before the schedule's replay with the same chunk costs and free
        // transfers says it can (a compute wait that is skipped, or chunks of a rank run in parallel, would).
        sched::Replay rp = sched::replay(sched::generate(k, 4, o.microbatches, vpp), {2e-4, 4e-4, 2e-4, 6e-4, 0});
        EXPECT_GE(seen.step_time_s, rp.makespan * (1 - 1e-6)) << sched::kind_name(k);
        EXPECT_LT(seen.step_time_s, rp.makespan * 100) << sched::kind_name(k);
        EXPECT_GE(seen.bubble_fraction, 0) << sched::kind_name(k);
        EXPECT_LT(seen.bubble_fraction, 1) << sched::kind_name(k);
    }
    TrainOptions o;
    PipelineOptions bad{ScheduleKind::OneFOneB, 2, 2, 2};
    bad.emulate = true;
    bad.dispatch = "ring";
    EXPECT_THROW(PipelineTrainer<float>::validate(bad, o, 4), ConfigError);
}

// Expert traffic in emulate mode: nominal bytes from a real routing per microbatch and layer, the node-limited
// path sending fewer inter-node bytes than the flat one, expert exchanges traced, and the F&B pairs' share of
// hidden expert communication reported (its size is a benchmark: scripts/bench-emulate).
// The built-in stage waits for its dispatches and combines through the call's context (the Stage contract's
// services), not plainly: math mode records them as communication, marked inside F&B pairs.
TEST(PipelineTrainer, BuiltinStageWaitsForItsExchangesThroughTheExecutor) {
    TrainOptions o;
    o.microbatches = 4;
    o.dense_layers = 0;
    o.steps = 1;
    PipelineOptions p{ScheduleKind::DualPipe, 2, 2, 2};
    p.trace = true;
    std::mutex m;
    StepMetrics seen;
    std::string blob;
    launch({.ranks = 4}, [&](const std::shared_ptr<Communicator>& world) {
        PipelineTrainer<double> t(world, p, o);
        StepMetrics s = t.step();
        std::lock_guard<std::mutex> lock(m);
        if (world->rank() == 0) seen = s, blob = t.trace_blob();
    });
    EXPECT_NE(blob.find("dispatch L"), std::string::npos) << "no expert dispatch wait in the trace";
    EXPECT_NE(blob.find("combine-bwd L"), std::string::npos) << "no combine-backward wait in the trace";
    EXPECT_NE(blob.find("[F&B]"), std::string::npos) << "no expert wait inside an F&B pair";
    EXPECT_FALSE(std::isnan(seen.fb_ep_comm_hidden_fraction));
}

TEST(PipelineTrainer, EmulateModeCarriesExpertTraffic) {
    std::map<std::string, LinkBytes> bytes;
    for (std::string dispatch : {"flat", "hierarchical"}) {
        TrainOptions o;
        o.microbatches = 8;
        o.dense_layers = 0;
        PipelineOptions p{ScheduleKind::DualPipe, 4, 4, 4};
        p.dispatch = dispatch;
        p.emulate = true;
        p.trace = true;
        p.emulate_costs = {4e-4, 8e-4, 4e-4, 12e-4};
        std::mutex m;
        StepMetrics seen;
        LinkBytes total;
        bool traced = false;
        double worst_overlap_us = 0;
        LaunchOptions l;
        l.ranks = 16;
        l.virtual_nodes = 8;  // EP groups of 4 ranks over 2 nodes
        launch(l, [&](const std::shared_ptr<Communicator>& world) {
            PipelineTrainer<float> t(world, p, o);
            StepMetrics s = t.step();
            // One compute stream per rank: the two halves of an F&B pair take turns, so no two compute spans of a
            // rank overlap (lane 0 is compute in the serialized trace: lane, start, end, name).
            std::vector<std::pair<double, double>> compute;
            std::istringstream in(t.trace_blob());
            for (std::string line; std::getline(in, line);) {
                int lane = 0;
                double a = 0, b = 0;
                if (std::sscanf(line.c_str(), "%d\t%lf\t%lf", &lane, &a, &b) == 3 && lane == 0) compute.push_back({a, b});
            }
            std::sort(compute.begin(), compute.end());
            double overlap = 0;
            for (size_t i = 1; i < compute.size(); ++i) overlap = std::max(overlap, compute[i - 1].second - compute[i].first);
            std::lock_guard<std::mutex> lock(m);
            worst_overlap_us = std::max(worst_overlap_us, overlap);
            if (world->rank() == 0) seen = s;
            total.inter_node += t.expert_bytes_sent().inter_node;
            total.intra_node += t.expert_bytes_sent().intra_node;
            traced |= t.trace_blob().find("dispatch L") != std::string::npos;
        });
        EXPECT_TRUE(traced) << dispatch;
        EXPECT_LE(worst_overlap_us, 1.0) << dispatch << ": two compute spans of one rank overlap";
        EXPECT_FALSE(std::isnan(seen.fb_ep_comm_hidden_fraction)) << dispatch;
        EXPECT_GE(seen.fb_ep_comm_hidden_fraction, 0) << dispatch;
        EXPECT_LE(seen.fb_ep_comm_hidden_fraction, 1) << dispatch;
        EXPECT_GT(total.inter_node, 0u) << dispatch;
        bytes[dispatch] = total;
    }
    EXPECT_LT(bytes["hierarchical"].inter_node, bytes["flat"].inter_node);
    RecordProperty("emulated_inter_node_bytes",
                   fmt::format("hierarchical {} flat {}", bytes["hierarchical"].inter_node, bytes["flat"].inter_node));
}

TEST(CostModel, ChunkCostsFollowTheModelAndTheDevice) {
    ModelConfig c = ModelConfig::preset("small");
    CostModel cm = CostModel::preset("h800");
    ChunkCosts one = cm.chunk(c, 0, 1, 256), two = cm.chunk(c, 0, 2, 256);
    EXPECT_GT(one.f, 0);
    EXPECT_DOUBLE_EQ(one.b, 2 * one.f);
    EXPECT_GT(two.f, one.f);  // layer 1 is MoE, layer 0 dense: not simply double
    cm.device().time_scale = 1000;
    EXPECT_NEAR(cm.chunk(c, 0, 1, 256).f, 1000 * one.f, 1e-12);
    EXPECT_NEAR(cm.transfer_s(50e9, LinkClass::InterNode), 1000 * (1.0 + 10e-6), 1e-6);
    EXPECT_EQ(cm.transfer_s(1e9, LinkClass::Self), 0);
    EXPECT_THROW(CostModel::preset("tpu"), ConfigError);
}

}  // namespace
}  // namespace duplex

namespace duplex {
namespace {

TEST(PipelineTrainer, GatherNamedTensorsCollectsEveryRankOnRankZero) {
    std::mutex m;
    std::map<std::string, std::vector<double>> got;
    size_t others = 99;
    LaunchOptions l;
    l.ranks = 3;
    launch(l, [&](const std::shared_ptr<Communicator>& world) {
        std::map<std::string, std::vector<double>> mine = {
            {fmt::format("w{}", world->rank()), std::vector<double>(size_t(world->rank()) + 1, world->rank() + 0.5)}};
        auto all = gather_named_tensors<double>(*world, mine);
        std::lock_guard<std::mutex> lock(m);
        if (world->rank() == 0) got = all;
        else others = std::min(others, all.size());
    });
    EXPECT_EQ(others, 0u);
    ASSERT_EQ(got.size(), 3u);
    EXPECT_EQ(got["w2"], std::vector<double>(3, 2.5));
}

}  // namespace
}  // namespace duplex
