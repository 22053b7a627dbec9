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

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"GPU benchmarks of the expert-parallel kernels: FP8 quantize vs HBM, GEMM vs exchange overlap"};
    int gemm_n = 8192, ranks = 8, hidden = 7168, tokens = 4096, top_k = 8, reps = 5;
    std::string sms_list = "4,8,16,20,32";
    app.add_option("--gemm-n", gemm_n, "BF16 GEMM size (n x n x n)")->capture_default_str();
    app.add_option("--ranks", ranks, "virtual ranks of the exchange")->capture_default_str();
    app.add_option("--hidden", hidden, "row width")->capture_default_str();
    app.add_option("--tokens", tokens, "tokens per virtual rank")->capture_default_str();
    app.add_option("--top-k", top_k, "slots per token")->capture_default_str();
    app.add_option("--sms", sms_list, "SM budgets of the exchange")->capture_default_str();
    app.add_option("--reps", reps, "repetitions (best is reported)")->capture_default_str();
    int moe_hidden = 2048, moe_ffn = 1408, moe_experts = 32, moe_tokens = 1024, moe_microbatches = 4;
    app.add_option("--moe-hidden", moe_hidden, "MoE layer: hidden size")->capture_default_str();
    app.add_option("--moe-ffn", moe_ffn, "MoE layer: expert FFN size")->capture_default_str();
    app.add_option("--moe-experts", moe_experts, "MoE layer: routed experts (divided by --ranks)")->capture_default_str();
    app.add_option("--moe-tokens", moe_tokens, "MoE layer: tokens per virtual rank and microbatch")->capture_default_str();
    app.add_option("--moe-microbatches", moe_microbatches, "MoE layer: microbatches pipelined")->capture_default_str();
    CLI11_PARSE(app, argc, argv);
    try {
        auto devices = cuda_devices();
        if (devices.empty()) {
            fmt::print(stderr, "duplex_bench_gpu: no CUDA device on this machine\n");
            return 2;
        }
        std::vector<int> sms = tools::int_list(sms_list, "--sms");
        fmt::print("# device: {} ({} SMs, {:.0f} GB)\n", devices[0].name, devices[0].num_sms, devices[0].memory_bytes / 1e9);

        // 1. FP8 quantize vs copy bandwidth.
        {
            int rows = 16384, cols = hidden - hidden % 128;
            size_t n = size_t(rows) * cols;
            Buf<float> x(n), back(n), scales(size_t(rows) * cols / 128);
            Buf<uint8_t> q(n);
            DUPLEX_CUDA_CHECK(cudaMemset(x.p, 0x3F, n * sizeof(float)));
            float copy = tools::best_ms(nullptr, reps, [&] { DUPLEX_CUDA_CHECK(cudaMemcpyAsync(back.p, x.p, n * sizeof(float), cudaMemcpyDeviceToDevice)); });
            float quant = tools::best_ms(nullptr, reps, [&] { cuda::quantize_fp8_1x128(x.p, rows, cols, q.p, scales.p, nullptr); });
            double copy_bw = 2.0 * n * sizeof(float) / (copy * 1e-3);          // read + write
            double quant_bw = (n * (sizeof(float) + 1) + scales.n * 4.0) / (quant * 1e-3);
            fmt::print("fp8 quantize 1x128 [{} x {}]: {:.3f} ms, {:.0f} GB/s moved; D2D copy {:.0f} GB/s; ratio {:.2f}\n",
                       rows, cols, quant, quant_bw / 1e9, copy_bw / 1e9, quant_bw / copy_bw);
        }

        // 2. GEMM alone, exchange alone, both together.
        Buf<uint16_t> a(size_t(gemm_n) * gemm_n), b(size_t(gemm_n) * gemm_n);
        Buf<float> c(size_t(gemm_n) * gemm_n);
        DUPLEX_CUDA_CHECK(cudaMemset(a.p, 0x3C, a.n * 2));
        DUPLEX_CUDA_CHECK(cudaMemset(b.p, 0x3C, b.n * 2));
        cudaStream_t gemm_stream, comm_stream;
        DUPLEX_CUDA_CHECK(cudaStreamCreateWithFlags(&gemm_stream, cudaStreamNonBlocking));
        DUPLEX_CUDA_CHECK(cudaStreamCreateWithFlags(&comm_stream, cudaStreamNonBlocking));
        cuda::GemmPath path = cuda::GemmPath::Grouped;
        auto gemm = [&] { path = cuda::expert_gemm_bf16({a.p}, {b.p}, {c.p}, {gemm_n}, gemm_n, gemm_n, gemm_stream); };
        double flops = 2.0 * gemm_n * double(gemm_n) * gemm_n;
        float alone = tools::best_ms(gemm_stream, reps, gemm);
        fmt::print("bf16 gemm {}^3 alone: {:.3f} ms, {:.0f} TFLOP/s (cuBLAS {})\n", gemm_n, alone,
                   flops / (alone * 1e-3) / 1e12, path == cuda::GemmPath::Grouped ? "grouped" : "one call per expert");
        // Exchange buffers: uniform counts.
        int64_t rows_per_peer = int64_t(tokens) * top_k / ranks;
        std::vector<std::unique_ptr<Buf<float>>> send, recv;
        std::vector<const float*> sp;
        std::vector<float*> rp;
        std::vector<std::vector<int64_t>> counts(ranks, std::vector<int64_t>(ranks, rows_per_peer)),
            offsets(ranks, std::vector<int64_t>(ranks));
        std::vector<int64_t> cap(ranks, rows_per_peer * ranks);
        for (int r = 0; r < ranks; ++r) {
            for (int p = 0; p < ranks; ++p) offsets[r][p] = p * rows_per_peer;
            send.push_back(std::make_unique<Buf<float>>(size_t(rows_per_peer) * ranks * hidden));
            recv.push_back(std::make_unique<Buf<float>>(size_t(rows_per_peer) * ranks * hidden));
            sp.push_back(send.back()->p);
            rp.push_back(recv.back()->p);
        }
        double bytes = double(rows_per_peer) * ranks * ranks * hidden * sizeof(float);
        fmt::print("# exchange: {} virtual ranks x {} tokens x top-{} x {} floats = {:.0f} MB in all\n", ranks, tokens,
                   top_k, hidden, bytes / 1e6);
        fmt::print("# gemm kept: its throughput beside the exchange / alone; vs copy: beside the exchange / beside a "
                   "plain 16-byte copy kernel of the same bytes on the same SMs\n");
        fmt::print("# {:>4} {:>12} {:>12} {:>16} {:>16} {:>12} {:>16} {:>10}\n", "SMs", "exch alone", "exch GB/s",
                   "exch w/ gemm", "gemm w/ exch", "gemm kept", "gemm w/ copy", "vs copy");
        Buf<float> copy_from(size_t(rows_per_peer) * ranks * ranks * hidden), copy_to(copy_from.n);
        // Milliseconds of the GEMM on its stream while `beside` runs on the comm stream (best of reps), and the
        // best time `beside` reported.
        auto gemm_beside = [&](auto&& beside, double& beside_best) {
            float best = 1e30f;
            for (int i = 0; i < reps; ++i) {
                cudaEvent_t gs, ge;
                DUPLEX_CUDA_CHECK(cudaEventCreate(&gs));
                DUPLEX_CUDA_CHECK(cudaEventCreate(&ge));
                DUPLEX_CUDA_CHECK(cudaEventRecord(gs, gemm_stream));
                gemm();
                DUPLEX_CUDA_CHECK(cudaEventRecord(ge, gemm_stream));
                beside_best = std::min(beside_best, beside());
                DUPLEX_CUDA_CHECK(cudaEventSynchronize(ge));
                float ms = 0;
                DUPLEX_CUDA_CHECK(cudaEventElapsedTime(&ms, gs, ge));
                best = std::min(best, ms);
                cudaEventDestroy(gs);
                cudaEventDestroy(ge);
            }
            return best;
        };
        for (int s : sms) {
            if (s > devices[0].num_sms) continue;
            cuda::ExchangeConfig cfg;
            cfg.num_sms = s;
            double ex_alone = 1e30;
            for (int i = 0; i < reps; ++i)
                ex_alone = std::min(ex_alone, cuda::exchange_rows(sp, offsets, counts, rp, cap, hidden, cfg, comm_stream));
            // Together: the GEMM queued first on its stream, the exchange (or the plain copy) on the other.
            double ex_with = 1e30, copy_with = 1e30;
            float gemm_with = gemm_beside(
                [&] { return cuda::exchange_rows(sp, offsets, counts, rp, cap, hidden, cfg, comm_stream); }, ex_with);
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

        // 3. The MoE layer: the same routing pipelined and serialized, best of reps.
        DeviceMoeOptions mo;
        mo.ranks = ranks, mo.hidden = moe_hidden, mo.ffn = moe_ffn, mo.experts = moe_experts, mo.top_k = top_k;
        mo.exchange.num_sms = std::min(20, devices[0].num_sms);
        Rng rng(7);
        std::vector<std::vector<float>> w(moe_experts, std::vector<float>(size_t(moe_hidden) * moe_ffn));
        for (auto& m : w)
            for (float& v : m) v = float(rng.normal() * 0.02);
        std::vector<std::vector<MoeRankInput>> in(moe_microbatches, std::vector<MoeRankInput>(ranks));
        std::vector<std::vector<std::vector<float>>> dy(moe_microbatches);
        for (auto& mb : in)
            for (auto& r : mb) {
                r.x.resize(size_t(moe_tokens) * moe_hidden);
                for (float& v : r.x) v = float(rng.normal());
                for (int t = 0; t < moe_tokens; ++t) {
                    std::vector<int> e(moe_experts);
                    for (int i = 0; i < moe_experts; ++i) e[i] = i;
                    for (int k = 0; k < top_k; ++k) std::swap(e[k], e[k + rng.below(uint64_t(moe_experts - k))]);
                    std::sort(e.begin(), e.begin() + top_k);
                    for (int k = 0; k < top_k; ++k) r.expert.push_back(e[k]), r.gate.push_back(1.0f / top_k);
                }
            }
        for (auto& mb : dy) mb.assign(ranks, std::vector<float>(size_t(moe_tokens) * moe_hidden, 1e-3f));
        fmt::print("\n# MoE layer: {} virtual ranks x {} microbatches x {} tokens, hidden {}, ffn {}, {} experts top-{}, "
                   "exchange on {} SMs\n", ranks, moe_microbatches, moe_tokens, moe_hidden, moe_ffn, moe_experts, top_k,
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
        std::vector<std::vector<MoeRankInput>> one_rank(moe_microbatches, std::vector<MoeRankInput>(1));
        std::vector<std::vector<std::vector<float>>> one_rank_dy(moe_microbatches, std::vector<std::vector<float>>(1));
        for (int i = 0; i < moe_microbatches; ++i)
            for (int r = 0; r < ranks; ++r) {
                MoeRankInput& all = one_rank[i][0];
                all.x.insert(all.x.end(), in[i][r].x.begin(), in[i][r].x.end());
                all.expert.insert(all.expert.end(), in[i][r].expert.begin(), in[i][r].expert.end());
                all.gate.insert(all.gate.end(), in[i][r].gate.begin(), in[i][r].gate.end());
                one_rank_dy[i][0].insert(one_rank_dy[i][0].end(), dy[i][r].begin(), dy[i][r].end());
            }
        for (int mode = 0; mode < modes; ++mode) {
            const bool reference = mode == 3 || mode == 5;
            DeviceMoeOptions mm = mo;
            mm.fp8_dispatch = mode == 2 && moe_hidden % 128 == 0;
            mm.bf16 = mode >= 4;
            if (reference) mm.ranks = 1;
            DeviceMoeLayer layer(mm, w, w, w);
            layer.set_serial(mode == 0 || reference);
            for (int i = 0; i < reps; ++i) {
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
                       ranks, type, best[layer_mode][0] / best[ref_mode][0],
                       (best[layer_mode][0] + best[layer_mode][1]) / (best[ref_mode][0] + best[ref_mode][1]));
    } catch (const std::exception& e) {
        fmt::print(stderr, "duplex_bench_gpu: {}\n", e.what());
        return 1;
    }
    return 0;
}
