// duplex commbench --backend cuda --op dispatch|combine: the expert exchange between virtual ranks on one GPU,
// with the kernels of kernels/cuda (dispatch from the tokens to the experts' rows and combine back, flat or
// node-limited, in fp32, BF16 or FP8 rows, on an SM budget), next to a device-to-device copy of the same bytes and
// a plain copy kernel on the same SM budget, measured in the same run; every row checked against the CPU.
#include "tools/gpu_commbench.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/clock.hpp"
#include "core/dtype.hpp"
#include "core/error.hpp"
#include "kernels/cpu/ops.hpp"
#include "kernels/exchange_plan.hpp"
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
    cuda::RowType type = cuda::parse_row_type(o.dtype, "--dtype");
    DUPLEX_CHECK_ARG(o.op == "dispatch" || type != cuda::RowType::FP8, "--dtype",
                     "combine rows are f32 or bf16 (FP8 dispatch, BF16 combine), not fp8");
    DUPLEX_CHECK_ARG(type != cuda::RowType::FP8 || o.hidden % 128 == 0, "--hidden",
                     "fp8 rows need a width that is a multiple of 128 (one scale per 1x128 block), got {}", o.hidden);
}

namespace {

// Host rows of one rank in the benchmark's row type, plane by plane (FP8: the e4m3 bytes, then the scales).
std::vector<std::vector<uint8_t>> make_rows(cuda::RowType type, int64_t rows, int dim, Rng& rng) {
    std::vector<float> x(size_t(rows) * dim);
    for (float& v : x) v = float(rng.normal());
    std::vector<std::vector<uint8_t>> planes;
    auto bytes_of = [](const auto& v) {
        const auto* p = reinterpret_cast<const uint8_t*>(v.data());
        return std::vector<uint8_t>(p, p + v.size() * sizeof(v[0]));
    };
    if (type == cuda::RowType::F32) {
        planes.push_back(bytes_of(x));
    } else if (type == cuda::RowType::BF16) {
        std::vector<uint16_t> h(x.size());
        for (size_t i = 0; i < x.size(); ++i) h[i] = fp32_to_bf16(x[i]);
        planes.push_back(bytes_of(h));
    } else {
        std::vector<uint8_t> q(x.size());
        std::vector<float> scales(size_t(rows) * dim / 128);
        if (rows > 0) kernels::quantize_fp8_1x128(x.data(), int(rows), dim, q.data(), scales.data());
        planes.push_back(q);
        planes.push_back(bytes_of(scales));
    }
    return planes;
}

std::unique_ptr<DeviceBuffer> upload(const std::vector<uint8_t>& host) {
    auto b = std::make_unique<DeviceBuffer>(host.size());
    if (!host.empty()) DUPLEX_CUDA_CHECK(cudaMemcpy(b->p, host.data(), host.size(), cudaMemcpyHostToDevice));
    return b;
}

std::vector<uint8_t> download(const DeviceBuffer& b, size_t bytes) {
    std::vector<uint8_t> host(bytes);
    if (bytes) DUPLEX_CUDA_CHECK(cudaMemcpy(host.data(), b.p, bytes, cudaMemcpyDeviceToHost));
    return host;
}

// Bytes of `want` that differ from `got`.
uint64_t count_wrong(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want) {
    uint64_t wrong = got.size() == want.size() ? 0 : std::max(got.size(), want.size());
    for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) wrong += got[i] != want[i];
    return wrong;
}

}  // namespace

namespace {

// Each rank's tokens with K distinct destination ranks each, uniformly: bit p of masks[r][t] when token t of rank
// r goes to rank p.
std::vector<std::vector<uint64_t>> random_masks(int R, int K, int tokens, Rng& rng) {
    std::vector<std::vector<uint64_t>> masks(R, std::vector<uint64_t>(tokens, 0));
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < tokens; ++t) {
            std::vector<int> peers(R);
            for (int p = 0; p < R; ++p) peers[p] = p;
            for (int k = 0; k < K; ++k) {
                std::swap(peers[k], peers[k + rng.below(uint64_t(R - k))]);
                masks[r][t] |= 1ull << peers[k];
            }
        }
    return masks;
}

// One size's buffers. Dispatch: tokens (x) -> the experts' rows (recv). Combine: the experts' rows (in, with
// their gates) -> tokens (y). Host copies of the sources and gates for the check.
struct Buffers {
    std::vector<std::vector<std::vector<uint8_t>>> host_src;
    std::vector<std::vector<float>> host_w;
    std::vector<std::vector<std::unique_ptr<DeviceBuffer>>> src, dst;
    std::vector<std::unique_ptr<DeviceBuffer>> w;
    cuda::SourcePlanes src_p;
    cuda::TargetPlanes dst_p;
    std::vector<const float*> w_p;
};

Buffers make_buffers(cuda::RowType type, int d, bool dispatch, int tokens, const std::vector<int64_t>& expert_rows,
                     Rng& rng) {
    const int R = int(expert_rows.size());
    const std::vector<size_t> plane_bytes = cuda::row_plane_bytes(type, d);
    Buffers b;
    auto& host_src = b.host_src;
    auto& host_w = b.host_w;
    auto& src = b.src;
    auto& dst = b.dst;
    auto& w = b.w;
    auto& src_p = b.src_p;
    auto& dst_p = b.dst_p;
    auto& w_p = b.w_p;
    host_src.resize(size_t(R));
    host_w.resize(size_t(R));
    src.resize(size_t(R));
    dst.resize(size_t(R));
    w.resize(size_t(R));
    src_p.assign(plane_bytes.size(), std::vector<const void*>(size_t(R)));
    dst_p.assign(plane_bytes.size(), std::vector<void*>(size_t(R)));
    for (int r = 0; r < R; ++r) {
        int64_t src_rows = dispatch ? tokens : expert_rows[r], dst_rows = dispatch ? expert_rows[r] : tokens;
        host_src[r] = make_rows(type, src_rows, d, rng);
        for (size_t p = 0; p < plane_bytes.size(); ++p) {
            src[r].push_back(upload(host_src[r][p]));
            dst[r].push_back(std::make_unique<DeviceBuffer>(size_t(dst_rows) * plane_bytes[p]));
            src_p[p][r] = src[r][p]->p;
            dst_p[p][r] = dst[r][p]->p;
        }
        if (!dispatch) {
            host_w[r].resize(size_t(expert_rows[r]));
            for (float& g : host_w[r]) g = float(rng.uniform());
            std::vector<uint8_t> bytes(host_w[r].size() * sizeof(float));
            std::memcpy(bytes.data(), host_w[r].data(), bytes.size());
            w[r] = upload(bytes);
            w_p.push_back(w[r]->as<float>());
        }
    }
    return b;
}

// What must arrive, per rank and plane.
std::vector<std::vector<std::vector<uint8_t>>> expected_rows(cuda::RowType type, int d, bool dispatch, int tokens,
                                                             const std::vector<std::vector<uint64_t>>& masks, int N,
                                                             const Buffers& b) {
    const int R = int(masks.size());
    const std::vector<size_t> plane_bytes = cuda::row_plane_bytes(type, d);
    size_t row_bytes = 0;
    for (size_t pb : plane_bytes) row_bytes += pb;
    // What must arrive: dispatch — rank 0's tokens for d, then rank 1's, ... (each plane); combine — the CPU
    // reference's sums.
    std::vector<std::vector<std::vector<uint8_t>>> want(R, std::vector<std::vector<uint8_t>>(plane_bytes.size()));
    if (dispatch) {
        for (int dd = 0; dd < R; ++dd)
            for (int s = 0; s < R; ++s)
                for (int t = 0; t < tokens; ++t)
                    if ((masks[s][t] >> dd) & 1)
                        for (size_t p = 0; p < plane_bytes.size(); ++p)
                            want[dd][p].insert(want[dd][p].end(), b.host_src[s][p].begin() + t * plane_bytes[p],
                                               b.host_src[s][p].begin() + (t + 1) * plane_bytes[p]);
    } else {
        std::vector<const float*> wh;
        std::vector<const void*> in;
        std::vector<void*> y;
        for (int r = 0; r < R; ++r) {
            want[r][0].resize(size_t(tokens) * row_bytes);
            wh.push_back(b.host_w[r].data()), in.push_back(b.host_src[r][0].data()), y.push_back(want[r][0].data());
        }
        kernels::combine_node_limited_rows(type == cuda::RowType::BF16, in, wh, masks, N, d, y);
    }
    return want;
}

}  // namespace

int run_gpu_commbench(const GpuCommBenchOptions& o) {
    check_gpu_commbench(o);
    const cuda::RowType type = cuda::parse_row_type(o.dtype, "--dtype");
    auto devices = cuda_devices();
    if (devices.empty()) throw ConfigError("--backend", "cuda: no CUDA device on this machine");
    const int device_sms = devices[0].num_sms;
    for (int s : o.sms)
        DUPLEX_CHECK_ARG(s >= 1 && s <= device_sms, "--sms", "{} SMs requested, {} has {}", s, devices[0].name, device_sms);
    const int R = o.ranks, K = o.top_k, d = o.hidden, N = o.nodes;
    const std::vector<size_t> plane_bytes = cuda::row_plane_bytes(type, d);
    size_t row_bytes = 0;
    for (size_t b : plane_bytes) row_bytes += b;
    const bool dispatch = o.op == "dispatch";
    fmt::print("# duplex commbench: {} between {} virtual ranks on {} ({} SMs), hidden {}, top-{}, {} rows ({} bytes "
               "each), {} iterations\n",
               o.op, R, devices[0].name, device_sms, d, K, cuda::row_type_name(type), row_bytes, o.iters);
    fmt::print("# size = bytes each rank sends; algbw = all ranks' bytes / time; copy = cudaMemcpy D2D of the same bytes;\n"
               "# ceiling = a plain 16-byte copy kernel of the same bytes on the same SM budget\n");
    if (N > 1)
        fmt::print("# {} virtual nodes of {} ranks: a token crosses to each node once, into a relay row there{}\n", N,
                   R / N, dispatch ? ", which the relay copies to its ranks" : "; relays sum their node's rows first");
    else
        fmt::print("# one node: each row written once, {}\n",
                   dispatch ? "from its token to its place at the expert's rank" : "the experts' rows summed into their token");
    fmt::print("#\n# {:>10} {:>6} {:>5} {:>10} {:>11} {:>11} {:>9} {:>11} {:>8} {:>7}\n", "size(B)", "tokens", "SMs",
               "time(us)", "algbw(GB/s)", "copy(GB/s)", "of copy", "ceil(GB/s)", "of ceil", "#wrong");
    nlohmann::json rows = nlohmann::json::array();
    uint64_t total_wrong = 0;
    Rng rng(o.seed);
    for (double size = double(o.min_bytes); size <= double(o.max_bytes) * 1.0001; size *= o.factor) {
        // Tokens per rank so that its K rows per token make `size` bytes; each token's K rows go to K distinct
        // ranks, uniformly.
        const int tokens = std::max(1, int(size / (double(K) * row_bytes)));
        std::vector<std::vector<uint64_t>> masks = random_masks(R, K, tokens, rng);
        const std::vector<int64_t> expert_rows = kernels::node_limited_rows(masks, N, 0);
        const double bytes_all = double(R) * tokens * K * row_bytes;
        // Dispatch: tokens (x) -> the experts' rows (recv). Combine: the experts' rows (in, with their gates) ->
        // tokens (y).
        Buffers b = make_buffers(type, d, dispatch, tokens, expert_rows, rng);
        auto& dst = b.dst;
        std::vector<std::vector<std::vector<uint8_t>>> want;
        if (o.check) want = expected_rows(type, d, dispatch, tokens, masks, N, b);
        double copy_bw = copy_bandwidth(size_t(bytes_all));
        int64_t inter_rows = 0, flat_inter_rows = 0;
        for (int sms : o.sms) {
            cuda::ExchangeConfig cfg;
            cfg.num_sms = sms;
            double ceiling_bw = bytes_all / cuda::copy_ceiling_seconds(size_t(bytes_all), sms, 3, nullptr);
            double best = 1e30;
            for (int it = 0; it < o.warmup + o.iters; ++it) {
                for (int r = 0; r < R; ++r)  // stale results must not pass the check
                    for (auto& buf : dst[r]) DUPLEX_CUDA_CHECK(cudaMemset(buf->p, 0xFF, buf->bytes));
                cuda::NodeLimitedResult h =
                    dispatch ? cuda::dispatch_rows_node_limited(type, d, b.src_p, masks, N, b.dst_p, expert_rows, cfg, nullptr)
                             : cuda::combine_rows_node_limited(type, d, b.src_p[0], b.w_p, masks, N, expert_rows, b.dst_p[0],
                                                               cfg, nullptr);
                inter_rows = h.inter_node_rows;
                flat_inter_rows = h.flat_inter_node_rows;
                if (it >= o.warmup) best = std::min(best, h.seconds);
            }
            uint64_t wrong = 0;
            if (o.check)
                for (int r = 0; r < R; ++r)
                    for (size_t p = 0; p < plane_bytes.size(); ++p)
                        wrong += count_wrong(download(*dst[r][p], want[r][p].size()), want[r][p]);
            total_wrong += wrong;
            double algbw = bytes_all / best / 1e9;
            fmt::print("  {:>10} {:>6} {:>5} {:>10.2f} {:>11.2f} {:>11.2f} {:>8.1f}% {:>11.2f} {:>7.1f}% {:>7}",
                       size_t(tokens) * K * row_bytes, tokens, sms, best * 1e6, algbw, copy_bw / 1e9,
                       100 * algbw * 1e9 / copy_bw, ceiling_bw / 1e9, 100 * algbw * 1e9 / ceiling_bw, wrong);
            if (N > 1) fmt::print("   inter-node rows {} (flat {})", inter_rows, flat_inter_rows);
            fmt::print("\n");
            rows.push_back({{"size", size_t(tokens) * K * row_bytes}, {"tokens", tokens}, {"sms", sms},
                            {"time_us", best * 1e6}, {"algbw_gbs", algbw}, {"copy_gbs", copy_bw / 1e9},
                            {"fraction_of_copy", algbw * 1e9 / copy_bw}, {"ceiling_gbs", ceiling_bw / 1e9},
                            {"fraction_of_ceiling", algbw * 1e9 / ceiling_bw}, {"wrong", wrong},
                            {"inter_node_rows", inter_rows}, {"flat_inter_node_rows", flat_inter_rows}});
            std::fflush(stdout);
        }
    }
    fmt::print("# Out of bounds values : {} {}\n", total_wrong, total_wrong ? "FAILED" : "OK");
    if (!o.json.empty()) {
        nlohmann::json j = {{"op", o.op},       {"backend", "cuda"},       {"ranks", R},
                            {"nodes", N},       {"dtype", o.dtype},        {"device", devices[0].name},
                            {"rows", rows}};
        write_text_file(o.json, j.dump(2) + "\n", "--json");
        fmt::print("# JSON written to {}\n", o.json);
    }
    return total_wrong ? 1 : 0;
}

}  // namespace duplex::tools
