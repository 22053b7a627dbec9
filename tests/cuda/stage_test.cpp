// The executor's CUDA path (ctest label `gpu`; skipped without a device): the fp32 GEMM and SwiGLU kernels against
// kernels/cpu, a stage whose routed experts run on the GPU against the same stage on the CPU (loss, input
// gradient, every weight gradient), and distributed DualPipe training with EP=2 on the device against the
// single-rank CPU reference.
#include <cuda_runtime.h>

#include <cmath>
#include <mutex>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "comm/launch.hpp"
#include "core/clock.hpp"
#include "core/error.hpp"
#include "kernels/cpu/ops.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/kernels.hpp"
#include "runtime/data.hpp"
#include "runtime/device_experts.hpp"
#include "runtime/pipeline_trainer.hpp"
#include "runtime/trainer.hpp"

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

float* to_device(const std::vector<float>& v) {
    float* p = nullptr;
    EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(v.size(), 1) * sizeof(float)), cudaSuccess);
    cudaMemcpy(p, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice);
    return p;
}
std::vector<float> to_host(const float* p, size_t n) {
    std::vector<float> v(n);
    cudaMemcpy(v.data(), p, n * sizeof(float), cudaMemcpyDeviceToHost);
    return v;
}

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

TEST(CudaStage, DistributedTrainingOnTheDeviceMatchesTheCpuReference) {
    NEED_GPU();
    TrainOptions o;
    o.model = "tiny";
    o.steps = 3;
    o.microbatches = 4;
    o.sequences_per_microbatch = 2;
    o.seed = 5;
    TrainOptions ref_o = o;
    ref_o.microbatches = o.microbatches * 2;
    ReferenceTrainer<float> ref(ref_o);
    std::vector<StepMetrics> want = ref.run();
    o.device = "cuda";
    PipelineOptions p{sched::ScheduleKind::DualPipe, 2, 2, 2};
    LaunchOptions l;
    l.ranks = 4;
    l.timeout_s = 120;
    std::mutex mu;
    std::vector<StepMetrics> got;
    launch(l, [&](const std::shared_ptr<Communicator>& world) {
        PipelineTrainer<float> t(world, p, o);
        std::vector<StepMetrics> mine;
        for (int s = 0; s < o.steps; ++s) mine.push_back(t.step());
        std::lock_guard<std::mutex> lock(mu);
        if (world->rank() == 0) got = mine;
    });
    ASSERT_EQ(got.size(), want.size());
    for (size_t s = 0; s < got.size(); ++s)
        EXPECT_NEAR(got[s].loss, want[s].loss, 1e-4 * std::fabs(want[s].loss)) << "step " << s + 1;
}

}  // namespace
}  // namespace duplex
