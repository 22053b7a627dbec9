// duplex_bench_gpu: what the reserved SMs cost and buy on one GPU.
//   1. FP8 1x128 quantize throughput against device-to-device copy bandwidth (the HBM ceiling);
//   2. a large BF16 GEMM (cuBLAS) alone, the expert exchange alone on an SM budget, and both at once on two
//      streams: how much GEMM throughput the exchange's SMs take, and whether both progress (overlap);
//   3. one MoE layer forward + backward on the virtual ranks (tools/bench/device_moe.hpp), microbatches pipelined
//      (dispatch beside expert compute) against the same work serialized: the time the overlap saves; and against
//      the plain reference layer (gather, a GEMM per expert, index_add; no exchange) on the same GPU.
//   The GEMM beside the exchange is also measured beside a plain copy kernel of the same bytes and SM budget.
// Numbers go to BENCHMARKS.md with the device named; without a device it says so and exits 2.
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <tuple>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "core/clock.hpp"
#include "core/dtype.hpp"
#include "core/error.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/kernels.hpp"
#include "tools/bench/device_moe.hpp"
#include "tools/gpu_timing.hpp"
#include "tools/lists.hpp"

namespace {

using namespace duplex;

template <typename T>
struct Buf : tools::DeviceBuffer {
    explicit Buf(size_t n) : DeviceBuffer(n * sizeof(T)), p(as<T>()), n(n) {}
    T* p;
    size_t n;
};

struct Options {
    int gemm_n = 8192, ranks = 8, hidden = 7168, tokens = 4096, top_k = 8, reps = 5;
    std::string sms_list = "4,8,16,20,32";
    int moe_hidden = 2048, moe_ffn = 1408, moe_experts = 32, moe_tokens = 1024, moe_microbatches = 4;
};

// 1. FP8 1x128 quantize throughput against the device-to-device copy bandwidth.
void bench_quantize(const Options& o) {
    int rows = 16384, cols = o.hidden - o.hidden % 128;
    size_t n = size_t(rows) * cols;
    Buf<float> x(n), back(n), scales(size_t(rows) * cols / 128);
    Buf<uint8_t> q(n);
    DUPLEX_CUDA_CHECK(cudaMemset(x.p, 0x3F, n * sizeof(float)));
    float copy = tools::best_ms(nullptr, o.reps, [&] { DUPLEX_CUDA_CHECK(cudaMemcpyAsync(back.p, x.p, n * sizeof(float), cudaMemcpyDeviceToDevice)); });
    float quant = tools::best_ms(nullptr, o.reps, [&] { cuda::quantize_fp8_1x128(x.p, rows, cols, q.p, scales.p, nullptr); });
    double copy_bw = 2.0 * n * sizeof(float) / (copy * 1e-3);          // read + write
    double quant_bw = (n * (sizeof(float) + 1) + scales.n * 4.0) / (quant * 1e-3);
    fmt::print("fp8 quantize 1x128 [{} x {}]: {:.3f} ms, {:.0f} GB/s moved; D2D copy {:.0f} GB/s; ratio {:.2f}\n",
               rows, cols, quant, quant_bw / 1e9, copy_bw / 1e9, quant_bw / copy_bw);
}

// 2. The GEMM alone, the exchange alone on each SM budget, and both at once on two streams (and the GEMM beside a
// plain copy kernel of the same bytes and SMs).
void bench_gemm_beside_exchange(const Options& o, const std::vector<int>& sms, int device_sms) {
    Buf<uint16_t> a(size_t(o.gemm_n) * o.gemm_n), b(size_t(o.gemm_n) * o.gemm_n);
    Buf<float> c(size_t(o.gemm_n) * o.gemm_n);
    DUPLEX_CUDA_CHECK(cudaMemset(a.p, 0x3C, a.n * 2));
    DUPLEX_CUDA_CHECK(cudaMemset(b.p, 0x3C, b.n * 2));
    cudaStream_t gemm_stream, comm_stream;
    DUPLEX_CUDA_CHECK(cudaStreamCreateWithFlags(&gemm_stream, cudaStreamNonBlocking));
    DUPLEX_CUDA_CHECK(cudaStreamCreateWithFlags(&comm_stream, cudaStreamNonBlocking));
    cuda::GemmPath path = cuda::GemmPath::Grouped;
    auto gemm = [&] { path = cuda::expert_gemm_bf16({a.p}, {b.p}, {c.p}, {o.gemm_n}, o.gemm_n, o.gemm_n, gemm_stream); };
    double flops = 2.0 * o.gemm_n * double(o.gemm_n) * o.gemm_n;
    float alone = tools::best_ms(gemm_stream, o.reps, gemm);
    fmt::print("bf16 gemm {}^3 alone: {:.3f} ms, {:.0f} TFLOP/s (cuBLAS {})\n", o.gemm_n, alone,
               flops / (alone * 1e-3) / 1e12, path == cuda::GemmPath::Grouped ? "grouped" : "one call per expert");
    // Exchange buffers: uniform counts.
    int64_t rows_per_peer = int64_t(o.tokens) * o.top_k / o.ranks;
    std::vector<std::unique_ptr<Buf<float>>> send, recv;
    std::vector<const float*> sp;
    std::vector<float*> rp;
    std::vector<std::vector<int64_t>> counts(o.ranks, std::vector<int64_t>(o.ranks, rows_per_peer)),
        offsets(o.ranks, std::vector<int64_t>(o.ranks));
    std::vector<int64_t> cap(o.ranks, rows_per_peer * o.ranks);
    for (int r = 0; r < o.ranks; ++r) {
        for (int p = 0; p < o.ranks; ++p) offsets[r][p] = p * rows_per_peer;
        send.push_back(std::make_unique<Buf<float>>(size_t(rows_per_peer) * o.ranks * o.hidden));
        recv.push_back(std::make_unique<Buf<float>>(size_t(rows_per_peer) * o.ranks * o.hidden));
        sp.push_back(send.back()->p);
        rp.push_back(recv.back()->p);
    }
    double bytes = double(rows_per_peer) * o.ranks * o.ranks * o.hidden * sizeof(float);
    fmt::print("# exchange: {} virtual ranks x {} tokens x top-{} x {} floats = {:.0f} MB in all\n", o.ranks, o.tokens,
               o.top_k, o.hidden, bytes / 1e6);
    fmt::print("# gemm kept: its throughput beside the exchange / alone; vs copy: beside the exchange / beside a "
               "plain 16-byte copy kernel of the same bytes on the same SMs\n");
    fmt::print("# {:>4} {:>12} {:>12} {:>16} {:>16} {:>12} {:>16} {:>10}\n", "SMs", "exch alone", "exch GB/s",
               "exch w/ gemm", "gemm w/ exch", "gemm kept", "gemm w/ copy", "vs copy");
    Buf<float> copy_from(size_t(rows_per_peer) * o.ranks * o.ranks * o.hidden), copy_to(copy_from.n);
    // Milliseconds of the GEMM on its stream while `beside` runs on the comm stream (best of reps), and the
    // best time `beside` reported.
    auto gemm_beside = [&](auto&& beside, double& beside_best) {
        return tools::best_ms(gemm_stream, o.reps, gemm, [&] { beside_best = std::min(beside_best, beside()); });
    };
    for (int s : sms) {
        if (s > device_sms) continue;
        cuda::ExchangeConfig cfg;
        cfg.num_sms = s;
        double ex_alone = 1e30;
        for (int i = 0; i < o.reps; ++i)
            ex_alone = std::min(ex_alone, cuda::exchange_rows(sp, offsets, counts, rp, cap, o.hidden, cfg, comm_stream));
        // Together: the GEMM queued first on its stream, the exchange (or the plain copy) on the other.
        double ex_with = 1e30, copy_with = 1e30;
        float gemm_with = gemm_beside(
            [&] { return cuda::exchange_rows(sp, offsets, counts, rp, cap, o.hidden, cfg, comm_stream); }, ex_with);
        float gemm_with_copy = gemm_beside(
            [&] {
                return tools::best_ms(comm_stream, 1, [&] {
                           cuda::plain_copy(copy_to.p, copy_from.p, copy_from.n * sizeof(float), s, comm_stream);
                       }) * 1e-3;
            },
            copy_with);
        fmt::print("  {:>4} {:>10.3f}ms {:>12.0f} {:>14.3f}ms {:>14.3f}ms {:>11.1f}% {:>14.3f}ms {:>9.3f}\n", s,
                   ex_alone * 1e3, bytes / ex_alone / 1e9, ex_with * 1e3, gemm_with, 100.0 * alone / gemm_with,
                   gemm_with_copy, gemm_with_copy / gemm_with);
    }
    cudaStreamDestroy(gemm_stream);
    cudaStreamDestroy(comm_stream);
}

struct MoeInputs {
    std::vector<std::vector<float>> w;                    // per expert
    std::vector<std::vector<MoeRankInput>> in;            // per microbatch and rank
    std::vector<std::vector<std::vector<float>>> dy;      // per microbatch and rank
};

// Weights, tokens with a uniform random top-k routing, and upstream gradients for the MoE layer.
MoeInputs make_moe_inputs(const Options& o) {
    MoeInputs inp;
    auto& w = inp.w;
    auto& in = inp.in;
    auto& dy = inp.dy;
    Rng rng(7);
    w.assign(o.moe_experts, std::vector<float>(size_t(o.moe_hidden) * o.moe_ffn));
    for (auto& m : w)
        for (float& v : m) v = float(rng.normal() * 0.02);
    in.assign(o.moe_microbatches, std::vector<MoeRankInput>(o.ranks));
    dy.resize(size_t(o.moe_microbatches));
    for (auto& mb : in)
        for (auto& r : mb) {
            r.x.resize(size_t(o.moe_tokens) * o.moe_hidden);
            for (float& v : r.x) v = float(rng.normal());
            for (int t = 0; t < o.moe_tokens; ++t) {
                std::vector<int> e(o.moe_experts);
                for (int i = 0; i < o.moe_experts; ++i) e[i] = i;
                for (int k = 0; k < o.top_k; ++k) std::swap(e[k], e[k + rng.below(uint64_t(o.moe_experts - k))]);
                std::sort(e.begin(), e.begin() + o.top_k);
                for (int k = 0; k < o.top_k; ++k) r.expert.push_back(e[k]), r.gate.push_back(1.0f / o.top_k);
            }
        }
    for (auto& mb : dy) mb.assign(o.ranks, std::vector<float>(size_t(o.moe_tokens) * o.moe_hidden, 1e-3f));
    return inp;
}

// 3. One MoE layer forward + backward: serial, pipelined, FP8 dispatch, BF16 experts, and the plain reference.
void bench_moe_layer(const Options& o, int device_sms) {
    DeviceMoeOptions mo;
    mo.ranks = o.ranks, mo.hidden = o.moe_hidden, mo.ffn = o.moe_ffn, mo.experts = o.moe_experts, mo.top_k = o.top_k;
    mo.exchange.num_sms = std::min(20, device_sms);
    MoeInputs inp = make_moe_inputs(o);
    auto& w = inp.w;
    auto& in = inp.in;
    auto& dy = inp.dy;
    fmt::print("\n# MoE layer: {} virtual ranks x {} microbatches x {} tokens, hidden {}, ffn {}, {} experts top-{}, "
               "exchange on {} SMs\n", o.ranks, o.moe_microbatches, o.moe_tokens, o.moe_hidden, o.moe_ffn, o.moe_experts, o.top_k,
               mo.exchange.num_sms);
    fmt::print("# {:>10} {:>12} {:>12} {:>14}\n", "mode", "forward", "backward", "exchange part");
    // Modes: 0 serial, 1 pipelined, 2 pipelined with FP8 dispatch, 3 the reference: the layer written the
    // plain PyTorch way on the same GPU — every rank's tokens of a microbatch in one batch, gathered per expert,
    // one GEMM per expert and weight, summed back per token (index_add), no exchange — run by the same kernels
    // (one virtual rank: the gather, cuBLAS per expert, the fixed-order combine; its one-rank "exchange" is a
    // device copy of the gathered rows); 4 and 5: pipelined and the reference with the experts in BF16.
    const int modes = 6;
    const char* names[modes] = {"serial", "pipelined", "fp8 disp", "reference", "bf16 pipe", "bf16 ref"};
    double best[modes][2], exch[modes] = {};
    for (auto& b : best) b[0] = b[1] = 1e30;
    std::vector<std::vector<MoeRankInput>> one_rank(o.moe_microbatches, std::vector<MoeRankInput>(1));
    std::vector<std::vector<std::vector<float>>> one_rank_dy(o.moe_microbatches, std::vector<std::vector<float>>(1));
    for (int i = 0; i < o.moe_microbatches; ++i)
        for (int r = 0; r < o.ranks; ++r) {
            MoeRankInput& all = one_rank[i][0];
            all.x.insert(all.x.end(), in[i][r].x.begin(), in[i][r].x.end());
            all.expert.insert(all.expert.end(), in[i][r].expert.begin(), in[i][r].expert.end());
            all.gate.insert(all.gate.end(), in[i][r].gate.begin(), in[i][r].gate.end());
            one_rank_dy[i][0].insert(one_rank_dy[i][0].end(), dy[i][r].begin(), dy[i][r].end());
        }
    for (int mode = 0; mode < modes; ++mode) {
        const bool reference = mode == 3 || mode == 5;
        DeviceMoeOptions mm = mo;
        mm.fp8_dispatch = mode == 2 && o.moe_hidden % 128 == 0;
        mm.bf16 = mode >= 4;
        if (reference) mm.ranks = 1;
        DeviceMoeLayer layer(mm, w, w, w);
        layer.set_serial(mode == 0 || reference);
        for (int i = 0; i < o.reps; ++i) {
            std::vector<std::vector<std::vector<float>>> y, dx, dg;
            MoeTiming f = layer.forward(reference ? one_rank : in, y);
            MoeTiming b = layer.backward(reference ? one_rank_dy : dy, dx, dg);
            best[mode][0] = std::min(best[mode][0], f.seconds);
            best[mode][1] = std::min(best[mode][1], b.seconds);
            exch[mode] = f.exchange_seconds + b.exchange_seconds;
        }
        fmt::print("  {:>10} {:>10.3f}ms {:>10.3f}ms {:>12.3f}ms\n", names[mode], best[mode][0] * 1e3,
                   best[mode][1] * 1e3, exch[mode] * 1e3);
    }
    fmt::print("# pipelined / serial: forward {:.3f}, backward {:.3f}; FP8 dispatch / fp32: forward {:.3f}\n",
               best[1][0] / best[0][0], best[1][1] / best[0][1], best[2][0] / best[1][0]);
    for (auto [layer_mode, ref_mode, type] : {std::tuple{1, 3, "fp32"}, std::tuple{4, 5, "bf16"}})
        fmt::print("# device layer (pipelined, {} virtual ranks) / plain reference, {}: forward {:.3f}, "
                   "forward+backward {:.3f} (<= 1.0: the device layer is faster)\n",
                   o.ranks, type, best[layer_mode][0] / best[ref_mode][0],
                   (best[layer_mode][0] + best[layer_mode][1]) / (best[ref_mode][0] + best[ref_mode][1]));
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"GPU benchmarks of the expert-parallel kernels: FP8 quantize vs HBM, GEMM vs exchange overlap"};
    Options o;
    app.add_option("--gemm-n", o.gemm_n, "BF16 GEMM size (n x n x n)")->capture_default_str();
    app.add_option("--ranks", o.ranks, "virtual ranks of the exchange")->capture_default_str();
    app.add_option("--hidden", o.hidden, "row width")->capture_default_str();
    app.add_option("--tokens", o.tokens, "tokens per virtual rank")->capture_default_str();
    app.add_option("--top-k", o.top_k, "slots per token")->capture_default_str();
    app.add_option("--sms", o.sms_list, "SM budgets of the exchange")->capture_default_str();
    app.add_option("--reps", o.reps, "repetitions (best is reported)")->capture_default_str();
    app.add_option("--moe-hidden", o.moe_hidden, "MoE layer: hidden size")->capture_default_str();
    app.add_option("--moe-ffn", o.moe_ffn, "MoE layer: expert FFN size")->capture_default_str();
    app.add_option("--moe-experts", o.moe_experts, "MoE layer: routed experts (divided by --ranks)")->capture_default_str();
    app.add_option("--moe-tokens", o.moe_tokens, "MoE layer: tokens per virtual rank and microbatch")->capture_default_str();
    app.add_option("--moe-microbatches", o.moe_microbatches, "MoE layer: microbatches pipelined")->capture_default_str();
    CLI11_PARSE(app, argc, argv);
    try {
        auto devices = cuda_devices();
        if (devices.empty()) {
            fmt::print(stderr, "duplex_bench_gpu: no CUDA device on this machine\n");
            return 2;
        }
        std::vector<int> sms = tools::int_list(o.sms_list, "--sms");
        fmt::print("# device: {} ({} SMs, {:.0f} GB)\n", devices[0].name, devices[0].num_sms, devices[0].memory_bytes / 1e9);
        bench_quantize(o);
        bench_gemm_beside_exchange(o, sms, devices[0].num_sms);
        bench_moe_layer(o, devices[0].num_sms);
    } catch (const std::exception& e) {
        fmt::print(stderr, "duplex_bench_gpu: {}\n", e.what());
        return 1;
    }
    return 0;
}
