#include "tools/commbench_pairs.hpp"

#include <algorithm>
#include <mutex>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "tools/commands.hpp"
#include "tools/sim_plots.hpp"
#ifdef DUPLEX_HAVE_NCCL
#include "tools/gpu_timing.hpp"
#endif

namespace duplex::tools {

namespace {

void print_matrix(const PairsResult& r, const std::vector<std::vector<double>>& m, const char* what, const char* unit) {
    fmt::print(human(), "# {} ({}), row: from, column: to\n#    ", what, unit);
    for (int t = 0; t < r.ranks; ++t) fmt::print(human(), " {:>7}", t);
    fmt::print(human(), "\n");
    for (int f = 0; f < r.ranks; ++f) {
        fmt::print(human(), "  {:>3}", f);
        for (int t = 0; t < r.ranks; ++t)
            fmt::print(human(), " {:>7}", f == t ? std::string("-") : fmt::format("{:.2f}", m[f][t]));
        fmt::print(human(), "\n");
    }
}

nlohmann::json to_json(const PairsResult& r, const PairsOptions& o) {
    nlohmann::json j = {{"op", "pairs"},
                        {"ranks", r.ranks},
                        {"node_of", r.node_of},
                        {"large_bytes", o.large},
                        {"small_bytes", o.small},
                        {"slow_factor", o.slow_factor},
                        {"repeat", o.repeat},
                        {"bandwidth_gbs", r.bandwidth_gbs},
                        {"loaded_gbs", r.loaded_gbs},
                        {"latency_us", r.latency_us},
                        {"median_bandwidth_gbs", r.median_bandwidth_gbs},
                        {"median_loaded_gbs", r.median_loaded_gbs},
                        {"median_latency_us", r.median_latency_us}};
    j["slow"] = nlohmann::json::array();
    for (const SlowPair& s : r.slow)
        j["slow"].push_back({{"from", s.from}, {"to", s.to}, {"what", s.what}, {"value", s.value}, {"median", s.median}});
    return j;
}

std::string to_csv(const PairsResult& r) {
    std::string out = "from,to,from_node,to_node,bandwidth_gbs,loaded_gbs,latency_us,slow\n";
    for (int f = 0; f < r.ranks; ++f)
        for (int t = 0; t < r.ranks; ++t) {
            if (f == t) continue;
            bool slow = std::any_of(r.slow.begin(), r.slow.end(), [&](const SlowPair& s) { return s.from == f && s.to == t; });
            out += fmt::format("{},{},{},{},{:.4f},{:.4f},{:.3f},{}\n", f, t, r.node_of[f], r.node_of[t],
                               r.bandwidth_gbs[f][t], r.loaded_gbs[f][t], r.latency_us[f][t], slow ? 1 : 0);
        }
    return out;
}

}  // namespace

std::string pairs_svg(const PairsResult& r, const std::string& title) {
    const int n = r.ranks;
    const double cell = std::clamp(560.0 / std::max(n, 1), 8.0, 48.0), left = 70, top = 70;
    const double width = std::max(700.0, left + n * cell + 190), height = top + n * cell + 70;
    double best = 0;
    for (int f = 0; f < n; ++f)
        for (int t = 0; t < n; ++t)
            if (f != t) best = std::max(best, r.bandwidth_gbs[f][t]);
    std::string s = fmt::format(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" font-family=\"Helvetica,Arial,"
        "sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        "<text x=\"{:.0f}\" y=\"24\" font-size=\"15\" font-weight=\"bold\">{}</text>\n"
        "<text x=\"{:.0f}\" y=\"42\" fill=\"#444\">bandwidth one pair at a time (median {:.2f} GB/s); rows send, columns "
        "receive; red outline: slow</text>\n",
        width, height, left, svg_escape(title), left, r.median_bandwidth_gbs);
    auto colour = [&](double v) {  // white (0) to dark blue (the best pair)
        double x = best > 0 ? std::clamp(v / best, 0.0, 1.0) : 0;
        return fmt::format("rgb({},{},{})", int(255 - 225 * x), int(255 - 165 * x), int(255 - 75 * x));
    };
    for (int f = 0; f < n; ++f) {
        s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\">{} (n{})</text>\n", left - 4,
                         top + (f + 0.5) * cell + 4, f, r.node_of[f]);
        s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{}</text>\n", left + (f + 0.5) * cell,
                         top - 6, f);
        for (int t = 0; t < n; ++t) {
            double x = left + t * cell, y = top + f * cell;
            if (f == t) {
                s += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"#eee\"/>\n",
                                 x, y, cell, cell);
                continue;
            }
            bool slow = std::any_of(r.slow.begin(), r.slow.end(), [&](const SlowPair& p) { return p.from == f && p.to == t; });
            s += fmt::format(
                "<rect class=\"pair\" x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"{}\" "
                "stroke=\"{}\" stroke-width=\"{}\"><title>{} -> {}: {:.2f} GB/s alone, {:.2f} GB/s loaded, "
                "{:.2f} us</title></rect>\n",
                x, y, cell, cell, colour(r.bandwidth_gbs[f][t]), slow ? "#d62728" : "white", slow ? 3 : 0.5, f, t,
                r.bandwidth_gbs[f][t], r.loaded_gbs[f][t], r.latency_us[f][t]);
        }
    }
    for (int k = 1; k < n; ++k)  // node boundaries
        if (r.node_of[k] != r.node_of[k - 1])
            s += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" stroke=\"black\" "
                             "stroke-width=\"2\"/><line x1=\"{1:.1f}\" y1=\"{0:.1f}\" x2=\"{3:.1f}\" y2=\"{0:.1f}\" "
                             "stroke=\"black\" stroke-width=\"2\"/>\n",
                             left + k * cell, top, top + n * cell, left + n * cell);
    double lx = left + n * cell + 20;
    for (int i = 0; i <= 4; ++i)
        s += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"16\" height=\"16\" fill=\"{}\" stroke=\"#999\"/>"
                         "<text x=\"{:.1f}\" y=\"{:.1f}\">{:.2f} GB/s</text>\n",
                         lx, top + i * 22, colour(best * (4 - i) / 4), lx + 22, top + i * 22 + 12, best * (4 - i) / 4);
    s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\">{} slow pair{}</text>\n", lx, top + 5 * 22 + 12, r.slow.size(),
                     r.slow.size() == 1 ? "" : "s");
    return s + "</svg>\n";
}

int run_pairs_command(const LaunchOptions& options, const PairsCommand& cmd) {
    PairsResult result;
    std::string backend;
    std::mutex mu;
    PairsOptions pairs = cmd.pairs;
#ifdef DUPLEX_HAVE_NCCL
    // The nccl backend measures the GPUs' links: its messages live on each rank's device (the rank's thread or
    // process has it current once launched).
    if (options.backend == "nccl" && !pairs.allocate)
        pairs.allocate = [](size_t bytes) -> std::shared_ptr<void> {
            auto device = std::make_shared<DeviceBuffer>(bytes);
            return {device, device->p};
        };
#endif
    launch(options, [&](const std::shared_ptr<Communicator>& comm) {
        if (comm->rank() == 0)
            fmt::print(human(), "# duplex commbench: pairs on {} ranks ({} nodes), backend {}: {} x {} bytes one pair "
                       "at a time and all pairs at once, ping-pong of {} bytes{}\n",
                       comm->size(), comm->topology().num_nodes(), comm->backend_description(), cmd.pairs.iters,
                       cmd.pairs.large, cmd.pairs.small,
                       pairs.repeat > 1 ? fmt::format("; each cell the median of {} passes", pairs.repeat) : "");
        PairsResult r = run_pairs(*comm, pairs);
        std::lock_guard<std::mutex> lock(mu);
        if (comm->rank() == 0) result = std::move(r), backend = comm->backend_description();
    });
    if (result.ranks == 0) return 0;  // not rank 0 of a process backend
    print_matrix(result, result.bandwidth_gbs, "bandwidth, one pair at a time", "GB/s");
    print_matrix(result, result.loaded_gbs, "bandwidth, all pairs at once in rounds of a perfect matching", "GB/s");
    print_matrix(result, result.latency_us, "latency, half a round trip", "us");
    fmt::print(human(), "# medians: {:.3f} GB/s alone, {:.3f} GB/s loaded, {:.3f} us\n", result.median_bandwidth_gbs,
               result.median_loaded_gbs, result.median_latency_us);
    if (result.slow.empty())
        fmt::print(human(), "# slow pairs ({}x the median or worse): none\n", cmd.pairs.slow_factor);
    for (const SlowPair& s : result.slow)
        fmt::print(human(), "# SLOW {}{}{} (node {} -> node {}): {} {} against the median {}\n", s.from,
                   s.what == "latency" ? "<->" : "->", s.to,
                   result.node_of[s.from], result.node_of[s.to], s.what,
                   s.what == "latency" ? fmt::format("{:.2f} us", s.value) : fmt::format("{:.3f} GB/s", s.value),
                   s.what == "latency" ? fmt::format("{:.2f} us", s.median) : fmt::format("{:.3f} GB/s", s.median));
    if (!cmd.json.empty()) {
        write_text_file(cmd.json, to_json(result, cmd.pairs).dump(1) + "\n", "--json");
        note_written("JSON", cmd.json);
    }
    if (!cmd.csv.empty()) write_text_file(cmd.csv, to_csv(result), "--csv");
    if (!cmd.svg.empty()) {
        write_text_file(cmd.svg, pairs_svg(result, fmt::format("duplex commbench pairs: {} ranks, {}", result.ranks, backend)),
                        "--svg");
        fmt::print(human(), "# heatmap written to {}\n", cmd.svg);
    }
    return result.slow.empty() ? 0 : 1;
}

}  // namespace duplex::tools
