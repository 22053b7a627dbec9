// The simulator against its oracles: the schedule validator and the published bubble formulas with free
// communication, the published DeepSeek-V3 cost, and the layout checks.
#include "runtime/simulator.hpp"

#include <cmath>

#include <gtest/gtest.h>

#include "core/error.hpp"

namespace duplex {
namespace {

using sched::ScheduleKind;

// A cluster whose chunk costs follow the formulas' assumptions exactly: attention scores and everything but the
// GEMMs free, so B = 2F and W = F (B - W = F: the formulas are exact).
ClusterConfig formula_cluster(int gpus) {
    ClusterConfig c = ClusterConfig::preset(fmt::format("h800x{}", gpus));
    c.device.attention_efficiency = 1e12;
    c.device.other_overhead = 0;
    return c;
}

ModelConfig uniform_model(int layers) {
    ModelConfig m = ModelConfig::preset("tiny");
    m.layers = layers;
    m.dense_layers = 0;  // every stage the same
    m.vocab = 2;         // a head of negligible cost on the last stage
    return m;
}

TEST(Simulator, FreeCommunicationBubbleEqualsTheValidatorAndTheFormula) {
    for (auto kind : {ScheduleKind::OneFOneB, ScheduleKind::ZB1P, ScheduleKind::DualPipe, ScheduleKind::DualPipeV}) {
        SimOptions o;
        o.schedule = kind;
        o.pp = 8;
        o.ep = 1;
        o.microbatches = 20;
        o.free_communication = true;
        o.partition = "uniform";
        o.fp8 = false;
        o.recompute = false;
        int ranks = kind == ScheduleKind::DualPipeV ? 4 : 8;
        SimResult r = simulate(uniform_model(16), formula_cluster(ranks), o);
        // The validator with the same per-stage costs: the same replay, to the last bit.
        const auto& st = r.stage_costs;
        sched::Timing t;
        t.duration = [&](int, const sched::Instr& in) {
            switch (in.op) {
                case sched::Op::F: return st[in.f.stage].f;
                case sched::Op::B: return st[in.b.stage].b - st[in.b.stage].w;
                case sched::Op::W: return st[in.b.stage].w;
                case sched::Op::BW: return st[in.b.stage].b;
                case sched::Op::FB: return st[in.f.stage].f + st[in.b.stage].b;
            }
            return 0.0;
        };
        sched::Replay same = sched::replay(sched::generate(kind, 8, 20), t);
        EXPECT_DOUBLE_EQ(r.pipeline_s, same.makespan) << sched::kind_name(kind);
        // The published formula with the middle stage's costs (B = 2F, W = F: exact); the last stage's head is
        // the only difference (under 1% of a chunk), met at most once per microbatch and stage on a path.
        const ChunkCosts& c = st[3];
        ASSERT_NEAR(c.b, 2 * c.f, 1e-9 * c.f);
        ASSERT_NEAR(c.w, c.f, 1e-9 * c.f);
        sched::Costs costs{c.f, 2 * c.f, c.f, -1, 0};
        ASSERT_TRUE(sched::formula_is_exact(kind, costs)) << sched::kind_name(kind);
        sched::Replay uniform = sched::replay(sched::generate(kind, 8, 20), costs);
        double worst_idle = *std::max_element(r.replay.idle.begin(), r.replay.idle.end());
        double head = st[7].f + st[7].b - (c.f + c.b);
        EXPECT_LT(head, 1e-2 * c.f);
        double tol = (20 + 8) * head;
        EXPECT_NEAR(worst_idle, sched::formula_bubble(kind, 8, costs), tol) << sched::kind_name(kind);
        EXPECT_NEAR(r.pipeline_s, uniform.makespan, tol) << sched::kind_name(kind);
        EXPECT_DOUBLE_EQ(r.exposed_comm_s.at("expert"), 0);
        EXPECT_DOUBLE_EQ(r.exposed_comm_s.at("data_parallel"), 0);
    }
}

// docs/reference.md: 180K H800 GPU-hours per trillion tokens, from the documented hardware numbers and the
// stated efficiencies of the h800 preset (BENCHMARKS.md shows the breakdown and the sensitivity).
TEST(Simulator, DeepSeekV3OnH800x2048IsWithin15PercentOfThePublishedCost) {
    SimOptions o;  // DualPipe, PP 16, EP 64, 15360 sequences of 4096 tokens, FP8, recompute
    SimResult r = simulate(ModelConfig::preset("deepseek-v3"), ClusterConfig::preset("h800x2048"), o);
    EXPECT_EQ(r.dp, 128);
    EXPECT_EQ(r.edp, 2);
    EXPECT_EQ(r.microbatches, 120);
    EXPECT_TRUE(r.fits) << r.memory_total_bytes / 1e9 << " GB";
    EXPECT_GE(r.gpu_hours_per_trillion_tokens, 0.85 * 180e3);
    EXPECT_LE(r.gpu_hours_per_trillion_tokens, 1.15 * 180e3);
    RecordProperty("gpu_hours_per_trillion_tokens", fmt::format("{:.0f}", r.gpu_hours_per_trillion_tokens));
    // The published run: ~37B activated parameters -> ~6 x 37e9 x 1.1 FLOPs per token with attention.
    EXPECT_GT(r.model_flops_per_token, 6 * 37e9);
    EXPECT_LT(r.model_flops_per_token, 6 * 37e9 * 1.3);
    // Node-limited routing: at most M = 4 nodes per token, some of them its own.
    EXPECT_GT(r.ep_remote_nodes_per_token, 1.0);
    EXPECT_LT(r.ep_remote_nodes_per_token, 4.0);
}

TEST(Simulator, DualPipeHoldsTwoParameterCopiesAndHidesExpertTrafficThat1F1BExposes) {
    ModelConfig m = ModelConfig::preset("deepseek-v3");
    ClusterConfig cl = ClusterConfig::preset("h800x2048");
    SimOptions o;
    o.partition = "uniform";
    o.ignore_memory = true;
    SimResult dual = simulate(m, cl, o);
    o.schedule = ScheduleKind::OneFOneB;
    SimResult one = simulate(m, cl, o);
    EXPECT_GT(dual.memory_per_gpu_bytes.at("parameters"), 1.8 * one.memory_per_gpu_bytes.at("parameters"));
    EXPECT_LT(dual.exposed_comm_s.at("expert"), 0.5 * one.exposed_comm_s.at("expert"));
    // The hierarchical path crosses nodes less than one copy per expert.
    o.schedule = ScheduleKind::DualPipe;
    o.dispatch = "flat";
    SimResult flat = simulate(m, cl, o);
    EXPECT_LT(dual.ep_inter_bytes_per_token, flat.ep_inter_bytes_per_token);
    EXPECT_LE(dual.ep_inter_bytes_per_token, m.top_groups * m.hidden * (1 + 4.0 / 128) + 3 * 2 * m.top_k);
}

TEST(Simulator, RejectsImpossibleLayoutsAndReportsOnesThatDoNotFit) {
    ModelConfig m = ModelConfig::preset("deepseek-v3");
    SimOptions o;
    o.pp = 12;  // 2048 GPUs do not split into pipelines of 12
    EXPECT_THROW(simulate(m, ClusterConfig::preset("h800x2048"), o), ConfigError);
    o.pp = 16;
    o.ep = 256;  // a stage has 128 GPUs
    EXPECT_THROW(simulate(m, ClusterConfig::preset("h800x2048"), o), ConfigError);
    o.ep = 64;
    o.global_batch = 1000;  // not a multiple of DP 128
    EXPECT_THROW(simulate(m, ClusterConfig::preset("h800x2048"), o), ConfigError);
    EXPECT_THROW(ClusterConfig::preset("h800"), ConfigError);
    EXPECT_THROW(ClusterConfig::preset("a100x64"), ConfigError);
    // 256 GPUs cannot hold 683B parameters with their gradients and optimizer states.
    SimOptions small;
    small.pp = 16;
    small.ep = 16;
    small.global_batch = 1920;
    SimResult r = simulate(m, ClusterConfig::preset("h800x256"), small);
    EXPECT_FALSE(r.fits);
    EXPECT_GT(r.memory_total_bytes, r.memory_capacity_bytes);
}

}  // namespace
}  // namespace duplex
