// duplex commbench --backend cuda --op dispatch|combine: the expert exchange between virtual ranks on one GPU,
// with the kernels of kernels/cuda (permute, warp-specialized exchange on an SM budget, fixed-order combine),
// next to a device-to-device copy of the same bytes measured in the same run.
#include "tools/gpu_commbench.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <memory>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "kernels/cpu/permute.hpp"
#include "kernels/cuda/device.hpp"
#include "kernels/cuda/kernels.hpp"
#include "tools/commands.hpp"
#include "tools/gpu_timing.hpp"

namespace duplex::tools {

void check_gpu_commbench(const GpuCommBenchOptions& o) {
    DUPLEX_CHECK_ARG(o.op == "dispatch" || o.op == "combine", "--op", "the cuda backend runs dispatch or combine, not {}",
                     o.op);
    DUPLEX_CHECK_ARG(o.ranks >= 2 && o.ranks <= 64, "--ranks", "virtual ranks must be 2..64, got {}", o.ranks);
    DUPLEX_CHECK_ARG(o.hidden >= 1 && o.top_k >= 1 && o.top_k <= o.ranks, "--hidden/--top-k",
                     "need hidden >= 1 and 1 <= top_k <= ranks (got {}, {})", o.hidden, o.top_k);
    DUPLEX_CHECK_ARG(!o.sms.empty(), "--sms", "needs at least one SM budget");
    DUPLEX_CHECK_ARG(o.nodes >= 1 && o.ranks % o.nodes == 0 && o.ranks / o.nodes <= 30, "--virtual-nodes",
                     "{} virtual ranks do not split into {} nodes of equal size (at most 30 each)", o.ranks, o.nodes);
    DUPLEX_CHECK_ARG(o.min_bytes <= o.max_bytes && o.factor > 1, "-b/-e/-f", "sizes {}..{} with factor {}", o.min_bytes,
                     o.max_bytes, o.factor);
}

int run_gpu_commbench(const GpuCommBenchOptions& o) {
    check_gpu_commbench(o);
    auto devices = cuda_devices();
    if (devices.empty()) throw ConfigError("--backend", "cuda: no CUDA device on this machine");
    const int device_sms = devices[0].num_sms;
    for (int s : o.sms)
        DUPLEX_CHECK_ARG(s >= 1 && s <= device_sms, "--sms", "{} SMs requested, {} has {}", s, devices[0].name, device_sms);
    const int R = o.ranks, K = o.top_k, d = o.hidden;
    const size_t row_bytes = size_t(d) * sizeof(float);
    fmt::print("# duplex commbench: {} between {} virtual ranks on {} ({} SMs), hidden {}, top-{}, {} iterations\n",
               o.op, R, devices[0].name, device_sms, d, K, o.iters);
    fmt::print("# size = bytes each rank sends; algbw = all ranks' bytes / time; copy = cudaMemcpy D2D of the same bytes;\n"
               "# ceiling = a plain 16-byte copy kernel of the same bytes on the same SM budget\n");
    if (o.nodes > 1)
        fmt::print("# {} virtual nodes of {} ranks: sender -> forwarder (one row per token and node) -> receivers\n",
                   o.nodes, R / o.nodes);
    fmt::print("#\n# {:>10} {:>6} {:>5} {:>10} {:>11} {:>11} {:>9} {:>11} {:>8} {:>7}\n", "size(B)", "tokens", "SMs",
               "time(us)", "algbw(GB/s)", "copy(GB/s)", "of copy", "ceil(GB/s)", "of ceil", "#wrong");
    nlohmann::json rows = nlohmann::json::array();
    uint64_t total_wrong = 0;
    Rng rng(o.seed);
    for (double size = double(o.min_bytes); size <= double(o.max_bytes) * 1.0001; size *= o.factor) {
        // Tokens per rank so that its K slot rows make `size` bytes.
        int tokens = std::max(1, int(size / (double(K) * row_bytes)));
        size_t slots = size_t(tokens) * K;
        // Routing: each token's K slots go to K distinct ranks, uniformly.
        std::vector<std::vector<int>> dest(R);
        for (int r = 0; r < R; ++r) {
            dest[r].resize(slots);
            for (int t = 0; t < tokens; ++t) {
                std::vector<int> peers(R);
                for (int p = 0; p < R; ++p) peers[p] = p;
                for (int k = 0; k < K; ++k) {
                    std::swap(peers[k], peers[k + rng.below(uint64_t(R - k))]);
                    dest[r][size_t(t) * K + k] = peers[k];
                }
            }
        }
        std::vector<kernels::DispatchLayout> layouts;
        std::vector<std::vector<int64_t>> counts(R), offsets(R);
        std::vector<int64_t> recv_rows(R, 0);
        for (int r = 0; r < R; ++r) {
            layouts.push_back(kernels::dispatch_layout(dest[r], R));
            counts[r] = layouts[r].counts;
            offsets[r].assign(layouts[r].offsets.begin(), layouts[r].offsets.end() - 1);
            for (int p = 0; p < R; ++p) recv_rows[p] += counts[r][p];
        }
        // Buffers: x (tokens), send (slots, permuted), recv (what arrives). Combine runs the exchange backwards.
        std::vector<std::unique_ptr<DeviceBuffer>> x, send, recv, y, gates, src;
        std::vector<std::unique_ptr<cuda::DeviceLayout>> dl;
        std::vector<std::vector<float>> host_x(R);
        for (int r = 0; r < R; ++r) {
            host_x[r].resize(size_t(tokens) * d);
            for (float& v : host_x[r]) v = float(rng.normal());
            x.push_back(std::make_unique<DeviceBuffer>(host_x[r].size() * sizeof(float)));
            DUPLEX_CUDA_CHECK(cudaMemcpy(x[r]->p, host_x[r].data(), x[r]->bytes, cudaMemcpyHostToDevice));
            send.push_back(std::make_unique<DeviceBuffer>(slots * row_bytes));
            recv.push_back(std::make_unique<DeviceBuffer>(size_t(recv_rows[r]) * row_bytes));
            y.push_back(std::make_unique<DeviceBuffer>(size_t(tokens) * row_bytes));
            std::vector<float> g(slots, 1.0f / K);
            gates.push_back(std::make_unique<DeviceBuffer>(slots * sizeof(float)));
            DUPLEX_CUDA_CHECK(cudaMemcpy(gates[r]->p, g.data(), gates[r]->bytes, cudaMemcpyHostToDevice));
            std::vector<int> s(slots);
            for (size_t i = 0; i < slots; ++i) s[i] = int(i / K);
            src.push_back(std::make_unique<DeviceBuffer>(slots * sizeof(int)));
            DUPLEX_CUDA_CHECK(cudaMemcpy(src[r]->p, s.data(), src[r]->bytes, cudaMemcpyHostToDevice));
            dl.push_back(std::make_unique<cuda::DeviceLayout>(layouts[r]));
        }
        std::vector<const float*> send_p, recv_cp;
        std::vector<float*> recv_p, send_mp;
        for (int r = 0; r < R; ++r) {
            send_p.push_back(send[r]->as<float>());
            recv_p.push_back(recv[r]->as<float>());
            recv_cp.push_back(recv[r]->as<float>());
            send_mp.push_back(send[r]->as<float>());
        }
        // Combine sends back what arrived: counts transposed, receive offsets source-major.
        std::vector<std::vector<int64_t>> back_counts(R, std::vector<int64_t>(R)), back_off(R, std::vector<int64_t>(R));
        for (int p = 0; p < R; ++p) {
            int64_t at = 0;
            for (int r = 0; r < R; ++r) back_counts[p][r] = counts[r][p], back_off[p][r] = at, at += counts[r][p];
        }
        std::vector<int64_t> send_rows(R, int64_t(slots));
        double bytes_all = double(slots) * row_bytes * R;
        // The node-limited path takes each token once with the set of ranks it goes to.
        std::vector<std::vector<uint64_t>> masks(R, std::vector<uint64_t>(tokens, 0));
        std::vector<const float*> x_cp;
        for (int r = 0; r < R; ++r) {
            x_cp.push_back(x[r]->as<float>());
            for (size_t i = 0; i < slots; ++i) masks[r][i / K] |= 1ull << dest[r][i];
        }
        int64_t inter_rows = 0, flat_inter_rows = 0;
        double copy_bw = copy_bandwidth(size_t(bytes_all));
        // Combine starts from what the dispatch delivered: every rank's rows, each weighted by its gate (1/K).
        std::vector<std::unique_ptr<DeviceBuffer>> row_gates;
        std::vector<const float*> row_gates_p;
        if (o.op == "combine") {
            for (int r = 0; r < R; ++r)
                cuda::permute_rows(x[r]->as<float>(), d, src[r]->as<int>(), *dl[r], send[r]->as<float>(), nullptr);
            cuda::ExchangeConfig fill;
            fill.num_sms = std::min(20, device_sms);
            cuda::exchange_rows(send_p, offsets, counts, recv_p, recv_rows, d, fill, nullptr);
            for (int r = 0; r < R; ++r) {
                std::vector<float> g(size_t(recv_rows[r]), 1.0f / K);
                row_gates.push_back(std::make_unique<DeviceBuffer>(std::max<size_t>(g.size(), 1) * sizeof(float)));
                if (!g.empty())
                    DUPLEX_CUDA_CHECK(cudaMemcpy(row_gates[r]->p, g.data(), g.size() * sizeof(float), cudaMemcpyHostToDevice));
                row_gates_p.push_back(row_gates[r]->as<float>());
            }
        }
        std::vector<float*> y_p;
        for (int r = 0; r < R; ++r) y_p.push_back(y[r]->as<float>());
        for (int sms : o.sms) {
            cuda::ExchangeConfig cfg;
            cfg.num_sms = sms;
            double ceiling_bw = bytes_all / cuda::copy_ceiling_seconds(size_t(bytes_all), sms, 3, nullptr);
            double best = 1e30;
            for (int it = 0; it < o.warmup + o.iters; ++it) {
                double kernel_s = 0;
                if (o.op == "dispatch" && o.nodes > 1) {
                    auto h = cuda::dispatch_rows_hierarchical(x_cp, masks, o.nodes, recv_p, recv_rows, d, cfg, nullptr);
                    kernel_s = h.seconds;
                    inter_rows = h.inter_node_rows;
                    flat_inter_rows = h.flat_inter_node_rows;
                } else if (o.op == "dispatch") {
                    for (int r = 0; r < R; ++r) cuda::permute_rows(x[r]->as<float>(), d, src[r]->as<int>(), *dl[r], send[r]->as<float>(), nullptr);
                    kernel_s = cuda::exchange_rows(send_p, offsets, counts, recv_p, recv_rows, d, cfg, nullptr);
                } else if (o.nodes > 1) {
                    // Experts' rows go back through the relays, which add a token's rows of their node before
                    // the one crossing; the token's rank adds the nodes' partial sums.
                    auto h = cuda::combine_rows_hierarchical(recv_cp, row_gates_p, masks, o.nodes, recv_rows, y_p, d,
                                                             cfg, nullptr);
                    kernel_s = h.seconds;
                    inter_rows = h.inter_node_rows;
                    flat_inter_rows = h.flat_inter_node_rows;
                } else {
                    // The rows that arrived go back to their token's rank, then each rank sums them per token.
                    kernel_s = cuda::exchange_rows(recv_cp, back_off, back_counts, send_mp, send_rows, d, cfg, nullptr);
                    for (int r = 0; r < R; ++r) cuda::combine_rows(send[r]->as<float>(), d, *dl[r], gates[r]->as<float>(), tokens, K, y[r]->as<float>(), nullptr);
                    DUPLEX_CUDA_CHECK(cudaDeviceSynchronize());
                }
                if (it >= o.warmup) best = std::min(best, kernel_s);
            }
            // Check: dispatch — every slot's row arrived at its peer; combine — y = x (gates 1/K of the same row).
            uint64_t wrong = 0;
            if (o.check) {
                DUPLEX_CUDA_CHECK(cudaDeviceSynchronize());
                if (o.op == "dispatch") {
                    for (int p = 0; p < R; ++p) {
                        std::vector<float> got(size_t(recv_rows[p]) * d);
                        DUPLEX_CUDA_CHECK(cudaMemcpy(got.data(), recv[p]->p, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
                        int64_t row = 0;
                        for (int r = 0; r < R; ++r)
                            for (size_t i = 0; i < slots; ++i)
                                if (dest[r][i] == p) {
                                    // items of r for p arrive in slot order
                                    const float* want = host_x[r].data() + (i / K) * d;
                                    for (int c = 0; c < d; ++c) wrong += got[size_t(row) * d + c] != want[c];
                                    ++row;
                                }
                    }
                } else {
                    for (int r = 0; r < R; ++r) {
                        std::vector<float> got(size_t(tokens) * d);
                        DUPLEX_CUDA_CHECK(cudaMemcpy(got.data(), y[r]->p, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
                        for (size_t i = 0; i < got.size(); ++i)
                            wrong += std::fabs(got[i] - host_x[r][i]) > 1e-5f * (1 + std::fabs(host_x[r][i]));
                    }
                }
            }
            total_wrong += wrong;
            double algbw = bytes_all / best / 1e9;
            fmt::print("  {:>10} {:>6} {:>5} {:>10.2f} {:>11.2f} {:>11.2f} {:>8.1f}% {:>11.2f} {:>7.1f}% {:>7}",
                       size_t(slots * row_bytes), tokens, sms, best * 1e6, algbw, copy_bw / 1e9, 100 * algbw * 1e9 / copy_bw,
                       ceiling_bw / 1e9, 100 * algbw * 1e9 / ceiling_bw, wrong);
            if (o.nodes > 1)
                fmt::print("   inter-node rows {} (flat {})", inter_rows, flat_inter_rows);
            fmt::print("\n");
            rows.push_back({{"size", size_t(slots * row_bytes)}, {"tokens", tokens}, {"sms", sms}, {"time_us", best * 1e6},
                            {"algbw_gbs", algbw}, {"copy_gbs", copy_bw / 1e9}, {"fraction_of_copy", algbw * 1e9 / copy_bw},
                            {"ceiling_gbs", ceiling_bw / 1e9}, {"fraction_of_ceiling", algbw * 1e9 / ceiling_bw},
                            {"wrong", wrong}, {"inter_node_rows", inter_rows}, {"flat_inter_node_rows", flat_inter_rows}});
            std::fflush(stdout);
        }
    }
    fmt::print("# Out of bounds values : {} {}\n", total_wrong, total_wrong ? "FAILED" : "OK");
    if (!o.json.empty()) {
        nlohmann::json j = {{"op", o.op}, {"backend", "cuda"}, {"ranks", R}, {"nodes", o.nodes}, {"device", devices[0].name}, {"rows", rows}};
        write_text_file(o.json, j.dump(2) + "\n", "--json");
        fmt::print("# JSON written to {}\n", o.json);
    }
    return total_wrong ? 1 : 0;
}

}  // namespace duplex::tools
