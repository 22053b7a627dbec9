// Tensor, context and data parallelism in the simulator (runtime/sim/layout.hpp, runtime/sim/step_end.cpp): the
// refusals, the division of a chunk's compute, the exposed TP and CP communication in its two regimes written out
// here from the documented rules, GQA's parameters, and the gradient synchronization started per stage.
#include "runtime/sim/layout.hpp"

#include <cmath>
#include <string>

#include <gtest/gtest.h>

#include "core/error.hpp"
#include "runtime/sim/simulator.hpp"

namespace duplex {
namespace {

using sched::ScheduleKind;

std::string refusal(const ModelConfig& m, const std::string& cluster, SimOptions o) {
    try {
        simulate(m, ClusterConfig::preset(cluster), o);
    } catch (const ConfigError& e) {
        return e.what();
    }
    return "no error";
}

TEST(SimLayout, LayoutsThatCannotRunAreRefusedNamingTheConstraint) {
    ModelConfig llama = ModelConfig::preset("llama3-405b");
    SimOptions o;
    o.schedule = ScheduleKind::OneFOneB;
    o.pp = 16, o.ep = 1, o.global_batch = 2048;
    o.tp = 16;  // more than a node
    EXPECT_NE(refusal(llama, "h100x8192", o).find("TP=16 must divide the 8 GPUs of a node"), std::string::npos);
    o.tp = 8, o.cp = 3;  // 8192 tokens do not split into 2 x 3 chunks
    EXPECT_NE(refusal(llama, "h100x8192", o).find("2 x CP = 6"), std::string::npos) << refusal(llama, "h100x8192", o);
    ModelConfig odd = llama;
    odd.heads = 96, odd.kv_heads = 8, odd.hidden = 12300;  // not a multiple of 8
    o.cp = 1;
    EXPECT_NE(refusal(odd, "h100x8192", o).find("must divide the hidden size 12300"), std::string::npos);
    odd = llama;
    odd.heads = 100, odd.kv_heads = 4;
    EXPECT_NE(refusal(odd, "h100x8192", o).find("must divide the 100 attention heads"), std::string::npos);
    o.tp = 8, o.cp = 4, o.pp = 16;  // 8192 GPUs = 16 x 8 x 4 x 16: fine; 3 pipelines' worth of GPUs is not
    EXPECT_NE(refusal(llama, "h100x24", o).find("GPUs are not divisible"), std::string::npos);
    o.ep = 2;  // a dense model has no experts
    o.cp = 1;
    EXPECT_NE(refusal(llama, "h100x8192", o).find("is dense"), std::string::npos);
    SimOptions il;
    il.schedule = ScheduleKind::Interleaved, il.pp = 64, il.vpp = 5, il.tp = 8, il.ep = 1, il.global_batch = 2048;
    EXPECT_NE(refusal(llama, "h100x8192", il).find("VPP=5 must divide the 64 model stages"), std::string::npos);
}

TEST(SimLayout, Llama3HasItsPublishedSizeWithGroupedQueryAttention) {
    ModelConfig m = ModelConfig::preset("llama3-405b");
    EXPECT_NEAR(m.total_params() / 405e9, 1.0, 0.01);  // "405B"
    // Q and O: 16384 x 16384 each; K and V: 16384 x (8 x 128) each.
    EXPECT_DOUBLE_EQ(m.attention_params(), 2.0 * 16384 * 16384 + 2.0 * 16384 * 1024);
    EXPECT_THROW(m.check_runnable(), ConfigError);
}

// With free communication TP and CP only divide: every stage's chunk takes 1/(TP x CP) of the unsharded time (the
// attention scores included: heads over TP, queries over CP).
TEST(SimLayout, TensorAndContextParallelismDivideAChunksCompute) {
    ModelConfig m = ModelConfig::preset("llama3-405b");
    m.layers = m.dense_layers = 16;
    SimOptions o;
    o.schedule = ScheduleKind::OneFOneB;
    o.pp = 4, o.ep = 1, o.microbatches = 8, o.fp8 = false, o.free_communication = true, o.partition = "uniform";
    SimResult base = simulate(m, ClusterConfig::preset("h100x4"), o);
    o.tp = 4;
    SimResult tp = simulate(m, ClusterConfig::preset("h100x16"), o);
    o.tp = 2, o.cp = 4;
    SimResult both = simulate(m, ClusterConfig::preset("h100x32"), o);
    for (size_t s = 0; s < 4; ++s) {
        EXPECT_NEAR(tp.stage_costs[s].f, base.stage_costs[s].f / 4, 1e-12 * base.stage_costs[s].f);
        EXPECT_NEAR(tp.stage_costs[s].b, base.stage_costs[s].b / 4, 1e-12 * base.stage_costs[s].b);
        EXPECT_NEAR(both.stage_costs[s].f, base.stage_costs[s].f / 8, 1e-12 * base.stage_costs[s].f);
    }
    EXPECT_EQ(tp.dp, 1);
    EXPECT_DOUBLE_EQ(tp.exposed_comm_s.at("tensor"), 0);
}

// One dense layer's TP collectives, written out: each of the forward's 4 (backward's 6) all-gathers and
// reduce-scatters moves a [tokens, hidden] BF16 tensor around a ring of TP ranks: (TP - 1) steps of
// latency + bytes / TP / bandwidth. Pipelined in 4 pieces against its GEMM, a collective shows a quarter of itself
// when the GEMM is longer, and all but the GEMM when it is not.
TEST(SimLayout, TensorParallelCollectivesShowAQuarterOrWhatTheGemmCannotHide) {
    ModelConfig m = ModelConfig::preset("llama3-405b");
    const int tokens = 8192, tp = 8;
    DevicePreset d = CostModel::preset("h100").device();
    d.latency_s = 0;
    auto comm = [&](double bw) {
        d.intra_bytes_s = bw;
        return shard_comm(CostModel(d), m, 0, 1, tokens, {tp, 1, 1}, 2.0, false, LinkClass::InterNode);
    };
    const double bytes = double(tokens) * m.hidden * 2;
    auto ring = [&](double bw) { return (tp - 1) * bytes / tp / bw; };
    ChunkComm fast = comm(1e15);
    EXPECT_NEAR(fast.tp_f, 4 * ring(1e15) / 4, 1e-9 * ring(1e15));
    EXPECT_NEAR(fast.tp_b, 6 * ring(1e15) / 4, 1e-9 * ring(1e15));
    // A link so slow that no GEMM hides anything worth a quarter: 4 collectives less the 4 GEMMs' time.
    const double rate = d.gemm_flops_s(false), h = m.hidden, ffn = m.dense_ffn;
    const double qkv = 2.0 * tokens * h * (m.heads + 2 * m.kv_heads) * m.head_dim / tp / rate;
    const double out = 2.0 * tokens * m.heads * m.head_dim * h / tp / rate;
    const double up = 2.0 * tokens * h * 2 * ffn / tp / rate, down = 2.0 * tokens * ffn * h / tp / rate;
    ChunkComm slow = comm(1e8);
    EXPECT_NEAR(slow.tp_f, 4 * ring(1e8) - (qkv + out + up + down), 1e-9 * ring(1e8));
    EXPECT_NEAR(slow.tp_b, 6 * ring(1e8) - (out + 2 * qkv + down + 2 * up), 1e-9 * ring(1e8));
    EXPECT_DOUBLE_EQ(slow.cp_f, 0);
}

// Ring attention: CP - 1 block transfers; each hides behind the block computing beside it.
TEST(SimLayout, ContextParallelRingHidesBehindTheBlocksUnlessTheLinkIsSlower) {
    ModelConfig m = ModelConfig::preset("llama3-405b");
    m.seq_len = 131072;
    const int tokens = 131072, tp = 8, cp = 16;
    DevicePreset d = CostModel::preset("h100").device();
    d.latency_s = 0;
    auto comm = [&](double bw) {
        d.inter_bytes_s = bw;
        return shard_comm(CostModel(d), m, 0, 1, tokens, {tp, cp, 1}, 2.0, false, LinkClass::InterNode);
    };
    EXPECT_DOUBLE_EQ(comm(50e9).cp_f, 0);  // InfiniBand at 50 GB/s: the blocks compute longer than they travel
    // A block: tokens / CP keys and values of one KV head per TP rank (8 KV heads over TP 8).
    const double block = double(tokens) / cp * 2 * 1 * m.head_dim * 2;
    const double scores = CostModel::layer_flops(m, 0, tokens).scores / (double(tp) * cp * cp) / d.attention_flops_s();
    ChunkComm slow = comm(1e6);
    EXPECT_NEAR(slow.cp_f, (cp - 1) * (block / 1e6 - scores), 1e-9 * slow.cp_f);
    EXPECT_NEAR(slow.cp_b, (cp - 1) * 2 * (block / 1e6 - scores), 1e-9 * slow.cp_b);
}

// The step-end synchronization per stage, from its last weight gradient: never later than after the pipeline,
// never before it; DeepSeek-V3's run hides part of it behind the pipeline's cool-down.
TEST(SimLayout, GradientSyncStartsWithEachStagesLastWeightGradient) {
    ModelConfig v3 = ModelConfig::preset("deepseek-v3");
    for (auto kind : {ScheduleKind::DualPipe, ScheduleKind::OneFOneB, ScheduleKind::ZB1P}) {
        SimOptions o;
        o.schedule = kind;
        o.ignore_memory = true;
        o.overlap_grad_sync = false;
        SimResult serial = simulate(v3, ClusterConfig::preset("h800x2048"), o);
        o.overlap_grad_sync = true;
        SimResult overlapped = simulate(v3, ClusterConfig::preset("h800x2048"), o);
        // Serialized: each rank after its own last instruction, so at most the pipeline plus the largest sync.
        EXPECT_LE(serial.step_time_s, serial.pipeline_s + serial.grad_sync_s + 1e-9);
        EXPECT_GE(serial.step_time_s, serial.pipeline_s);
        EXPECT_DOUBLE_EQ(overlapped.pipeline_s, serial.pipeline_s);
        EXPECT_GE(overlapped.step_time_s, overlapped.pipeline_s);
        EXPECT_LE(overlapped.step_time_s, serial.step_time_s);
        if (kind == ScheduleKind::DualPipe) {
            EXPECT_LT(overlapped.exposed_comm_s.at("data_parallel"), 0.8 * serial.grad_sync_s);
        }
    }
}

}  // namespace
}  // namespace duplex
