// duplex_bench_gpu: what the reserved SMs cost and buy on one GPU.
//   1. FP8 1x128 quantize throughput against device-to-device copy bandwidth (the HBM ceiling);
//   2. a large BF16 GEMM (cuBLAS) alone, the expert exchange alone on an SM budget, and both at once on two
//      streams: how much GEMM throughput the exchange's SMs take, and whether both progress (overlap).
// Numbers go to BENCHMARKS.md with the device named; without a device it says so and exits 2.
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "core/clock.hpp"
#include "core/dtype.hpp"
#include "core/error.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/kernels.hpp"
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
        auto gemm = [&] { cuda::expert_gemm_bf16({a.p}, {b.p}, {c.p}, {gemm_n}, gemm_n, gemm_n, gemm_stream); };
        double flops = 2.0 * gemm_n * double(gemm_n) * gemm_n;
        float alone = tools::best_ms(gemm_stream, reps, gemm);
        fmt::print("bf16 gemm {}^3 alone: {:.3f} ms, {:.0f} TFLOP/s\n", gemm_n, alone, flops / (alone * 1e-3) / 1e12);
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
        fmt::print("# {:>4} {:>12} {:>12} {:>16} {:>16} {:>12}\n", "SMs", "exch alone", "exch GB/s", "exch w/ gemm",
                   "gemm w/ exch", "gemm kept");
        for (int s : sms) {
            if (s > devices[0].num_sms) continue;
            cuda::ExchangeConfig cfg;
            cfg.num_sms = s;
            double ex_alone = 1e30;
            for (int i = 0; i < reps; ++i)
                ex_alone = std::min(ex_alone, cuda::exchange_rows(sp, offsets, counts, rp, cap, hidden, cfg, comm_stream));
            // Together: the GEMM queued first on its stream, the exchange on the other.
            double ex_with = 1e30;
            float gemm_with = 1e30f;
            for (int i = 0; i < reps; ++i) {
                cudaEvent_t gs, ge;
                DUPLEX_CUDA_CHECK(cudaEventCreate(&gs));
                DUPLEX_CUDA_CHECK(cudaEventCreate(&ge));
                DUPLEX_CUDA_CHECK(cudaEventRecord(gs, gemm_stream));
                gemm();
                DUPLEX_CUDA_CHECK(cudaEventRecord(ge, gemm_stream));
                ex_with = std::min(ex_with, cuda::exchange_rows(sp, offsets, counts, rp, cap, hidden, cfg, comm_stream));
                DUPLEX_CUDA_CHECK(cudaEventSynchronize(ge));
                float ms = 0;
                DUPLEX_CUDA_CHECK(cudaEventElapsedTime(&ms, gs, ge));
                gemm_with = std::min(gemm_with, ms);
                cudaEventDestroy(gs);
                cudaEventDestroy(ge);
            }
            fmt::print("  {:>4} {:>10.3f}ms {:>12.0f} {:>14.3f}ms {:>14.3f}ms {:>11.1f}%\n", s, ex_alone * 1e3,
                       bytes / ex_alone / 1e9, ex_with * 1e3, gemm_with, 100.0 * alone / gemm_with);
        }
        cudaStreamDestroy(gemm_stream);
        cudaStreamDestroy(comm_stream);
    } catch (const std::exception& e) {
        fmt::print(stderr, "duplex_bench_gpu: {}\n", e.what());
        return 1;
    }
    return 0;
}
