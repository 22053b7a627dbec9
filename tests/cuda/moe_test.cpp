// The device MoE layer (tools/bench/device_moe.hpp; ctest label `gpu`, skipped without a device) against a per-slot
// CPU loop: 8 virtual ranks, two microbatches pipelined (and serial), forward outputs, input and gate
// gradients, every expert's weight gradients — within fp32 tolerance (cuBLAS sums in its own order).
#include "tools/bench/device_moe.hpp"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "kernels/cpu/ops.hpp"
#include "kernels/cuda/device.hpp"

namespace duplex {
namespace {

struct Reference {
    std::vector<std::vector<std::vector<float>>> y, dx, dgate;
    std::vector<std::vector<float>> g1, g3, g2;
};

// The layer one slot at a time on the CPU, in double.
Reference reference(const DeviceMoeOptions& o, const std::vector<std::vector<float>>& w1,
                    const std::vector<std::vector<float>>& w3, const std::vector<std::vector<float>>& w2,
                    const std::vector<std::vector<MoeRankInput>>& in, const std::vector<std::vector<std::vector<float>>>& dy) {
    const int d = o.hidden, f = o.ffn, K = o.top_k;
    Reference r;
    for (auto* g : {&r.g1, &r.g3, &r.g2}) g->assign(o.experts, std::vector<float>(size_t(d) * f, 0));
    std::vector<std::vector<double>> g1(o.experts, std::vector<double>(size_t(d) * f)), g3 = g1, g2 = g1;
    r.y.resize(in.size()), r.dx.resize(in.size()), r.dgate.resize(in.size());
    for (size_t mb = 0; mb < in.size(); ++mb)
        for (size_t s = 0; s < in[mb].size(); ++s) {
            const MoeRankInput& x = in[mb][s];
            int tokens = int(x.x.size() / d);
            std::vector<float> y(x.x.size(), 0), dx(x.x.size(), 0), dg(size_t(tokens) * K);
            for (int t = 0; t < tokens; ++t)
                for (int k = 0; k < K; ++k) {
                    int e = x.expert[size_t(t) * K + k];
                    double gate = x.gate[size_t(t) * K + k];
                    const float* xt = x.x.data() + size_t(t) * d;
                    const float* dyt = dy[mb][s].data() + size_t(t) * d;
                    std::vector<double> a1(f, 0), a3(f, 0), h(f), out(d, 0), dh(f, 0), da1(f), da3(f);
                    for (int i = 0; i < d; ++i)
                        for (int j = 0; j < f; ++j)
                            a1[j] += double(xt[i]) * w1[e][size_t(i) * f + j], a3[j] += double(xt[i]) * w3[e][size_t(i) * f + j];
                    for (int j = 0; j < f; ++j) h[j] = a1[j] / (1 + std::exp(-a1[j])) * a3[j];
                    for (int j = 0; j < f; ++j)
                        for (int i = 0; i < d; ++i) out[i] += h[j] * w2[e][size_t(j) * d + i];
                    double dot = 0;
                    for (int i = 0; i < d; ++i) y[size_t(t) * d + i] += float(gate * out[i]), dot += double(dyt[i]) * out[i];
                    dg[size_t(t) * K + k] = float(dot);
                    for (int j = 0; j < f; ++j)
                        for (int i = 0; i < d; ++i) dh[j] += gate * dyt[i] * w2[e][size_t(j) * d + i];
                    for (int j = 0; j < f; ++j) {
                        double sg = 1 / (1 + std::exp(-a1[j]));
                        da1[j] = dh[j] * a3[j] * sg * (1 + a1[j] * (1 - sg));
                        da3[j] = dh[j] * a1[j] * sg;
                    }
                    for (int i = 0; i < d; ++i)
                        for (int j = 0; j < f; ++j) {
                            dx[size_t(t) * d + i] += float(da1[j] * w1[e][size_t(i) * f + j] + da3[j] * w3[e][size_t(i) * f + j]);
                            g1[e][size_t(i) * f + j] += xt[i] * da1[j];
                            g3[e][size_t(i) * f + j] += xt[i] * da3[j];
                        }
                    for (int j = 0; j < f; ++j)
                        for (int i = 0; i < d; ++i) g2[e][size_t(j) * d + i] += h[j] * gate * dyt[i];
                }
            r.y[mb].push_back(y), r.dx[mb].push_back(dx), r.dgate[mb].push_back(dg);
        }
    for (int e = 0; e < o.experts; ++e)
        for (size_t i = 0; i < g1[e].size(); ++i) r.g1[e][i] = float(g1[e][i]), r.g3[e][i] = float(g3[e][i]), r.g2[e][i] = float(g2[e][i]);
    return r;
}

// |got - want| <= tol * max |want|, elementwise.
void expect_close(const std::vector<float>& got, const std::vector<float>& want, const std::string& what, double tol) {
    ASSERT_EQ(got.size(), want.size()) << what;
    double scale = 1e-6;
    for (float v : want) scale = std::max(scale, double(std::fabs(v)));
    for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], tol * scale) << what << " [" << i << "]";
}

// tol: fp32 math in another summation order (1e-4), or BF16 expert math (each GEMM input rounded to 8 bits).
void check_layer(DeviceMoeOptions o, double tol = 1e-4) {
    o.exchange.num_sms = 8;
    Rng rng(3);
    auto mat = [&](size_t n, double sd) {
        std::vector<float> v(n);
        for (float& x : v) x = float(rng.normal() * sd);
        return v;
    };
    std::vector<std::vector<float>> w1, w3, w2;
    for (int e = 0; e < o.experts; ++e)
        w1.push_back(mat(size_t(o.hidden) * o.ffn, 0.2)), w3.push_back(mat(size_t(o.hidden) * o.ffn, 0.2)),
            w2.push_back(mat(size_t(o.hidden) * o.ffn, 0.2));
    std::vector<std::vector<MoeRankInput>> in(2, std::vector<MoeRankInput>(o.ranks));
    std::vector<std::vector<std::vector<float>>> dy(2);
    for (int mb = 0; mb < 2; ++mb)
        for (int s = 0; s < o.ranks; ++s) {
            int tokens = 20 + int(rng.below(30)) - (s == 3 ? 20 : 0);  // rank 3 may hold few tokens
            MoeRankInput& r = in[mb][s];
            r.x = mat(size_t(tokens) * o.hidden, 1.0);
            for (int t = 0; t < tokens; ++t) {
                std::vector<int> e(o.experts);
                for (int i = 0; i < o.experts; ++i) e[i] = i;
                for (int k = 0; k < o.top_k; ++k) std::swap(e[k], e[k + rng.below(uint64_t(o.experts - k))]);
                std::sort(e.begin(), e.begin() + o.top_k);
                for (int k = 0; k < o.top_k; ++k) r.expert.push_back(e[k]), r.gate.push_back(float(0.1 + rng.uniform()));
            }
            dy[mb].push_back(mat(size_t(tokens) * o.hidden, 1.0));
        }
    // With FP8 dispatch the experts see the e4m3 round trip of their rows (the CPU quantizer is the device's,
    // bit for bit); the reference takes the same rows.
    auto seen = in;
    if (o.fp8_dispatch)
        for (auto& mb : seen)
            for (MoeRankInput& r : mb) {
                int rows = int(r.x.size() / o.hidden);
                std::vector<uint8_t> q(r.x.size());
                std::vector<float> sc(size_t(rows) * (o.hidden / 128));
                kernels::quantize_fp8_1x128(r.x.data(), rows, o.hidden, q.data(), sc.data());
                kernels::dequantize_fp8_1x128(q.data(), sc.data(), rows, o.hidden, r.x.data());
            }
    Reference want = reference(o, w1, w3, w2, seen, dy);
    for (bool serial : {false, true}) {
        DeviceMoeLayer layer(o, w1, w3, w2);
        layer.set_serial(serial);
        std::vector<std::vector<std::vector<float>>> y, dx, dg;
        layer.forward(in, y);
        layer.backward(dy, dx, dg);
        for (int mb = 0; mb < 2; ++mb)
            for (int s = 0; s < o.ranks; ++s) {
                std::string at = fmt::format("mb {} rank {} serial {}", mb, s, serial);
                expect_close(y[mb][s], want.y[mb][s], "y " + at, tol);
                expect_close(dx[mb][s], want.dx[mb][s], "dx " + at, tol);
                expect_close(dg[mb][s], want.dgate[mb][s], "d gate " + at, tol);
            }
        std::vector<std::vector<float>> g1, g3, g2;
        layer.grads(g1, g3, g2);
        for (int e = 0; e < o.experts; ++e) {
            expect_close(g1[e], want.g1[e], fmt::format("dW1 of expert {}", e), tol);
            expect_close(g3[e], want.g3[e], fmt::format("dW3 of expert {}", e), tol);
            expect_close(g2[e], want.g2[e], fmt::format("dW2 of expert {}", e), tol);
        }
    }
}

TEST(CudaMoe, LayerOnVirtualRanksMatchesTheCpuSlotBySlot) {
    if (cuda_devices().empty()) GTEST_SKIP() << "no CUDA device";
    DeviceMoeOptions o;
    o.ranks = 8, o.hidden = 64, o.ffn = 48, o.experts = 16, o.top_k = 4;
    check_layer(o);
}

TEST(CudaMoe, Fp8DispatchSendsTheE4m3RoundTripOfEachToken) {
    if (cuda_devices().empty()) GTEST_SKIP() << "no CUDA device";
    DeviceMoeOptions o;
    o.ranks = 4, o.hidden = 256, o.ffn = 64, o.experts = 8, o.top_k = 3, o.fp8_dispatch = true;
    check_layer(o);
}

TEST(CudaMoe, Bf16ExpertsFollowTheFp32ReferenceWithinBf16Rounding) {
    if (cuda_devices().empty()) GTEST_SKIP() << "no CUDA device";
    DeviceMoeOptions o;
    o.ranks = 8, o.hidden = 64, o.ffn = 48, o.experts = 16, o.top_k = 4, o.bf16 = true;
    // A row sent to the wrong expert or slot is off by the size of the values themselves; BF16 rounding of the
    // GEMM inputs and activations stays within a few percent of the largest.
    check_layer(o, 3e-2);
    o.ranks = 4, o.hidden = 256, o.ffn = 64, o.experts = 8, o.top_k = 3, o.fp8_dispatch = true;
    check_layer(o, 6e-2);
}

TEST(CudaMoe, BadShapesAreRejectedBeforeAnyLaunch) {
    DeviceMoeOptions o;
    o.ranks = 8, o.hidden = 64, o.ffn = 48, o.experts = 12, o.top_k = 4;  // 12 experts over 8 ranks
    std::vector<std::vector<float>> w(12, std::vector<float>(64 * 48));
    EXPECT_THROW(DeviceMoeLayer(o, w, w, w), ConfigError);
    o.experts = 16;
    EXPECT_THROW(DeviceMoeLayer(o, w, w, w), ConfigError);  // weights for 12 experts
    o.experts = 12, o.ranks = 4, o.fp8_dispatch = true;
    EXPECT_THROW(DeviceMoeLayer(o, w, w, w), ConfigError);  // hidden 64: not FP8 tiles
    o.fp8_dispatch = false, o.bf16 = true, o.hidden = 63;
    std::vector<std::vector<float>> odd(12, std::vector<float>(63 * 48));
    EXPECT_THROW(DeviceMoeLayer(o, odd, odd, odd), ConfigError);  // odd hidden: BF16 rows are not 32-bit words
}

}  // namespace
}  // namespace duplex
