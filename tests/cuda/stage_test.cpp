// The executor's CUDA path (ctest label `gpu`; skipped without a device): the fp32 GEMM and SwiGLU kernels against
// kernels/cpu, a stage whose routed experts run on the GPU against the same stage on the CPU (loss, input
// gradient, every weight gradient), and distributed DualPipe training with EP=2 on the device against the
// single-rank CPU reference; the EP exchanges moved by the GPU exchange kernel, bit for bit what the communicator
// moves, and training with them.
#include <cuda_runtime.h>

#include <cmath>
#include <functional>
#include <map>
#include <mutex>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "comm/launch.hpp"
#include "core/clock.hpp"
#include "core/dtype.hpp"
#include "core/error.hpp"
#include "kernels/cpu/ops.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/kernels.hpp"
#include "runtime/train/data.hpp"
#include "runtime/device/device_exchange.hpp"
#include "runtime/device/device_experts.hpp"
#include "runtime/device/device_rows.hpp"
#include "runtime/model/expert_exchange.hpp"
#include "runtime/train/pipeline_trainer.hpp"
#include "runtime/train/reference.hpp"
#include "runtime/train/trainer.hpp"
#include "tests/cuda/device_copy.hpp"

namespace duplex {
namespace {

#define NEED_GPU() \
    if (cuda_devices().empty()) GTEST_SKIP() << "no CUDA device"

std::vector<float> random_floats(size_t n, uint64_t seed) {
    Rng rng(seed);
    std::vector<float> v(n);
    for (float& x : v) x = float(rng.normal());
    return v;
}

using test_support::to_device;
using test_support::to_host;

// |a - b| <= tol * (|b| + scale) elementwise: fp32 results of different summation orders.
void expect_close(const std::vector<float>& a, const std::vector<float>& b, double tol, const std::string& what) {
    ASSERT_EQ(a.size(), b.size()) << what;
    double scale = 0;
    for (float x : b) scale = std::max(scale, double(std::fabs(x)));
    for (size_t i = 0; i < a.size(); ++i)
        ASSERT_NEAR(a[i], b[i], tol * (std::fabs(b[i]) + scale)) << what << " [" << i << "]";
}

TEST(CudaMath, GemmF32MatchesTheCpuInEveryTranspose) {
    NEED_GPU();
    const int m = 37, n = 50, k = 70;
    for (bool ta : {false, true})
        for (bool tb : {false, true}) {
            auto a = random_floats(size_t(m) * k, 1), b = random_floats(size_t(k) * n, 2), c = random_floats(size_t(m) * n, 3);
            std::vector<float> want = c;
            kernels::gemm<float>(ta, tb, m, n, k, 0.5f, a.data(), b.data(), 2.0f, want.data());
            float *da = to_device(a), *db = to_device(b), *dc = to_device(c);
            cuda::gemm_f32(ta, tb, m, n, k, 0.5f, da, db, 2.0f, dc, nullptr);
            ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            expect_close(to_host(dc, c.size()), want, 1e-5, fmt::format("gemm ta={} tb={}", ta, tb));
            cudaFree(da), cudaFree(db), cudaFree(dc);
        }
}

TEST(CudaMath, SwigluMatchesTheCpu) {
    NEED_GPU();
    const size_t n = 10007;
    auto a = random_floats(n, 4), b = random_floats(n, 5), dh = random_floats(n, 6);
    std::vector<float> h(n), da(n), db(n);
    kernels::swiglu_forward<float>(a.data(), b.data(), n, h.data());
    kernels::swiglu_backward<float>(dh.data(), a.data(), b.data(), n, da.data(), db.data());
    float *d_a = to_device(a), *d_b = to_device(b), *d_dh = to_device(dh), *d_h = to_device(h), *d_da = to_device(da),
          *d_db = to_device(db);
    cuda::swiglu_forward(d_a, d_b, n, d_h, nullptr);
    cuda::swiglu_backward(d_dh, d_a, d_b, n, d_da, d_db, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_close(to_host(d_h, n), h, 1e-6, "swiglu");
    expect_close(to_host(d_da, n), da, 1e-6, "swiglu da");
    expect_close(to_host(d_db, n), db, 1e-6, "swiglu db");
    for (float* p : {d_a, d_b, d_dh, d_h, d_da, d_db}) cudaFree(p);
}

// BF16 values of random floats, as bit patterns, and their widened fp32 values.
std::vector<uint16_t> random_bf16(size_t n, uint64_t seed, std::vector<float>& widened) {
    std::vector<float> f = random_floats(n, seed);
    std::vector<uint16_t> h(n);
    widened.resize(n);
    for (size_t i = 0; i < n; ++i) h[i] = fp32_to_bf16(f[i]), widened[i] = bf16_to_fp32(h[i]);
    return h;
}

std::vector<float> widen(const std::vector<uint16_t>& h) {
    std::vector<float> f(h.size());
    for (size_t i = 0; i < h.size(); ++i) f[i] = bf16_to_fp32(h[i]);
    return f;
}

TEST(CudaMath, GemmBf16MatchesTheCpuInEveryTransposeIntoFp32AndBf16) {
    NEED_GPU();
    const int m = 37, n = 50, k = 70;
    for (bool ta : {false, true})
        for (bool tb : {false, true})
            for (bool c_bf16 : {false, true}) {
                std::vector<float> a, b, c;
                auto ah = random_bf16(size_t(m) * k, 1, a), bh = random_bf16(size_t(k) * n, 2, b);
                auto ch = random_bf16(size_t(m) * n, 3, c);
                // The products of BF16 values are exact in fp32; only the order of the fp32 sums differs.
                std::vector<float> want = c;
                kernels::gemm<float>(ta, tb, m, n, k, 0.5f, a.data(), b.data(), 2.0f, want.data());
                uint16_t *da = to_device(ah), *db = to_device(bh);
                void* dc = c_bf16 ? static_cast<void*>(to_device(ch)) : static_cast<void*>(to_device(c));
                cuda::gemm_bf16(ta, tb, m, n, k, 0.5f, da, db, 2.0f, dc, c_bf16, nullptr);
                ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
                std::vector<float> got = c_bf16 ? widen(to_host(static_cast<uint16_t*>(dc), c.size()))
                                                : to_host(static_cast<float*>(dc), c.size());
                // BF16 output: one rounding (2^-9 relative) on top.
                expect_close(got, want, c_bf16 ? 8e-3 : 1e-5,
                             fmt::format("gemm bf16 ta={} tb={} c {}", ta, tb, c_bf16 ? "bf16" : "fp32"));
                cudaFree(da), cudaFree(db), cudaFree(dc);
            }
}

TEST(CudaMath, SwigluBf16AndTheConversionsMatchTheCpu) {
    NEED_GPU();
    const size_t n = 10007;
    std::vector<float> a, b, dh;
    auto ah = random_bf16(n, 4, a), bh = random_bf16(n, 5, b), dhh = random_bf16(n, 6, dh);
    std::vector<float> h(n), da(n), db(n);
    kernels::swiglu_forward<float>(a.data(), b.data(), n, h.data());
    kernels::swiglu_backward<float>(dh.data(), a.data(), b.data(), n, da.data(), db.data());
    uint16_t *d_a = to_device(ah), *d_b = to_device(bh), *d_dh = to_device(dhh);
    uint16_t *d_h = to_device(std::vector<uint16_t>(n)), *d_da = to_device(std::vector<uint16_t>(n)),
             *d_db = to_device(std::vector<uint16_t>(n));
    cuda::swiglu_forward_bf16(d_a, d_b, n, d_h, nullptr);
    cuda::swiglu_backward_bf16(d_dh, d_a, d_b, n, d_da, d_db, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    // fp32 math as the CPU's within a few ulp, then one BF16 rounding.
    expect_close(widen(to_host(d_h, n)), h, 8e-3, "swiglu bf16");
    expect_close(widen(to_host(d_da, n)), da, 8e-3, "swiglu bf16 da");
    expect_close(widen(to_host(d_db, n)), db, 8e-3, "swiglu bf16 db");
    // The conversions: round to nearest even like core/dtype.hpp, bit for bit, and back exactly.
    std::vector<float> x = random_floats(n, 7);
    x[0] = 1.00390625f;  // a tie: rounds to even (1.0)
    std::vector<uint16_t> want(n);
    for (size_t i = 0; i < n; ++i) want[i] = fp32_to_bf16(x[i]);
    float* d_x = to_device(x);
    cuda::to_bf16(d_x, n, d_h, nullptr);
    ASSERT_EQ(to_host(d_h, n), want);
    cuda::from_bf16(d_h, n, d_x, nullptr);
    ASSERT_EQ(to_host(d_x, n), widen(want));
    for (void* p : {static_cast<void*>(d_a), static_cast<void*>(d_b), static_cast<void*>(d_dh), static_cast<void*>(d_h),
                    static_cast<void*>(d_da), static_cast<void*>(d_db), static_cast<void*>(d_x)})
        cudaFree(p);
}

TEST(CudaStage, RoutedExpertsOnTheDeviceMatchTheCpuStage) {
    NEED_GPU();
    TrainOptions o;
    o.model = "tiny";
    ModelConfig cfg = o.model_config();
    SyntheticTask task(cfg.vocab, cfg.seq_len, 3);
    Batch batch = task.batch(4, 0);
    ModelStage<float> cpu(cfg, 0, cfg.layers, true, true, 7), gpu(cfg, 0, cfg.layers, true, true, 7);
    gpu.set_expert_compute(make_device_experts(0));
    for (ModelStage<float>* st : {&cpu, &gpu})
        for (int mb = 0; mb < 2; ++mb) {  // two microbatches in flight, backward in reverse order
            st->forward(mb, batch, {});
        }
    for (int mb = 0; mb < 2; ++mb) EXPECT_NEAR(gpu.loss(mb), cpu.loss(mb), 1e-5 * std::fabs(cpu.loss(mb)));
    for (ModelStage<float>* st : {&cpu, &gpu})
        for (int mb = 1; mb >= 0; --mb) {
            st->backward_input(mb, {});
            st->backward_weight(mb);
        }
    auto pc = cpu.parameters(), pg = gpu.parameters();
    ASSERT_EQ(pc.size(), pg.size());
    for (size_t i = 0; i < pc.size(); ++i) expect_close(pg[i]->grad, pc[i]->grad, 1e-4, pc[i]->name);
}

// DualPipe (PP=2 DP=2 EP=2 on 4 ranks unless told) with `device_options` applied, on `backend`, against the
// single-rank reference.
void expect_dualpipe_matches_reference(uint64_t seed, const std::function<void(TrainOptions&)>& device_options,
                                       PipelineOptions p = {sched::ScheduleKind::DualPipe, 2, 2, 2},
                                       const std::string& backend = "inproc") {
    TrainOptions o;
    o.model = "tiny";
    o.steps = 3;
    o.microbatches = 4;
    o.sequences_per_microbatch = 2;
    o.seed = seed;
    TrainOptions ref_o = o;
    ref_o.microbatches = o.microbatches * p.dp;
    ReferenceTrainer<float> ref(ref_o);
    std::vector<StepMetrics> want = ref.run();
    std::map<std::string, std::vector<float>> want_params;
    for (Param<float>* prm : ref.model().parameters()) want_params[prm->name] = prm->value;
    device_options(o);
    LaunchOptions l;
    l.backend = backend;
    l.ranks = p.pp * p.dp;
    l.timeout_s = 120;
    std::mutex mu;
    std::vector<StepMetrics> got;
    std::map<std::string, std::vector<float>> got_params;
    launch(l, [&](const std::shared_ptr<Communicator>& world) {
        PipelineTrainer<float> t(world, p, o);
        std::vector<StepMetrics> mine;
        for (int s = 0; s < o.steps; ++s) mine.push_back(t.step());
        auto owned = t.owned_parameters();
        std::lock_guard<std::mutex> lock(mu);
        if (world->rank() == 0) got = mine;
        for (auto& [name, v] : owned) got_params[name] = std::move(v);
    });
    ASSERT_EQ(got.size(), want.size());
    for (size_t s = 0; s < got.size(); ++s)
        EXPECT_NEAR(got[s].loss, want[s].loss, 1e-4 * std::fabs(want[s].loss)) << "step " << s + 1;
    // And every parameter after the three steps, at the GPU path's tolerance (cuBLAS sums in another order).
    ParamDiff d = compare_parameters(got_params, want_params);
    EXPECT_TRUE(d.missing.empty());
    EXPECT_LE(d.worst, reference_tolerance(false, 2, true).param) << d.worst_name;
}

TEST(CudaStage, DistributedTrainingOnTheDeviceMatchesTheCpuReference) {
    NEED_GPU();
    expect_dualpipe_matches_reference(5, [](TrainOptions& o) { o.device = "cuda"; });
}

// The executor's pipeline P2P and data-parallel collectives over the nccl backend (host buffers staged through
// the GPUs): the same training. NCCL puts each rank on a GPU of its own, so this needs two.
TEST(CudaStage, DualPipeOverTheNcclBackendMatchesTheCpuReference) {
#ifdef DUPLEX_HAVE_NCCL
    if (cuda_devices().size() < 2) GTEST_SKIP() << "the nccl backend needs a GPU per rank: 2, this machine has "
                                                << cuda_devices().size();
    expect_dualpipe_matches_reference(6, [](TrainOptions&) {}, {sched::ScheduleKind::DualPipe, 2, 1, 1}, "nccl");
#else
    GTEST_SKIP() << "nccl is not built";
#endif
}

// One MoE layer's inputs on `rank`: tokens, upstream gradient and routing (preset small: 16 experts, top-4).
struct ExchangeInputs {
    static constexpr int tokens = 48, dim = 40;
    std::vector<float> x, dy;
    Routing r;
};
ExchangeInputs exchange_inputs(int rank) {
    ExchangeInputs in;
    ModelConfig cfg = ModelConfig::preset("small");
    Rng rng(300 + uint64_t(rank));
    in.x.resize(size_t(in.tokens) * in.dim);
    in.dy.resize(in.x.size());
    std::vector<float> scores(size_t(in.tokens) * cfg.experts);
    for (float& v : in.x) v = float(rng.normal());
    for (float& v : in.dy) v = float(rng.normal());
    for (float& v : scores) v = float(1.0 / (1.0 + std::exp(-rng.normal())));
    in.r = route<float>(scores.data(), std::vector<double>(cfg.experts, 0.0), in.tokens, cfg);
    return in;
}

// One MoE layer's four exchanges with stand-in experts (row * (expert + 1)); everything they return. `resident`: the
// rows stay on the device (the expert-major path) and the stand-in experts read and write them there.
std::vector<std::vector<float>> run_exchanges(ExpertExchange<float>& ex, int rank, bool resident = false) {
    ExchangeInputs in = exchange_inputs(rank);
    const int dim = in.dim, local = ex.num_local_experts();
    const Routing& r = in.r;
    auto scale = [&](int e) { return float(ex.first_local_expert() + e + 1); };
    RoutedTokens<float> routed;
    routed.keep_rows = resident;
    ex.dispatch(in.x.data(), dim, r, routed);
    std::vector<float> y(in.x.size()), dx(in.x.size(), 0.0f);
    std::vector<double> d_gate;
    if (resident) {
        if (!routed.resident || routed.resident->device != 0) throw Error("the dispatch's rows did not stay on GPU 0");
        auto scaled = [&](const ResidentRows& rows) {
            std::vector<float> host = to_host(static_cast<const float*>(rows.data), size_t(rows.first.back()) * dim);
            for (int e = 0; e < local; ++e)
                for (int64_t i = rows.first[e] * dim; i < rows.first[e + 1] * dim; ++i) host[i] *= scale(e);
            auto out = std::make_shared<DeviceRows>(rows.first, dim, 0);
            if (!host.empty()) cudaMemcpy(out->row(0), host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice);
            return out;
        };
        ex.combine_resident(routed, *scaled(*routed.resident), dim, r, y.data());
        std::shared_ptr<ResidentRows> d_out;
        ex.combine_backward_resident(routed, in.dy.data(), dim, r, d_out, d_gate);
        ex.dispatch_backward_resident(routed, *scaled(*d_out), dim, r, dx.data());
    } else {
        std::vector<std::vector<float>> out(local), d_rows(local), d_out;
        for (int e = 0; e < local; ++e) {
            out[e] = routed.rows[e];
            for (float& v : out[e]) v *= scale(e);
        }
        ex.combine(routed, out, dim, r, y.data());
        ex.combine_backward(routed, in.dy.data(), dim, r, d_out, d_gate);
        for (int e = 0; e < local; ++e) {
            d_rows[e] = d_out[e];
            for (float& v : d_rows[e]) v *= scale(e);
        }
        ex.dispatch_backward(routed, d_rows, dim, r, dx.data());
    }
    return {y, std::vector<float>(d_gate.begin(), d_gate.end()), dx};
}

// The expert-major path on the GPU (rows written straight into the experts' rows, read from there on the way back),
// against the host hand-over, bit for bit, with threads sharing a GPU and with each rank pushing its own rows.
TEST(CudaExchange, RowsThatStayOnTheDeviceGiveTheHostHandOversResultsBitForBit) {
    NEED_GPU();
    for (int sms : {1, 8}) {
        LaunchOptions l;
        l.ranks = 4;
        l.timeout_s = 120;
        launch(l, [&](const std::shared_ptr<Communicator>& world) {
            const int experts = ModelConfig::preset("small").experts;
            DistributedExchange<float> host(world, experts), device(world, experts);
            device.set_transport(make_device_transport(world->split(0, world->rank()), 0, sms));
            ASSERT_EQ(device.rows_stay_on(), 0);
            auto want = run_exchanges(host, world->rank());
            auto got = run_exchanges(device, world->rank(), /*resident=*/true);
            const char* what[] = {"combine", "gate gradient", "input gradient"};
            for (int i = 0; i < 3; ++i) EXPECT_EQ(got[i], want[i]) << what[i] << ", rank " << world->rank() << ", " << sms << " SMs";
        });
    }
}

TEST(CudaExchange, DeviceTransportMovesEveryExchangeBitForBit) {
    NEED_GPU();
    EXPECT_THROW(make_device_transport(nullptr, 0, cuda_devices()[0].num_sms + 1), ConfigError);
    EXPECT_THROW(make_device_transport(nullptr, int(cuda_devices().size()), 4), ConfigError);
    for (bool hierarchical : {false, true}) {
        for (int sms : {1, 8}) {
            LaunchOptions l;
            l.ranks = 4;
            l.virtual_nodes = 2;
            l.timeout_s = 120;
            launch(l, [&](const std::shared_ptr<Communicator>& world) {
                const int experts = ModelConfig::preset("small").experts;
                auto make = [&]() -> std::unique_ptr<DistributedExchange<float>> {
                    if (hierarchical) return std::make_unique<HierarchicalExchange<float>>(world, experts);
                    return std::make_unique<DistributedExchange<float>>(world, experts);
                };
                auto host = make(), device = make();
                device->set_transport(make_device_transport(world->split(0, world->rank()), 0, sms));
                auto want = run_exchanges(*host, world->rank());
                world->reset_counters();
                auto got = run_exchanges(*device, world->rank());
                LinkBytes group_bytes = world->bytes_sent();
                EXPECT_EQ(group_bytes.inter_node + group_bytes.intra_node, 0u);  // rows went through the GPU
                const char* what[] = {"combine", "gate gradient", "input gradient"};
                for (int i = 0; i < 3; ++i)
                    EXPECT_EQ(got[i], want[i]) << what[i] << ", rank " << world->rank() << ", hierarchical "
                                               << hierarchical << ", " << sms << " SMs";
            });
        }
    }
}

TEST(CudaStage, TrainingWithTheExchangeOnTheDeviceMatchesTheCpuReference) {
    NEED_GPU();
    expect_dualpipe_matches_reference(7, [](TrainOptions& o) {
        o.device = "cuda:0";
        o.exchange_on = "cuda";
        o.comm_sms = 8;
    });
}

}  // namespace
}  // namespace duplex
